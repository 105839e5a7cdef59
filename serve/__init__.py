"""Serving ShakespeareGPT: loading a model for inference (device, precision, int8, CPU threads), checking
requests and streaming completions. Front ends (app.py, bench/) use it; it builds on model/."""

from .batching import MAX_BATCH, Scheduler
from .inference import load_for_inference, precision_of, use_cpu_threads
from .requests import (
    UPDATE_SECONDS,
    ModelFacts,
    Request,
    RequestError,
    RunStats,
    check_request,
    crop_note,
    stream_completion,
    warm_up,
)

__all__ = [
    "MAX_BATCH",
    "Scheduler",
    "UPDATE_SECONDS",
    "ModelFacts",
    "Request",
    "RequestError",
    "RunStats",
    "check_request",
    "crop_note",
    "load_for_inference",
    "precision_of",
    "stream_completion",
    "use_cpu_threads",
    "warm_up",
]
