"""ShakespeareGPT's model package: GPT-2, its tokenizer, sampling and checkpoint I/O."""

from .card import read_model_card_metrics, render_model_card
from .config import PRESETS, GPTConfig
from .gpt import GPT, KVCache
from .layout import CheckpointError
from .sampling import SamplingError, SamplingParams, generate
from .tokenizer import EOT_TOKEN, load_tokenizer, stream_text

__all__ = [
    "EOT_TOKEN",
    "GPT",
    "PRESETS",
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
