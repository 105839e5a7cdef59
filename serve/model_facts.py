"""What an app shows about the model it serves: where the weights came from, their shape and precision, and
what the model card records of their training."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from model import GPT, read_model_card_metrics
from model.card import CARD_NAME, CardError
from model.hub import resolve
from model.layout import LOSS_CURVE_NAME

from .inference import precision_of

log = logging.getLogger(__name__)


def _card_metrics(folder: Path) -> dict:
    try:
        return read_model_card_metrics(folder)
    except CardError as err:  # a hand-edited card must not stop the model being served
        log.warning("could not read the training metrics in %s: %s", folder / CARD_NAME, err)
        return {}


@dataclass(frozen=True)
class ModelFacts:
    """Where a loaded model came from and what its model card says about it."""

    source: str
    location: Path
    parameters: int
    shape: str
    precision: str
    metrics: dict
    loss_curve: Path | None

    @classmethod
    def of(cls, model: GPT, source: str | Path) -> ModelFacts:
        path = resolve(source)
        folder = path if path.is_dir() else path.parent
        curve = folder / LOSS_CURVE_NAME
        config = model.config
        return cls(
            source=str(source),
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
            ("weights", f"{self.source} ({self.location})" if str(self.location) != self.source else self.source),
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
