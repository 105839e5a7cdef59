"""What an app shows about the model it serves: where the weights came from, their shape and precision, and
what the model card records of their training."""

from __future__ import annotations

import logging
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
        return rows
