"""The real app.py in a subprocess for the app, browser and newcomer tests: a tiny model to serve, and a
newcomer's machine (empty home, no network)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import launch
import torch
from launch import app_env
from PIL import Image

from model import GPT, GPTConfig, render_model_card

ROOT = Path(__file__).resolve().parents[1]

# Loaded into every Python process of a newcomer test (PYTHONPATH): any connection that leaves this
# machine fails at once, as on an offline laptop or a locked-down Space.
NO_NETWORK = """
import socket

_connect = socket.socket.connect


def _local_only(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("/"):
        raise OSError(f"network use blocked in this test: {address!r}")
    return _connect(self, address)


socket.socket.connect = _local_only
"""


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A random tiny GPT with a model card that records losses, and a loss curve image."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_preset("tiny"))
    card = render_model_card(model.config, {"train_loss": 1.2345, "val_loss": 4.5678})
    model.save_pretrained(folder, model_card=card)
    Image.new("RGB", (8, 8), "white").save(folder / "loss_curve.png")
    return folder


def newcomer_env(home: Path, threads: int | None = 1) -> dict[str, str]:
    """A fresh machine with no network: only PATH and the locale from this environment, an empty HOME,
    TMPDIR and Hub cache, no cache or offline settings of any library, every connection that leaves the
    machine refused."""
    env = {name: os.environ[name] for name in ("PATH", "LANG", "LC_ALL") if name in os.environ}
    env.update(GRADIO_ANALYTICS_ENABLED="False", **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    site = home / ".no-network"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(NO_NETWORK)
    tmp = home / "tmp"
    tmp.mkdir(exist_ok=True)
    env.update(HOME=str(home), TMPDIR=str(tmp), HF_HOME=str(home / ".cache" / "huggingface"), PYTHONPATH=str(site))
    return env


@contextlib.contextmanager
def running_app(*args: str, env: dict[str, str] | None = None, compile: bool = False) -> Iterator[launch.RunningApp]:
    """The real app.py on the CPU (as the tests compute: a CUDA machine would otherwise serve bf16) on a free
    port with args, in env (else app_env with one thread, like the test process: same arithmetic, no
    spin-waiting beside other work); yields where it answers (.url) and its log. Unless compile, it serves
    with --no-compile: every answer from the eager path, and no compiler beside the tests on the CPU."""
    flags = ["--device", "cpu", *([] if compile else ["--no-compile"])]
    with launch.running_app(ROOT / "app.py", *flags, *args, env=env or app_env(threads=1)) as app:
        yield app


# Loaded first in the app's process (PYTHONPATH): every decoding step waits while the file $HOLD_DECODING
# exists, then takes at least $STEP_SECONDS. While held, no job can end, so a burst meets a client's jobs all
# still waiting or running whatever the machine's speed; slowed, the jobs are still running when another
# client asks.
HOLD_DECODING = """
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())  # the checkout: running_app starts app.py there
from serve.decoding import DecodeBatch

_hold, _step, _advance = Path(os.environ["HOLD_DECODING"]), float(os.environ["STEP_SECONDS"]), DecodeBatch.advance


def _held_advance(self):
    while _hold.exists():
        time.sleep(0.005)
    time.sleep(_step)
    return _advance(self)


DecodeBatch.advance = _held_advance
"""


def held_decoding(folder: Path, step_seconds: float = 0.0) -> tuple[dict[str, str], Path]:
    """An environment for running_app whose decoding holds while the returned file exists (see HOLD_DECODING)."""
    site = folder / "held-decoding"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(HOLD_DECODING)
    hold = folder / "hold"
    env = app_env(threads=1) | {"PYTHONPATH": str(site), "HOLD_DECODING": str(hold), "STEP_SECONDS": str(step_seconds)}
    return env, hold
