"""Autoregressive sampling with a KV cache: the sampling settings (SamplingParams, defined and checked here
once), the draw of one token, and generate(), which every caller generates text from."""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from .gpt import GPT
from .tokenizer import EOT_TOKEN


class SamplingError(ValueError):
    """A sampling setting out of its range; the message says what is allowed."""


def checked_number(name: str, value, low: float, high: float, allowed: str, whole: bool = False) -> float | int:
    """value as a number in [low, high], whatever a caller sent (JSON gives 20.0 for 20, so integral
    floats count as whole); anything else raises SamplingError saying what is allowed."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SamplingError(f"{name} must be {allowed}; got {type(value).__name__} {_shown(value)}")
    finite = not isinstance(value, float) or math.isfinite(value)  # math.isfinite(10**400) would overflow
    if not finite or not low <= value <= high or (whole and value != int(value)):
        raise SamplingError(f"{name} must be {allowed}; got {_shown(value)}")
    return int(value) if whole else float(value)


def _shown(value) -> str:
    """A caller's value, shortened: errors echo it, never in full."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token, checked once when made. temperature 0 is greedy; top_k 0 and top_p 1
    are off; seed None draws a random one, kept here so a run can be repeated. The defaults are
    generate()'s and every front end's starting point."""

    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    SEED_MAX: ClassVar[int] = 2**63 - 1

    def __post_init__(self) -> None:
        self._set("temperature", 0.0, math.inf, "a finite number >= 0 (0 = greedy)")
        self._set("top_k", 0, math.inf, "a whole number >= 0 (0 = off)", whole=True)
        self._set("top_p", math.ulp(0.0), 1.0, "a number in (0, 1] (1 = off)")
        if self.seed is None:
            object.__setattr__(self, "seed", secrets.randbits(63))
        else:
            allowed = f"blank, -1 (random) or a whole number from 0 to {self.SEED_MAX}"
            self._set("seed", 0, self.SEED_MAX, allowed, whole=True)

    def _set(self, name: str, low: float, high: float, allowed: str, whole: bool = False) -> None:
        object.__setattr__(self, name, checked_number(name, getattr(self, name), low, high, allowed, whole))  # frozen


def sample_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator) -> int:
    """Draw a token from softmax(logits / temperature), restricted to the top_k most likely (0 = all) and to
    the smallest set whose probability reaches top_p (1 = all; the most likely token always stays).
    Temperature 0 or top_k 1 is greedy, and so is a temperature too small to divide by in the logits' dtype
    (below its smallest normal number): never a NaN. Only the candidates are sorted and sampled."""
    if temperature < torch.finfo(logits.dtype).tiny or top_k == 1:
        return int(logits.argmax())
    logits, candidates = (logits - logits.max()) / temperature, None  # the best is 0: no overflow to inf - inf
    if 0 < top_k < logits.numel():
        logits, candidates = torch.topk(logits, top_k)  # sorted, most likely first
    nucleus = top_p < 1.0
    if nucleus and candidates is None:
        logits, candidates = torch.sort(logits, descending=True)
    # summed in fp32 at least: in bf16 the sums round to runs of equal values, and only a run's first is drawn
    probs = logits.softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    cdf = probs.cumsum(-1)
    if nucleus:
        keep = int((cdf - probs < top_p).sum())  # mass before a token not yet enough
        cdf, candidates = cdf[:keep], candidates[:keep]
    # by the inverse of the cumulative distribution (scaled to the mass kept): one uniform number per draw,
    # where torch.multinomial draws one per candidate
    point = torch.rand(1, generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[-1]
    choice = min(int(torch.searchsorted(cdf, point, right=True)), len(cdf) - 1)
    return choice if candidates is None else int(candidates[choice])


TOP_ALTERNATIVES = 5


@dataclass(frozen=True)
class TokenProbability:
    """How sure the model was of a token it generated: its probability under the model's own distribution
    (softmax of the logits at temperature 1, before temperature, top-k or top-p), and the most probable
    tokens under that same distribution as (id, probability), most probable first."""

    id: int
    p: float
    top: tuple[tuple[int, float], ...]


def token_probability(logits: torch.Tensor, token: int, k: int = TOP_ALTERNATIVES) -> TokenProbability:
    """The TokenProbability of token from the logits it was drawn from (no second forward pass)."""
    probs = logits.softmax(-1, dtype=torch.float32)
    top = probs.topk(k)
    alternatives = tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True))
    return TokenProbability(token, float(probs[token]), alternatives)


def draw(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """sample_token with a SamplingParams' settings."""
    return sample_token(logits, params.temperature, params.top_k, params.top_p, generator)


