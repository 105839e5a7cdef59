"""ShakespeareGPT's model package: GPT-2, its tokenizer, sampling and checkpoint I/O."""

import warnings

from .card import read_model_card_metrics, render_model_card
from .config import SHAPES, GPTConfig
from .gpt import GPT, KVCache
from .layout import CheckpointError
from .sampling import SamplingError, SamplingParams, generate
from .tokenizer import EOT_TOKEN, load_tokenizer, stream_text

__all__ = [
    "EOT_TOKEN",
    "GPT",
    "SHAPES",
    "CheckpointError",
    "GPTConfig",
    "KVCache",
    "SamplingError",
    "SamplingParams",
    "generate",
    "load_tokenizer",
    "read_model_card_metrics",
    "render_model_card",
    "stream_text",
]


def __getattr__(name: str):
    if name == "PRESETS":  # the old name of the model shapes (the trainer's recipes are train.config.RECIPES)
        warnings.warn("model.PRESETS is deprecated: use model.SHAPES", DeprecationWarning, stacklevel=2)
        return SHAPES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
