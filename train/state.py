"""A run's training state: how far it has come (Progress), what a checkpoint's train_state.pt holds beside
the weights, and how a run is put back from it. train_state.pt is read once, when the configuration to run
is settled (train/train.py), and that SavedRun is handed to the Trainer."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import outputs

log = logging.getLogger("train")


@dataclass
class Progress:
    """How far a run has come. The loss sums stay on the device: no host sync per step."""

    device: torch.device
    step: int = 0
    best_val: float = math.inf
    best_step: int | None = None
    elapsed: float = 0.0  # training seconds, carried over on resume
    history: list[dict] = field(default_factory=list)  # the metrics rows up to this step
    pass_loss: float | None = None  # the mean step loss over the last whole pass
    pass_steps: int = 0  # steps in the running pass
    log_steps: int = 0  # steps since the last log row

    def __post_init__(self) -> None:
        # the summed step losses of the running pass and since the last log row, and whether any loss or
        # gradient was not finite
        self.pass_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self.log_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self.nonfinite = torch.zeros((), device=self.device, dtype=torch.bool)

    def count(self, loss: torch.Tensor, grad_norm: torch.Tensor, check_grad: bool) -> None:
        """One step's loss into the sums; a loss (and, when check_grad, a gradient norm) not finite is kept."""
        self.pass_sum += loss
        self.log_sum += loss
        self.nonfinite |= ~torch.isfinite(loss)
        if check_grad:
            self.nonfinite |= ~torch.isfinite(grad_norm)
        self.pass_steps += 1
        self.log_steps += 1

    def end_pass(self) -> float:
        """The mean loss of the pass just ended; the next pass starts from zero."""
        self.pass_loss = float(self.pass_sum) / self.pass_steps
        self.pass_sum.zero_()
        self.pass_steps = 0
        return self.pass_loss

    def take_log_mean(self) -> float:
        """The mean loss since the last log row; the next row starts from zero."""
        mean = float(self.log_sum) / self.log_steps
        self.log_sum.zero_()
        self.log_steps = 0
        return mean

    def train_loss(self) -> tuple[float | None, str]:
        """The training loss to report, and what it is a mean over."""
        if self.pass_loss is not None:
            return self.pass_loss, "mean over the last whole pass over the training split"
        if self.pass_steps:  # a run shorter than one pass
            basis = f"mean over the {self.pass_steps} steps run (less than one pass over the training split)"
            return float(self.pass_sum) / self.pass_steps, basis
        return None, "no step run"


@dataclass(frozen=True)
class SavedRun:
    """A checkpoint to resume from: its folder (whose weights the model starts from) and its train_state.pt."""

    folder: Path
    state: dict

    @property
    def config(self) -> dict:
        """The settings the run was saved with, as saved (train/config.py's upgrade_saved reads older names)."""
        return self.state["config"]


def read_saved(folder: Path) -> SavedRun:
    return SavedRun(folder, torch.load(folder / outputs.STATE_NAME, map_location="cpu", weights_only=True))


def training_state(config, progress: Progress, batches, optimizer, scaler, device: torch.device) -> dict:
    """What train_state.pt holds: the settings, the progress, the optimizer and loss scaler, the data position
    and the random state."""
    p = progress
    return {
        "config": dataclasses.asdict(config),
        "step": p.step,
        "best_val": p.best_val,
        "best_step": p.best_step,
        "elapsed": p.elapsed,
        "history": p.history,
        "data": batches.state(),
        "pass": [float(p.pass_sum), p.pass_steps, p.pass_loss],
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def restore(saved: SavedRun, progress: Progress, batches, optimizer, scaler, machine, out_dir: Path) -> None:
    """Put a run where the saved one stopped: its progress, data position, optimizer, loss scaler and (on the
    main process) random state and metrics (its model already holds the checkpoint's weights)."""
    state, p = saved.state, progress
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    batches.load_state(state["data"])
    p.step, p.best_val, p.best_step = state["step"], state["best_val"], state.get("best_step")
    p.elapsed, p.history = state["elapsed"], state["history"]
    pass_sum, p.pass_steps, p.pass_loss = state["pass"]
    p.pass_sum.fill_(pass_sum)
    if machine.is_main:  # the saved RNG is rank 0's; the others keep their own seeds
        torch.set_rng_state(state["rng_cpu"])
        if state["rng_cuda"] is not None and machine.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], machine.device)
        outputs.write_metrics(out_dir, p.history)  # rows after the checkpoint are dropped
        log.info("resumed from %s at step %d", saved.folder, p.step)
