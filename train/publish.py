"""What a run shows and hands on besides its weights: sample text, the model card and loss curve saved with
each checkpoint, the summary, the final model where SageMaker collects it, and the Hub upload."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from model import SamplingParams, generate, render_model_card, stream_text
from model.card import EXAMPLE_PROMPTS
from model.hub import upload_folder
from model.layout import LOSS_CURVE_NAME, WEIGHTS_NAME
from model.saving import atomic_write

from . import outputs
from .config import TrainConfig
from .plan import RunPlan
from .state import Progress

log = logging.getLogger("train")


def samples(model, tokenizer, config: TrainConfig, params: SamplingParams) -> dict[str, str]:
    """sample_tokens of text after each example prompt, drawn with params."""
    out = {}
    for prompt in EXAMPLE_PROMPTS:
        ids = generate(model, tokenizer.encode(prompt), config.sample_tokens, params=params)
        out[prompt] = prompt + "".join(stream_text(ids, tokenizer))
    return out


def summary(config: TrainConfig, plan: RunPlan, progress: Progress, hardware: str, val: float | None) -> dict:
    """The run so far, for the model card and summary.json."""
    p = progress
    train_loss, basis = p.train_loss()
    return {
        "train_loss": None if train_loss is None else round(train_loss, 4),
        "train_loss_basis": basis,
        "val_loss": None if val is None else round(val, 4),
        "steps": p.step,
        "tokens": p.step * plan.tokens_per_step,
        "train_minutes": round(p.elapsed / 60, 1),
        "hardware": hardware,
        "preset": config.preset,
        "batch": f"{plan.batch_size} x {plan.seq_len}",
        "val_fraction": config.val_fraction,
    }


def warn_missing(what: str, err: Exception) -> None:
    log.warning("could not %s (%s: %s); the checkpoint is saved without it", what, type(err).__name__, err)


def card_and_curve(model, tokenizer, config: TrainConfig, out_dir: Path, history: list[dict], run: dict):
    """The model card (with samples, and the run's summary `run`) and the loss curve drawn from history: a
    failure here is a warning, never a lost checkpoint."""
    try:
        curve = [outputs.plot(out_dir, history)]
    except Exception as err:  # matplotlib missing or failing
        warn_missing("draw the loss curve", err)
        curve = []
    app = SamplingParams(seed=config.seed, served=True)  # the samples and the card's snippets draw as the app starts
    try:
        texts = samples(model, tokenizer, config, app) if config.sample_tokens else {}
    except Exception as err:
        warn_missing("write sample text", err)
        texts = {}
    body = "## Samples\n\n" + "".join(f"```text\n{text}\n```\n\n" for text in texts.values()) if texts else ""
    body += f"![loss curve]({LOSS_CURVE_NAME})\n" if curve else ""
    model_id = config.push_to_hub or "path/to/this/folder"
    sampling = {"temperature": app.temperature, "top_k": app.top_k}
    card = render_model_card(model.config, run, body, model_id=model_id, sampling=sampling)
    return card, curve


def finish(config: TrainConfig, out_dir: Path, checkpoint_dir: Path, run: dict, progress: Progress,
           upload: bool = True) -> None:  # fmt: skip
    """On the main process: summary.json (the run's summary `run`), the final model where SageMaker collects it,
    and the upload (unless upload is False: a run stopped by a signal)."""
    text = json.dumps(run, indent=2) + "\n"
    atomic_write(out_dir / outputs.SUMMARY_NAME, lambda p: p.write_text(text))
    best = checkpoint_dir / outputs.BEST
    chosen = best if (best / WEIGHTS_NAME).is_file() else checkpoint_dir / outputs.LATEST
    if checkpoint_dir != out_dir:  # SageMaker: the model tarball is made from SM_MODEL_DIR
        for name in outputs.CHECKPOINTS:
            if (checkpoint_dir / name).is_dir():
                outputs.copy_model(checkpoint_dir / name, out_dir / name)
    if config.push_to_hub and upload:
        p = progress
        score = f" (held-out loss {p.best_val:.4f} at step {p.best_step})" if chosen == best else ""
        what = f"{chosen.name}/{score}"
        log.info("uploading %s to %s", what, config.push_to_hub)
        url = upload_folder(chosen, config.push_to_hub, private=config.private)
        log.info("uploaded to https://huggingface.co/%s (%s)", config.push_to_hub, url)
