"""Start the real app.py as a subprocess for the app and browser tests (and the start-up bench)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # also imported by scripts (tests/test_browser.py, bench/app_startup.py)

from model import GPT, GPTConfig, render_model_card  # noqa: E402

# The machine may be busy training: leave generous time for torch and gradio to import.
START_TIMEOUT_S = 180


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A random tiny GPT with a model card that records losses, and a loss curve image."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_preset("tiny"))
    card = render_model_card(model.config, {"train_loss": 1.2345, "val_loss": 4.5678})
    model.save_pretrained(folder, model_card=card)
    Image.new("RGB", (8, 8), "white").save(folder / "loss_curve.png")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def newcomer_env(home: Path, threads: int | None = 1) -> dict[str, str]:
    """A fresh machine with no network: an empty HOME, TMPDIR and Hub cache, no tokenizer cache, every
    connection that leaves the machine refused (app_env's other settings too)."""
    env = app_env(threads)
    for name in ("TIKTOKEN_CACHE_DIR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "XDG_CACHE_HOME"):
        env.pop(name, None)
    site = home / ".no-network"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(NO_NETWORK)
    tmp = home / "tmp"
    tmp.mkdir(exist_ok=True)
    env.update(HOME=str(home), TMPDIR=str(tmp), HF_HOME=str(home / ".cache" / "huggingface"), PYTHONPATH=str(site))
    return env


def app_env(threads: int | None = None) -> dict[str, str]:
    """The environment to run app.py in: no Space settings, and
    optionally a fixed number of torch threads."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    for name in ("SPACE_ID", "MODEL_ID", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT"):
        env.pop(name, None)
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    return env


def wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float = START_TIMEOUT_S) -> float:
    """Seconds until url answers; raises with the app's output if it exits or the time runs out."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/gradio_api/info", timeout=2) as response:
                if response.status == 200:
                    return time.perf_counter() - start
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"app.py did not answer at {url} within {timeout:.0f} s:\n{log.read_text()}")


@contextlib.contextmanager
def running_app(*args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run `python app.py --port <free port> *args` on 127.0.0.1 (in env, else app_env with one thread)
    and yield its URL. Its output goes to a file, so a chatty server can never block on a full pipe."""
    port = free_port()
    command = [sys.executable, str(ROOT / "app.py"), "--port", str(port), *args]
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "app.log"
        with open(log, "w") as out:
            # one thread, like the test process (conftest): same arithmetic, no spin-waiting beside other work
            process = subprocess.Popen(
                command, cwd=ROOT, env=env or app_env(threads=1), stdout=out, stderr=subprocess.STDOUT
            )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_up(url, process, log)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
