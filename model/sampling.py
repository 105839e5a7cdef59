"""Autoregressive sampling with a KV cache: the one place every caller generates text from, and the
one place sampling settings are defined, bounded and checked (SamplingParams)."""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from .gpt import GPT
from .tokenizer import EOT_TOKEN

# The prompts the model card's samples and the app's examples use.
EXAMPLE_PROMPTS = ("First Citizen:", "ROMEO:", "To be or not")


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
    are off; seed None draws a random one, kept here so a run can be repeated. The defaults are what
    every front end starts from; SERVED holds the narrower ranges an app offers its visitors (its
    sliders and its request check read them: served())."""

    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    DEFAULT_TOP_K: ClassVar[int] = 50  # what front ends offer first (0 here keeps the Python API unfiltered)
    SEED_MAX: ClassVar[int] = 2**63 - 1
    # (low, high) of each setting a served request may ask for
    SERVED: ClassVar[dict[str, tuple[float, float]]] = {
        "temperature": (0.0, 2.0),
        "top_k": (0, 200),
        "top_p": (0.05, 1.0),
    }

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

    @classmethod
    def served(cls, temperature, top_k, top_p, seed) -> SamplingParams:
        """Settings as a visitor of an app may send them (any JSON value): each within SERVED, else
        SamplingError saying what is allowed; a seed of None or -1 is random."""
        (t_low, t_high), (k_low, k_high), (p_low, p_high) = cls.SERVED.values()
        temperature = checked_number(
            "temperature", temperature, t_low, t_high, f"a number from {t_low:g} to {t_high:g} (0 = greedy)"
        )
        top_k = checked_number(
            "top_k", top_k, k_low, k_high, f"a whole number from {k_low} to {k_high} (0 = off)", whole=True
        )
        top_p = checked_number("top_p", top_p, p_low, p_high, f"a number from {p_low:g} to {p_high:g} (1 = off)")
        random = seed is None or (not isinstance(seed, bool) and isinstance(seed, (int, float)) and seed == -1)
        return cls(temperature, top_k, top_p, None if random else seed)


def sample_token(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator
) -> int:
    """Draw a token from softmax(logits / temperature), restricted to the top_k most likely and to
    the smallest set whose probability reaches top_p (the most likely token always stays).
    Temperature 0 or top_k 1 is greedy; a temperature too small to divide by gives the greedy token
    too (ties shared), never a NaN. Only the candidates are sorted and sampled, not the vocabulary."""
    if temperature == 0 or top_k == 1:
        return int(logits.argmax())
    logits, candidates = (logits - logits.max()) / temperature, None  # the best is 0: no overflow to inf - inf
    if top_k and top_k < logits.numel():
        logits, candidates = torch.topk(logits, top_k)  # sorted, most likely first
    nucleus = top_p is not None and top_p < 1.0
    if nucleus and candidates is None:
        logits, candidates = torch.sort(logits, descending=True)
    # summed in fp32 at least: in bf16 the sums round to runs of equal values, and only a run's first is drawn
    probs = logits.softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    cdf = probs.cumsum(-1)
    if nucleus:
        keep = int((cdf - probs < top_p).sum())  # mass before a token not yet enough
        cdf, candidates = cdf[:keep], candidates[:keep]
    # by the inverse of the cumulative distribution (scaled to the mass kept): one uniform number per draw,
    # where torch.multinomial draws one per candidate (1.1 ms a token over GPT-2's 50,257, top-k off)
    point = torch.rand(1, generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[-1]
    choice = min(int(torch.searchsorted(cdf, point, right=True)), len(cdf) - 1)
    return choice if candidates is None else int(candidates[choice])


def generate(
    model: GPT,
    prompt_ids: Sequence[int] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    *,
    params: SamplingParams | None = None,
) -> Iterator[int]:
    """Yield up to max_new_tokens new token ids, one at a time, sampled as params says, else as the
    keyword settings say (checked here: top_k None and top_p None are off, seed None is random).
    A seed makes the output reproducible whatever else runs; stops after <|endoftext|>. The model runs
    in eval mode while the generator is live. This is a Batch of one row: the prompt (its last
    block_size tokens) is prefilled into a KV cache in chunks, then one position runs per step, and
    past the context the last half is kept (see Batch)."""
    if params is None:
        params = SamplingParams(temperature, top_k or 0, 1.0 if top_p is None else top_p, seed)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise SamplingError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
    tokens = [int(t) for t in (prompt_ids.tolist() if torch.is_tensor(prompt_ids) else prompt_ids)]
    if not tokens:
        raise SamplingError("prompt_ids is empty: give at least one token (e.g. the end-of-text token 50256)")
    vocab_size = model.config.vocab_size
    if any(not 0 <= t < vocab_size for t in tokens):
        raise SamplingError(f"prompt_ids must be token ids in [0, {vocab_size})")
    return _sample(model, tokens, max_new_tokens, params)


def _sample(model: GPT, tokens: list[int], max_new_tokens: int, params: SamplingParams) -> Iterator[int]:
    if max_new_tokens == 0:
        return
    batch = Batch(model, 1)
    row = batch.add(tokens, max_new_tokens, params)
    was_training = model.training
    model.eval()  # no dropout while sampling (and no draw from the global RNG a trainer relies on)
    try:
        while True:
            for _, token in batch.next_tokens():
                yield token
            if row.done:
                return
            batch.advance()
    finally:
        model.train(was_training)


PREFILL_CHUNK = 128  # prompt tokens prefilled per step: a long prompt holds up the rows decoding beside it briefly


@dataclass(eq=False)
class Row:
    """One sequence of a Batch: its tokens so far (prompt and generated), its settings and RNG, its cache
    slot and how many positions of it are there, the tokens still to prefill, and its next logits."""

    tokens: list[int]
    max_new_tokens: int
    params: SamplingParams
    slot: int
    generator: torch.Generator
    pending: list[int]
    position: int = 0
    new_tokens: int = 0
    logits: torch.Tensor | None = None
    done: bool = False


class Batch:
    """Sequences generated together, one row each: every step samples a token for each row that has
    logits, then runs all their new tokens through the model in one call (its weights read once for all).
    A row joins and leaves between steps; its prompt is prefilled PREFILL_CHUNK tokens per step, the
    oldest waiting row first. Rows never see each other: each has its own cache slot, positions,
    settings and RNG, and the model's rows are computed independently, so with batch-invariant kernels
    (the CPU int8 Linear) a row's text is the same whatever else runs. generate() is a batch of one.

    Past the context, a row keeps the last half of its text and goes on from there (its last half is
    prefilled again), as llama.cpp shifts its context: one prefill per half context, not per token."""

    def __init__(self, model: GPT, max_rows: int) -> None:
        self.model, self.max_rows = model, max_rows
        self.cache = model.new_kv_cache(max_rows)
        self.rows: list[Row] = []
        self._free = list(range(max_rows))

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def full(self) -> bool:
        return not self._free

    def add(self, tokens: list[int], max_new_tokens: int, params: SamplingParams) -> Row:
        """A new row for a prompt's token ids (checked by generate() or the caller); it reads the last
        block_size of them."""
        if self.full:
            raise RuntimeError(f"the batch is full ({self.max_rows} rows)")
        generator = torch.Generator(device=self.model.device)
        generator.manual_seed(params.seed)
        window = tokens[-self.model.config.block_size :]
        row = Row(list(tokens), max_new_tokens, params, self._free.pop(0), generator, pending=window)
        self.rows.append(row)
        return row

    def remove(self, row: Row) -> None:
        """Take a row out (finished, stopped or abandoned); its cache slot is free for the next."""
        if row in self.rows:
            self.rows.remove(row)
            self._free.append(row.slot)
            self._free.sort()
        row.done = True

    @torch.inference_mode()
    def next_tokens(self) -> list[tuple[Row, int]]:
        """Prefill one chunk of the oldest row still prefilling, then sample the next token of every row
        with logits. Rows that end (end-of-text or max_new_tokens) leave the batch."""
        prefilling = next((row for row in self.rows if row.pending), None)
        if prefilling is not None:
            chunk, prefilling.pending = prefilling.pending[:PREFILL_CHUNK], prefilling.pending[PREFILL_CHUNK:]
            last = not prefilling.pending
            logits = self._run([prefilling], [chunk], logits=last)
            prefilling.position += len(chunk)
            if last:
                prefilling.logits = logits[0]
        sampled = []
        for row in [row for row in self.rows if row.logits is not None]:
            params = row.params
            token = sample_token(row.logits, params.temperature, params.top_k, params.top_p, row.generator)
            row.logits, row.new_tokens = None, row.new_tokens + 1
            row.tokens.append(token)
            sampled.append((row, token))
            if token == EOT_TOKEN or row.new_tokens >= row.max_new_tokens:
                self.remove(row)
        return sampled

    @torch.inference_mode()
    def advance(self) -> None:
        """Run each row's newest token through the model in one call, giving every row its next logits;
        a row whose context is full keeps its last half to prefill again instead."""
        block_size = self.model.config.block_size
        decoding = []
        for row in self.rows:
            if row.logits is not None or row.pending:
                continue
            if row.position < block_size:
                decoding.append(row)
            else:
                row.pending, row.position = row.tokens[-(block_size // 2) :], 0
        if decoding:
            for row, logits in zip(decoding, self._run(decoding, [[row.tokens[-1]] for row in decoding]), strict=True):
                row.logits, row.position = logits, row.position + 1

    def _run(self, rows: list[Row], tokens: list[list[int]], logits: bool = True) -> torch.Tensor | None:
        """Run each row's tokens at its position into its cache slot; each row's next logits, if asked for."""
        idx = torch.tensor(tokens, device=self.model.device)
        positions, slots = [row.position for row in rows], [row.slot for row in rows]
        if not logits:
            self.model.fill_cache(idx, self.cache, positions, slots)
            return None
        return self.model.next_token_logits(idx, self.cache, positions, slots).float()
