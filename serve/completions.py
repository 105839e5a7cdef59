"""Serving text to callers: request checks and the streamed completion with its timing. No UI here: any
front end can use it."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from model import EOT_TOKEN, GPT, SamplingError, SamplingParams, generate, load_tokenizer, stream_text
from model.sampling import TokenProbability, checked_number
from model.tokenizer import TextEncoding

from .batching import Scheduler

MAX_PROMPT_CHARS = 100_000  # far beyond any context; bounds the tokenizer's work per request


class RequestError(ValueError):
    """A request the caller has to change; the message says what is allowed."""


REFUSED = (RequestError, SamplingError)  # what a front end answers with its message: the caller's to change


@dataclass(frozen=True)
class Request:
    """A checked generation request: the prompt, all its token ids (the model reads the last
    `context` of them), how many tokens to add and how to sample them."""

    prompt: str
    prompt_ids: list[int]
    context: int
    max_new_tokens: int
    params: SamplingParams

    @property
    def cropped(self) -> bool:
        return len(self.prompt_ids) > self.context

    @property
    def seed(self) -> int:
        return self.params.seed


def check_prompt(prompt, tokenizer: TextEncoding | None = None) -> list[int]:
    """The prompt's token ids; a prompt that is not non-blank text of a sane length is refused."""
    if not isinstance(prompt, str):
        raise RequestError(f"prompt must be text (a string); got {type(prompt).__name__} {str(prompt)[:40]!r}")
    if not prompt.strip():
        raise RequestError("prompt is empty: type some text for the model to continue, e.g. 'ROMEO:'")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise RequestError(
            f"prompt is {len(prompt):,} characters; at most {MAX_PROMPT_CHARS:,} are allowed "
            "(the model reads only the last context of tokens)"
        )
    return (tokenizer or load_tokenizer()).encode(prompt)


def check_request(
    model: GPT, prompt, max_new_tokens, params: SamplingParams, tokenizer: TextEncoding | None = None
) -> Request:
    """Check a request's prompt and length as a caller may send them (any JSON values) and return it to run with
    params (built by the front end, SamplingParams(served=True), which checked them); raise RequestError saying
    what is allowed."""
    block_size = model.config.block_size
    prompt_ids = check_prompt(prompt, tokenizer)
    allowed = f"a whole number from 1 to {block_size}"
    try:
        max_new_tokens = checked_number("max_new_tokens", max_new_tokens, 1, block_size, allowed, whole=True)
    except SamplingError as err:
        raise RequestError(str(err)) from None
    return Request(prompt, prompt_ids, block_size, max_new_tokens, params)


@dataclass
class RunStats:
    """What a run did: tokens generated (the end-of-text token included) and the time it took."""

    seed: int
    new_tokens: int = 0
    seconds: float = 0.0
    first_token_seconds: float | None = None
    notes: list[str] = field(default_factory=list)
    probabilities: list[TokenProbability] = field(default_factory=list)  # per token, when asked for

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


def crop_note(request: Request) -> str:
    return (
        f"The prompt is {len(request.prompt_ids)} tokens, longer than the model's context of {request.context}: "
        f"the model read only its last {request.context} tokens."
    )


UPDATE_SECONDS = 0.05  # stream updates at most this often: each costs a trip through the queue and the stream
# ... and all streams together at most this often per second: with 8 running, each updates every 0.4 s. Each
# update holds Gradio's event loop and the interpreter lock between decoding steps: at 40 a second 8 clients of
# GPT-2 124M got 0.84x the tokens/s of the same requests in-process, at 20 1.00x (256 tokens each, 2 cores,
# bench/serve_load.py)
UPDATES_PER_SECOND = 20


def stream_completion(
    scheduler: Scheduler,
    request: Request,
    tokenizer: TextEncoding | None = None,
    update_seconds: float = UPDATE_SECONDS,
    probabilities: bool = False,
) -> Iterator[tuple[str, RunStats]]:
    """Yield the prompt followed by its continuation so far, with the run's figures: first the
    prompt alone, then the first token's text at once, then the grown text at most every
    update_seconds (0: every time it grows; longer while many requests run, so that all together send
    at most UPDATES_PER_SECOND), then once more with the final figures. The request runs
    as a row of the scheduler's batch; closing this generator takes it out at the next step. Its
    timing starts here, so a wait for a free row counts in the time to its first token. With probabilities,
    stats.probabilities holds each generated token's TokenProbability so far."""
    tokenizer = tokenizer or load_tokenizer()
    stats = RunStats(seed=request.seed)
    if request.cropped:
        stats.notes.append(crop_note(request))
    yield request.prompt, stats
    start = time.perf_counter()

    def timed(token_ids: Iterator[int]) -> Iterator[int]:
        for token in token_ids:
            stats.seconds = time.perf_counter() - start
            if stats.first_token_seconds is None:
                stats.first_token_seconds = stats.seconds
            stats.new_tokens += 1
            yield token

    token_ids = scheduler.generate(request.prompt_ids, request.max_new_tokens, request.params, probabilities)
    stats.probabilities = token_ids.probabilities  # the stream appends to it as tokens arrive
    try:
        text, shown = request.prompt, -math.inf  # the first token is shown at once
        for chunk in stream_text(timed(token_ids), tokenizer):
            text += chunk
            interval = max(update_seconds, scheduler.running / UPDATES_PER_SECOND) if update_seconds else 0
            if time.perf_counter() - shown >= interval:
                shown = time.perf_counter()
                yield text, stats
        stats.seconds = time.perf_counter() - start
        yield text, stats
    finally:
        token_ids.close()  # a reader that went away frees its row at the next step


def warm_up(model: GPT) -> None:
    """Run one short generation so the first caller does not pay for first-call set-up."""
    for _ in generate(model, [EOT_TOKEN], 2, temperature=0):
        pass
