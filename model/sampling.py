"""Autoregressive sampling with a KV cache: the sampling settings (SamplingParams, defined and checked here
once), the draw of one token, and generate(), which every caller generates text from."""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import InitVar, dataclass
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
class Setting:
    """One sampling setting: generate()'s default and the range the library takes; the narrower range an app
    serves its visitors and the value they start from; what its special value means."""

    default: float
    low: float
    high: float
    served: tuple[float, float]
    start: float
    meaning: str
    whole: bool = False

    def allowed(self, served: bool) -> str:
        """The range as a message says it."""
        low, high = self.served if served else (self.low, self.high)
        kind = "a whole number" if self.whole else "a number"
        if high == math.inf:
            lower = "> 0" if low == math.ulp(0.0) else f">= {low:g}"
            return f"{kind if self.whole else 'a finite number'} {lower} ({self.meaning})"
        if low == math.ulp(0.0):
            return f"{kind} in (0, {high:g}] ({self.meaning})"
        return f"{kind} from {low:g} to {high:g} ({self.meaning})"


# Every sampling setting, by name: the one table SamplingParams checks and defaults against, and that the app's
# controls, its request check, the OpenAI-style route and the trainer's samples read. A new setting is a row
# here, a field of SamplingParams, and its step in draw().
SETTINGS: dict[str, Setting] = {
    "temperature": Setting(0.8, 0.0, math.inf, (0.0, 2.0), 0.8, "0 = greedy"),
    "top_k": Setting(0, 0, math.inf, (0, 200), 50, "0 = off", whole=True),
    "top_p": Setting(1.0, math.ulp(0.0), 1.0, (0.05, 1.0), 1.0, "1 = off"),
    "repetition_penalty": Setting(1.0, math.ulp(0.0), math.inf, (1.0, 2.0), 1.0, "1 = off"),
}
RANDOM_SEED = -1  # what a visitor of an app sends for "draw a random seed" (None means the same)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token, checked and defaulted once, here, against SETTINGS. temperature 0 is greedy;
    top_k 0, top_p 1 and repetition_penalty 1 are off; seed None draws a random one, kept here so a run can be
    repeated. A setting left None takes generate()'s default, or with served=True (a request to an app) what a
    visitor starts from, and must then be within the served range; a served seed of -1 is random too."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    served: InitVar[bool] = False

    SEED_MAX: ClassVar[int] = 2**63 - 1

    def __post_init__(self, served: bool) -> None:
        for name, setting in SETTINGS.items():
            value = getattr(self, name)
            if value is None:
                value = setting.start if served else setting.default
            low, high = setting.served if served else (setting.low, setting.high)
            value = checked_number(name, value, low, high, setting.allowed(served), setting.whole)
            object.__setattr__(self, name, value)  # frozen
        random = self.seed is None or (served and not isinstance(self.seed, bool) and self.seed == RANDOM_SEED)
        if random:
            object.__setattr__(self, "seed", secrets.randbits(63))
        else:
            allowed = f"blank, -1 (random) or a whole number from 0 to {self.SEED_MAX}"
            object.__setattr__(self, "seed", checked_number("seed", self.seed, 0, self.SEED_MAX, allowed, whole=True))


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


def penalize_repetition(logits: torch.Tensor, seen: Sequence[int], penalty: float) -> torch.Tensor:
    """The logits with every token of seen made less likely, as transformers' RepetitionPenaltyLogitsProcessor
    does: a positive logit divided by penalty, a negative one multiplied by it (penalty 1 changes nothing)."""
    if penalty == 1.0 or not seen:
        return logits
    ids = torch.tensor(sorted(set(seen)), device=logits.device)
    scores = logits[ids]
    return logits.index_put((ids,), torch.where(scores < 0, scores * penalty, scores / penalty))


def draw(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    tokens: Sequence[int] = (),
    window: int = 0,
) -> int:
    """The next token from its logits with a SamplingParams' settings. The repetition penalty reads the last
    window of tokens (the prompt and what was generated): what the model sees, whose logits these are."""
    if params.repetition_penalty != 1.0:  # the window is sliced only when read
        logits = penalize_repetition(logits, tokens[-window:] if window else (), params.repetition_penalty)
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
    step: Callable | None = None,
    **settings,
) -> Iterator[int]:
    """Yield up to max_new_tokens new token ids, one at a time, sampled as params says, else with the keyword
    settings (SamplingParams' fields and defaults). A seed makes the output reproducible whatever else runs;
    it stops after <|endoftext|>. The prompt (its last block_size tokens) is prefilled into a KV cache in
    chunks, then one position runs per step; past the context the last half is kept (kept_after_shift). The
    model runs in eval mode while the generator is live. step replaces model.next_token_logits (a compiled
    step, serve.CompiledDecoding's)."""
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
    return _decode(model, tokens, max_new_tokens, params, step or model.next_token_logits)


def _decode(model: GPT, tokens: list[int], max_new_tokens: int, params: SamplingParams, step) -> Iterator[int]:
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
                logits = step(torch.tensor([last], device=model.device), cache, position)
                position += len(last)
            token = draw(logits[0].float(), params, generator, tokens, position)  # the window the model sees
            yield token
            if token == EOT_TOKEN:
                return
            tokens.append(token)
            pending = [token] if position < block_size else kept_after_shift(tokens, block_size)
            position = position if position < block_size else 0
    finally:
        model.train(was_training)
