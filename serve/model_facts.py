"""What an app shows about the model it serves: where the weights came from, their shape and precision, and
what the model card records of their training."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from model import GPT, read_model_card_metrics
from model.card import CARD_NAME, CardError
from model.hub import is_repo_id, resolve
from model.layout import LOSS_CURVE_NAME

from .inference import precision_of

log = logging.getLogger(__name__)


def _card_metrics(folder: Path) -> dict:
    try:
        return read_model_card_metrics(folder)
    except CardError as err:  # a hand-edited card must not stop the model being served
        log.warning("could not read the training metrics in %s: %s", folder / CARD_NAME, err)
        return {}


def describe_source(source: str, path: Path, shipped: Path | None = None) -> str:
    """Where weights came from, in a visitor's terms and without the server's paths: the shipped model, a Hub
    repo id@revision (the commit the cache holds when no revision was asked for), or a local folder's or file's
    name."""
    if shipped is not None and path.resolve() == shipped.resolve():
        return "the model shipped with the app"
    if not Path(source).expanduser().exists() and is_repo_id(source):
        repo, _, revision = source.partition("@")
        commit = path.name[:12] if path.parent.name == "snapshots" else "cached"  # the Hub cache's layout
        return f"Hub repo {repo}@{revision or commit}"
    return f"local {'folder' if path.is_dir() else 'file'} {path.name}"


@dataclass(frozen=True)
class ModelFacts:
    """Where a loaded model came from (source as given, described for visitors) and what its model card says."""

    source: str
    description: str
    location: Path
    parameters: int
    shape: str
    precision: str
    metrics: dict
    loss_curve: Path | None

    @classmethod
    def of(cls, model: GPT, source: str | Path, shipped: Path | None = None) -> ModelFacts:
        """The facts of model, loaded from source; shipped is the folder of the model the app ships."""
        path = resolve(source)
        folder = path if path.is_dir() else path.parent
        curve = folder / LOSS_CURVE_NAME
        config = model.config
        return cls(
            source=str(source),
            description=describe_source(str(source), path, shipped),
            location=path.resolve(),
            parameters=model.num_parameters(),
            shape=f"{config.n_layer} layers, {config.n_head} heads, n_embd {config.n_embd}, "
            f"context {config.block_size} tokens",
            precision=precision_of(model),
            metrics=_card_metrics(folder),
            loss_curve=curve if curve.is_file() else None,
        )

    @property
    def name(self) -> str:
        """What a client calls the model (an OpenAI-style API's model id), without the server's paths: the Hub
        repo id, the folder's or file's name, or shakespeare-gpt for the shipped model."""
        if self.description == "the model shipped with the app":
            return "shakespeare-gpt"
        if self.description.startswith("Hub repo "):
            return self.source.partition("@")[0]
        return self.location.stem if self.location.is_file() else self.location.name

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) pairs to show; losses say when the model card does not record them."""

        def loss(key: str) -> str:
            value = self.metrics.get(key)
            return f"{value:.4f}" if isinstance(value, (int, float)) else "not recorded in the model card"

        rows = [
            ("weights", self.description),
            ("parameters", f"{self.parameters:,}"),
            ("shape", self.shape),
            ("precision", self.precision),
            ("train loss", loss("train_loss")),
            ("held-out loss", loss("val_loss")),
        ]
        for key in ("steps", "tokens", "hardware", "train_minutes"):
            if key in self.metrics:
                value = self.metrics[key]
                rows.append((key.replace("_", " "), f"{value:,}" if isinstance(value, int) else str(value)))
        if self.metrics.get("init"):  # the run a fine-tune started from: its figures are not in the curve
            rows.append(("started from", str(self.metrics["init"])))
        return rows

    def fine_tune(self) -> tuple[int, int] | None:
        """(steps before it, steps in all) of a fine-tune whose card's `steps` count both runs, its `init`
        recording the steps of the run it started from ("1,000 steps of ..."); else None."""
        found = re.search(r"\b(\d[\d,]*) steps\b", str(self.metrics.get("init") or ""))
        base, steps = int(found[1].replace(",", "")) if found else None, self.metrics.get("steps")
        return (base, steps) if base is not None and isinstance(steps, int) and steps > base else None

    def curve_label(self) -> str:
        """What the loss curve covers, short enough for a phone. A run draws only its own steps: after an
        `init`, the last fine-tune's, not those of the run it started from."""
        if not self.metrics.get("init"):
            return "Loss curve"
        if (span := self.fine_tune()) is None:
            return "Loss curve: the last fine-tune only"
        return f"Loss curve: fine-tune steps {span[0] + 1:,}-{span[1]:,}"

    def curve_note(self) -> str:
        """What the curve's axis counts where it is not the card's steps ("" where it is)."""
        if (span := self.fine_tune()) is None:
            return ""
        base, steps = span
        return f"Its axis counts the fine-tune's own steps, 1-{steps - base:,}; the {base:,} before it are not drawn."
