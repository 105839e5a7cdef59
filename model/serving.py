"""Serving text to callers: request checks, the streamed completion with its timing, and the
facts about a loaded model that an app shows. No UI here: any front end can use it."""

from __future__ import annotations

import logging
import math
import reprlib
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import checkpoint
from .gpt import GPT
from .sampling import generate
from .tokenizer import EOT_TOKEN, TextEncoding, load_tokenizer, stream_text

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 100_000  # far beyond any context; bounds the tokenizer's work per request
TEMPERATURE_MAX = 2.0
TOP_K_MAX = 200
TOP_P_MIN = 0.05
SEED_MAX = 2**63 - 1
RANDOM_SEED = -1


class RequestError(ValueError):
    """A request the caller has to change; the message says what is allowed."""


@dataclass(frozen=True)
class Request:
    """A checked generation request. prompt_ids is what the model reads: the prompt's last
    block_size tokens."""

    prompt: str
    prompt_ids: list[int]
    prompt_tokens: int
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float
    seed: int

    @property
    def cropped(self) -> bool:
        return self.prompt_tokens > len(self.prompt_ids)


_short = reprlib.Repr()
_short.maxstring = _short.maxother = 40  # a caller's value is echoed in errors, never in full


def _shown(value) -> str:
    return _short.repr(value)


def _number(name: str, value, low: float, high: float, allowed: str, whole: bool = False) -> float | int:
    """value as a number in [low, high]; JSON callers may send 20.0 for 20, so integral floats count as whole."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{name} must be {allowed}; got {type(value).__name__} {_shown(value)}")
    finite = not isinstance(value, float) or math.isfinite(value)  # math.isfinite(10**400) would overflow
    if not finite or not low <= value <= high or (whole and value != int(value)):
        raise RequestError(f"{name} must be {allowed}; got {_shown(value)}")
    return int(value) if whole else float(value)


def check_prompt(prompt, block_size: int, tokenizer: TextEncoding | None = None) -> tuple[list[int], int]:
    """The token ids the model reads (the last block_size) and the prompt's full token count."""
    if not isinstance(prompt, str):
        raise RequestError(f"prompt must be text (a string); got {type(prompt).__name__} {_shown(prompt)}")
    if not prompt.strip():
        raise RequestError("prompt is empty: type some text for the model to continue, e.g. 'ROMEO:'")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(
            f"prompt is {len(prompt):,} characters; at most {MAX_PROMPT_CHARS:,} are allowed "
            f"(the model reads only the last {block_size} tokens)"
        )
    ids = (tokenizer or load_tokenizer()).encode(prompt)
    return ids[-block_size:], len(ids)


def check_request(
    model: GPT,
    prompt,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    seed,
    tokenizer: TextEncoding | None = None,
) -> Request:
    """Check every parameter as a caller may send it (any JSON value) and return the request
    to run; raise RequestError saying what is allowed. top_k 0 is off; a seed of None or -1
    draws a random one, recorded in the request so the run can be repeated."""
    block_size = model.config.block_size
    prompt_ids, prompt_tokens = check_prompt(prompt, block_size, tokenizer)
    max_new_tokens = _number(
        "max_new_tokens", max_new_tokens, 1, block_size, f"a whole number from 1 to {block_size}", whole=True
    )
    temperature = _number(
        "temperature", temperature, 0, TEMPERATURE_MAX, f"a number from 0 to {TEMPERATURE_MAX:g} (0 = greedy)"
    )
    top_k = _number("top_k", top_k, 0, TOP_K_MAX, f"a whole number from 0 to {TOP_K_MAX} (0 = off)", whole=True)
    top_p = _number("top_p", top_p, TOP_P_MIN, 1.0, f"a number from {TOP_P_MIN:g} to 1 (1 = off)")
    if seed is None or (not isinstance(seed, bool) and seed == RANDOM_SEED):
        seed = secrets.randbits(63)
    else:
        allowed = f"blank, -1 (random) or a whole number from 0 to {SEED_MAX}"
        seed = _number("seed", seed, 0, SEED_MAX, allowed, whole=True)
    return Request(prompt, prompt_ids, prompt_tokens, max_new_tokens, temperature, top_k or None, top_p, seed)


@dataclass
class RunStats:
    """What a run did: tokens generated (the end-of-text token included) and the time it took."""

    seed: int
    new_tokens: int = 0
    seconds: float = 0.0
    first_token_seconds: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        first = f"; first token after {self.first_token_seconds:.2f} s" if self.first_token_seconds is not None else ""
        text = (
            f"{self.new_tokens} tokens in {self.seconds:.2f} s: {self.tokens_per_second:.1f} tokens/s{first}; "
            f"seed {self.seed}"
        )
        return " ".join([text + ".", *self.notes])


def crop_note(request: Request, block_size: int) -> str:
    return (
        f"The prompt is {request.prompt_tokens} tokens, longer than the model's context of {block_size}: "
        f"the model read only its last {block_size} tokens."
    )


def stream_completion(
    model: GPT, request: Request, tokenizer: TextEncoding | None = None
) -> Iterator[tuple[str, RunStats]]:
    """Yield the prompt followed by its continuation so far, with the run's figures: first the
    prompt alone, then each time the text grows, then once more with the final figures."""
    tokenizer = tokenizer or load_tokenizer()
    stats = RunStats(seed=request.seed)
    if request.cropped:
        stats.notes.append(crop_note(request, model.config.block_size))
    yield request.prompt, stats
    start = time.perf_counter()

    def timed(token_ids: Iterator[int]) -> Iterator[int]:
        for token in token_ids:
            stats.seconds = time.perf_counter() - start
            if stats.first_token_seconds is None:
                stats.first_token_seconds = stats.seconds
            stats.new_tokens += 1
            yield token

    token_ids = generate(
        model,
        request.prompt_ids,
        request.max_new_tokens,
        temperature=request.temperature,
        top_k=request.top_k,
        top_p=request.top_p,
        seed=request.seed,
    )
    text = request.prompt
    for chunk in stream_text(timed(token_ids), tokenizer):
        text += chunk
        yield text, stats
    stats.seconds = time.perf_counter() - start
    yield text, stats


def warm_up(model: GPT) -> None:
    """Run one short generation so the first caller does not pay for first-call set-up."""
    for _ in generate(model, [EOT_TOKEN], 2, temperature=0):
        pass


def _card_metrics(folder: Path) -> dict:
    try:
        return checkpoint.read_model_card_metrics(folder)
    except (ValueError, yaml.YAMLError) as err:  # a hand-edited card must not stop the model being served
        log.warning("could not read the training metrics in %s: %s", folder / checkpoint.CARD_NAME, err)
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
        path = checkpoint.resolve(source)
        folder = path if path.is_dir() else path.parent
        curve = folder / "loss_curve.png"
        config = model.config
        return cls(
            source=str(source),
            location=path.resolve(),
            parameters=model.num_parameters(),
            shape=f"{config.n_layer} layers, {config.n_head} heads, n_embd {config.n_embd}, "
            f"context {config.block_size} tokens",
            precision=getattr(model, "precision", str(model.transformer.wte.weight.dtype).removeprefix("torch.")),
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
