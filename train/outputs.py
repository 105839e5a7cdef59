"""What a run leaves on disk: checkpoints swapped in atomically, the metrics log, the loss curve, the
summary, and the lock that keeps a second trainer out of the same folder."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from model import GPT
from model.hub import UPLOAD_FILES
from model.layout import LOSS_CURVE_NAME
from model.saving import atomic_write

log = logging.getLogger("train")

DEFAULT_OUT_DIR = "out"  # the run folder without --out-dir or SageMaker's SM_MODEL_DIR
STATE_NAME = "train_state.pt"
LATEST, BEST = "latest", "best"  # the newest checkpoint; the one with the best held-out loss
CHECKPOINTS = (LATEST, BEST)
METRICS_NAME, SUMMARY_NAME = "metrics.jsonl", "summary.json"
LOG_FILES = (METRICS_NAME, SUMMARY_NAME, LOSS_CURVE_NAME)
LOCK_NAME = ".train.lock"
SAGEMAKER_CHECKPOINTS = Path("/opt/ml/checkpoints")  # synced to the estimator's checkpoint_s3_uri


class OutputError(RuntimeError):
    """A run folder that cannot be used or written; the message says what to do."""


def out_dirs(out_dir: str, checkpoint_dir: str) -> tuple[Path, Path, bool]:
    """(the run folder, the checkpoint folder, whether the latter is SageMaker's spot-safe default)."""
    out = Path(out_dir or os.environ.get("SM_MODEL_DIR", DEFAULT_OUT_DIR)).expanduser()
    if checkpoint_dir:
        return out, Path(checkpoint_dir).expanduser(), False
    if SAGEMAKER_CHECKPOINTS.is_dir():
        return out, SAGEMAKER_CHECKPOINTS, True
    return out, out, False


@contextmanager
def locked(folder: Path):
    """Hold folder's lock for the run: a second trainer on the same folder stops, naming the holder."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise OutputError(
                f"{folder} is in use by a running trainer ({holder}); wait for it, stop it, or use another --out-dir"
            ) from None
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)


def check_writable(folder: Path) -> None:
    """Fail before training when folder cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = atomic_write(folder / ".write-test", lambda p: p.write_text("ok"))
        probe.unlink()
    except OSError as err:
        raise OutputError(f"cannot write to {folder} ({err.strerror}); pass a writable --out-dir") from None


def repair(folder: Path) -> None:
    """Finish a checkpoint swap a kill interrupted: a missing latest/ or best/ comes back from its .old copy."""
    for name in CHECKPOINTS:
        final, old = folder / name, folder / f".{name}.old"
        if old.is_dir() and not final.exists():
            try:
                os.replace(old, final)
                log.warning("restored %s from the copy an interrupted save left", final)
            except OSError:  # another process of the run (torchrun) restored it first
                if not final.is_dir():
                    raise
        shutil.rmtree(folder / f".{name}.tmp", ignore_errors=True)


def earlier_run(folders: list[Path]) -> list[Path]:
    """The files of an earlier run in these folders."""
    names = [*CHECKPOINTS, *(f".{n}.old" for n in CHECKPOINTS), *LOG_FILES]
    return [folder / name for folder in dict.fromkeys(folders) for name in names if (folder / name).exists()]


def clear_earlier_run(folders: list[Path]) -> None:
    """Remove what an earlier run wrote (checkpoint files, logs), and nothing else: files a user put
    into latest/ or best/ stay."""
    ours = {*UPLOAD_FILES, STATE_NAME}
    for path in earlier_run(folders):
        if path.is_dir():
            for child in path.iterdir():
                if child.name in ours:
                    child.unlink()
            if not any(path.iterdir()):
                path.rmdir()
        else:
            path.unlink()


def no_space(path: Path, previous: bool = True) -> OutputError:
    if not previous:
        return OutputError(f"no space left on the device at {path}; no checkpoint was written yet. Free some space")
    return OutputError(f"no space left on the device at {path}; the previous checkpoint is intact. Free some space "
                       "and continue with --resume")  # fmt: skip


def save_checkpoint(folder: Path, name: str, model: GPT, state: dict, card: str, extra_files=()) -> Path:
    """Write folder/name through a temporary folder renamed over the old one, so a kill at any moment leaves
    a complete checkpoint (folder/name, or folder/.name.old that repair() puts back). Files in the old
    folder that the trainer does not write are carried over."""
    final, tmp, old = folder / name, folder / f".{name}.tmp", folder / f".{name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, model_card=card)
        atomic_write(tmp / STATE_NAME, lambda p: torch.save(state, p))
        for path in extra_files:
            shutil.copyfile(path, tmp / Path(path).name)
        if final.is_dir():
            for child in final.iterdir():
                if child.is_file() and not (tmp / child.name).exists():
                    shutil.copy2(child, tmp / child.name)
    except Exception as err:  # torch.save (a RuntimeError) and safetensors (a SafetensorError) have their own
        shutil.rmtree(tmp, ignore_errors=True)
        full = getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err)
        if full or (isinstance(err, RuntimeError) and shutil.disk_usage(folder).free < 1 << 20):
            raise no_space(folder, previous=(folder / LATEST / STATE_NAME).is_file()) from None
        raise
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def copy_model(source: Path, target: Path) -> None:
    """A checkpoint folder's model files (not the optimizer state) into target."""
    target.mkdir(parents=True, exist_ok=True)
    for child in source.iterdir():
        if child.is_file() and child.name != STATE_NAME:
            shutil.copyfile(child, target / child.name)


def latest_checkpoint(folder: Path) -> Path | None:
    repair(folder)
    return folder / LATEST if (folder / LATEST / STATE_NAME).is_file() else None


def write_metrics(folder: Path, rows: list[dict]) -> None:
    """The whole metrics log (on resume: exactly the rows up to the checkpoint's step)."""
    text = "".join(json.dumps(row) + "\n" for row in rows)
    atomic_write(folder / METRICS_NAME, lambda p: p.write_text(text))


def append_metrics(folder: Path, row: dict) -> None:
    with open(folder / METRICS_NAME, "a") as f:
        f.write(json.dumps(row) + "\n")


def plot(folder: Path, history: list[dict]) -> Path:
    """The loss curve (train per log step, held-out per evaluation) as folder/LOSS_CURVE_NAME."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in history if "lr" in r]
    val = [(r["step"], r["val_loss"]) for r in history if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train (per log step)")
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="held-out")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="ShakespeareGPT training")
    ax.grid(alpha=0.3)
    if train or val:  # nothing to label before the first log row
        ax.legend()
    try:
        return atomic_write(
            folder / LOSS_CURVE_NAME, lambda p: fig.savefig(p, format="png", dpi=100, bbox_inches="tight")
        )
    finally:
        plt.close(fig)
