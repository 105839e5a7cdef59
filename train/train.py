"""Train ShakespeareGPT: `python train/train.py [--preset NAME] [--flag value ...]` (`--help` lists the flags).

Runs on one CPU or GPU, or under `torchrun` (and SageMaker's torch_distributed) with DDP; only rank 0
logs, saves and uploads. The pieces: train/config.py (flags, presets), train/plan.py (sequence length and
batch split, checked once), train/data.py (text, tokens, batches), train/machine.py (device, precision,
DDP), train/state.py (training state, resume), train/outputs.py (checkpoints, logs), train/publish.py
(samples, model card, summary, upload), train/trainer.py (the loop).
"""

from __future__ import annotations

import errno
import logging
import shlex
import signal
import sys
from contextlib import nullcontext
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`python train/train.py`, SageMaker's entry_point)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402

from model.layout import CheckpointError  # noqa: E402
from model.tokenizer import TokenizerError  # noqa: E402
from train import outputs, publish, state  # noqa: E402
from train.config import TrainConfig, build_parser, parse_args, resumed_config  # noqa: E402
from train.data import DataError  # noqa: E402
from train.machine import process_rank, setup_machine  # noqa: E402
from train.plan import ConfigError  # noqa: E402
from train.trainer import Diverged, Trainer, prepare  # noqa: E402

log = logging.getLogger("train")


def config_to_run(config: TrainConfig, explicit: dict) -> tuple[TrainConfig, state.SavedRun | None]:
    """The configuration to run, and the checkpoint it continues (whose train_state.pt is read here, once).
    With --resume, the checkpoint's own settings, changed only where that is safe; a SageMaker job restarted
    after a spot interruption resumes by itself. Without --resume, a folder that holds an earlier run is
    refused, unless --restart."""
    out_dir, checkpoint_dir, sagemaker = outputs.out_dirs(config.out_dir, config.checkpoint_dir)
    latest = outputs.latest_checkpoint(checkpoint_dir) if checkpoint_dir.is_dir() else None
    if sagemaker and latest and not config.resume:
        log.info("SageMaker restarted the job: resuming from %s", latest)
        explicit = {**explicit, "resume": True}
    elif config.restart:
        if process_rank()[0] == 0:  # the main process only: several would race to remove the files
            outputs.clear_earlier_run([out_dir, checkpoint_dir])
    elif not config.resume and (earlier := outputs.earlier_run([out_dir, checkpoint_dir])):
        raise outputs.OutputError(
            f"{out_dir} holds an earlier run ({', '.join(p.name for p in earlier)}); continue it with --resume, "
            "start over with --restart (replaces only the files the trainer wrote), or pick another --out-dir"
        )
    if not explicit.get("resume"):
        return config, None
    if latest is None:
        raise outputs.OutputError(
            f"--resume: no checkpoint in {checkpoint_dir / outputs.LATEST}; drop --resume to start a new run"
        )
    saved = state.read_saved(latest)
    # the run goes on where it was found (and locked), even when it was saved with other folders
    folders = {"out_dir": config.out_dir, "checkpoint_dir": config.checkpoint_dir}
    return resumed_config(saved.config, {**explicit, **folders}), saved


def resume_command(config: TrainConfig) -> str:
    words = ["python", "train/train.py", "--resume", "--out-dir", config.out_dir or outputs.DEFAULT_OUT_DIR]
    if config.checkpoint_dir:
        words += ["--checkpoint-dir", config.checkpoint_dir]
    return shlex.join(words)


def check_hub_token(config: TrainConfig) -> None:
    """--push-to-hub fails at the start, not after training, when there is no token to upload with."""
    from huggingface_hub import get_token

    if not get_token():
        raise outputs.OutputError("--push-to-hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login`")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config, explicit = parse_args(argv)
    rank, world_size = process_rank()
    try:
        # a new run's flags are checked together before anything is written (a resumed run's are its checkpoint's)
        plan, weights = (None, None) if config.resume else prepare(config, world_size)
        out_dir, checkpoint_dir, _ = outputs.out_dirs(config.out_dir, config.checkpoint_dir)
        if rank == 0:  # everything the end of the run needs, before the first step
            for folder in (out_dir, checkpoint_dir):
                outputs.check_writable(folder)
        # locked before anything reads the folder: a running trainer's files are never taken for an earlier
        # run's, repaired or removed by --restart
        with outputs.locked(checkpoint_dir) if rank == 0 else nullcontext():
            config, saved = config_to_run(config, explicit)
            if saved is not None:
                plan, weights = prepare(config, world_size, saved)
            machine = setup_machine(config)
            if not machine.is_main:
                logging.getLogger().setLevel(logging.WARNING)
            if machine.is_main and config.push_to_hub:
                check_hub_token(config)
            trainer = Trainer(config, machine, plan, weights, saved)
            summary = trainer.train()
            if machine.is_main:
                publish.finish(config, trainer.out_dir, trainer.checkpoint_dir, summary, trainer.progress,
                               upload=not trainer.stop_signal)  # fmt: skip
    except ConfigError as err:  # flags that cannot run together: refused like a bad flag
        build_parser().error(str(err))
    except (outputs.OutputError, DataError, CheckpointError, TokenizerError, Diverged, ValueError) as err:
        sys.exit(f"error: {err}")
    except OSError as err:  # a full disk met by a write other than a checkpoint's (metrics, summary, curve)
        if err.errno != errno.ENOSPC:
            raise
        sys.exit(f"error: {outputs.no_space(Path(err.filename).parent if err.filename else Path.cwd())}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if machine.is_main:
        report(summary, out_dir, checkpoint_dir, config)
    if summary["reason"].startswith("stopped by signal"):
        return 128 + int(signal.Signals[summary["reason"].split()[-1]])
    return 0


def report(summary: dict, out_dir: Path, checkpoint_dir: Path, config: TrainConfig) -> None:
    """The end of a run on stdout: why it stopped, the best model and how to serve it (or resume)."""
    best_name, latest_name = outputs.BEST, outputs.LATEST
    folder = out_dir if (out_dir / best_name).is_dir() or (out_dir / latest_name).is_dir() else checkpoint_dir
    best = folder / best_name if (folder / best_name).is_dir() else folder / latest_name
    score = (
        f"best held-out loss {summary['best_val_loss']:.4f} at step {summary['best_step']}"
        if summary["best_step"] is not None
        else f"train loss {summary['train_loss']} ({summary['train_loss_basis']}); no held-out split"
    )
    print(f"\n{summary['reason']} after {summary['steps']} steps ({summary['train_minutes']} min); {score}")
    print(f"model: {best}   (run folder: {out_dir})")
    print(f"serve it:  python app.py --model {shlex.quote(str(best))}")
    if summary["reason"].startswith(("stopped by signal", "time budget")):
        print(f"resume:    {resume_command(config)}")


if __name__ == "__main__":
    sys.exit(main())
