"""Serving ShakespeareGPT: loading a model for inference (device, precision, int8, CPU threads), what an app
offers (policy), checking requests, batched decoding and streaming completions. Front ends (app.py, bench/)
use it; it builds on model/."""

from . import policy
from .batching import MAX_BATCH, Scheduler
from .compiled import CompiledDecoding
from .completions import (
    REFUSED,
    UPDATE_SECONDS,
    Request,
    RequestError,
    RunStats,
    check_request,
    crop_note,
    stream_completion,
    warm_up,
)
from .inference import load_for_inference, precision_of, use_cpu_threads, why_precision
from .model_facts import ModelFacts

__all__ = [
    "MAX_BATCH",
    "REFUSED",
    "UPDATE_SECONDS",
    "CompiledDecoding",
    "ModelFacts",
    "Request",
    "RequestError",
    "RunStats",
    "Scheduler",
    "check_request",
    "crop_note",
    "load_for_inference",
    "policy",
    "precision_of",
    "stream_completion",
    "use_cpu_threads",
    "warm_up",
    "why_precision",
]