PREFILL_CHUNK = 128  # prompt tokens run per forward pass: a batched decoder interleaves a long prompt's chunks


def prompt_chunks(tokens: list[int]) -> list[list[int]]:
    """A prompt split into the chunks it is prefilled in (the same split alone and in a batch)."""
    return [tokens[i : i + PREFILL_CHUNK] for i in range(0, len(tokens), PREFILL_CHUNK)]


def kept_after_shift(tokens: list[int], block_size: int) -> list[int]:
    """What a sequence whose context is full goes on from: its last half context, prefilled again (as llama.cpp
    shifts its context), so a long generation costs one prefill per half context, not a full window per token."""
    return tokens[-(block_size // 2) :]


def generate(
    model: GPT,
    prompt_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    *,
    params: SamplingParams | None = None,
    **settings,
) -> Iterator[int]:
    """Yield up to max_new_tokens new token ids, one at a time, sampled as params says, else with the keyword
    settings (temperature, top_k, top_p, seed: SamplingParams' fields and defaults). A seed makes the output
    reproducible whatever else runs; it stops after <|endoftext|>. The prompt (its last block_size tokens) is
    prefilled into a KV cache in chunks, then one position runs per step; past the context the last half is
    kept (kept_after_shift). The model runs in eval mode while the generator is live."""
    if params is None:
        params = SamplingParams(**settings)
    elif settings:
        raise TypeError(f"give generate() params= or keyword settings, not both (got {', '.join(settings)})")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise SamplingError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    tokens = [int(t) for t in (prompt_ids.tolist() if torch.is_tensor(prompt_ids) else prompt_ids)]
    if not tokens:
        raise SamplingError(f"prompt_ids is empty: give at least one token (e.g. the end-of-text token {EOT_TOKEN})")
    vocab_size = model.config.vocab_size
    if any(not 0 <= t < vocab_size for t in tokens):
        raise SamplingError(f"prompt_ids must be token ids in [0, {vocab_size})")
    return _decode(model, tokens, max_new_tokens, params)


def _decode(model: GPT, tokens: list[int], max_new_tokens: int, params: SamplingParams) -> Iterator[int]:
    block_size = model.config.block_size
    cache = model.new_kv_cache(1)
    generator = torch.Generator(device=model.device).manual_seed(params.seed)
    pending, position = tokens[-block_size:], 0
    was_training = model.training
    model.eval()  # no dropout while sampling (and no draw from the global RNG a trainer relies on)
    try:
        for _ in range(max_new_tokens):
            with torch.inference_mode():
                *prefix, last = prompt_chunks(pending)
                for chunk in prefix:
                    model.fill_cache(torch.tensor([chunk], device=model.device), cache, position)
                    position += len(chunk)
                logits = model.next_token_logits(torch.tensor([last], device=model.device), cache, position)
                position += len(last)
            token = draw(logits[0].float(), params, generator)
            yield token
            if token == EOT_TOKEN:
                return
            tokens.append(token)
            pending = [token] if position < block_size else kept_after_shift(tokens, block_size)
            position = position if position < block_size else 0
    finally:
        model.train(was_training)
