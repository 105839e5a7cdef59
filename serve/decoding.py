"""The batched decoder: sequences generated together, one row each of every model step. serve.Scheduler
drives it; model.sampling.generate decodes a single sequence the same way (the same prompt chunks, the same
context shift, the same draw), so a seeded row gives generate()'s tokens where the kernels are batch-invariant."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from model import GPT, SamplingParams
from model.sampling import TokenProbability, draw, kept_after_shift, prompt_chunks, token_probability
from model.tokenizer import EOT_TOKEN


@dataclass(eq=False)
class Row:
    """One sequence of a DecodeBatch: its tokens so far (prompt and generated), its settings and RNG, its cache
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
    probabilities: bool = False  # keep the last token's TokenProbability (the probability view)
    last_probability: TokenProbability | None = None


class DecodeBatch:
    """Sequences generated together, one row each: every step samples a token for each row that has
    logits, then runs all their new tokens through the model in one call (its weights read once for all).
    A row joins and leaves between steps; its prompt is prefilled one chunk (model.sampling.prompt_chunks) at a
    step, the row with the least left to prefill first, so a short prompt is not held up behind a long one.
    While other rows decode, prefill gets at most half of the time: after a chunk, steps decode only until
    they have taken as long as the chunk did (a prompt whose rest is at most SHORT_PREFILL tokens is
    prefilled at once, whatever that debt). Rows never see each other: each has its own cache slot, positions,
    settings and RNG, and the model's rows are computed independently, so with batch-invariant kernels
    (the CPU int8 Linear) a row's text is the same whatever else runs. Past the context, a row goes on from
    its last half (model.sampling.kept_after_shift)."""

    SHORT_PREFILL = 32  # tokens: about as costly as a decoding step of a full batch

    def __init__(self, model: GPT, max_rows: int, clock: Callable[[], float] = time.perf_counter, step=None) -> None:
        self.model, self.max_rows, self.clock = model, max_rows, clock
        self.step = step or model.next_token_logits  # the one-token step: the model's, or a compiled one
        self.cache = model.new_kv_cache(max_rows)
        self.rows: list[Row] = []
        self._free = list(range(max_rows))
        self.prefill_debt = 0.0  # seconds of prefill that decoding rows have not yet had back

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def full(self) -> bool:
        return not self._free

    def add(self, tokens: list[int], max_new_tokens: int, params: SamplingParams, probabilities: bool = False) -> Row:
        """A new row for a prompt's token ids (checked by the caller); it reads the last block_size of them.
        With probabilities, each sampled token's TokenProbability is kept in row.last_probability."""
        if self.full:
            raise RuntimeError(f"the batch is full ({self.max_rows} rows)")
        generator = torch.Generator(device=self.model.device)
        generator.manual_seed(params.seed)
        window = tokens[-self.model.config.block_size :]
        row = Row(list(tokens), max_new_tokens, params, self._free.pop(0), generator, pending=window)
        row.probabilities = probabilities
        self.rows.append(row)
        return row

    def remove(self, row: Row) -> None:
        """Take a row out (finished, stopped or abandoned); its cache slot is free for the next."""
        if row in self.rows:
            self.rows.remove(row)
            self._free.append(row.slot)
            self._free.sort()
        row.done = True

    def _next_to_prefill(self) -> Row | None:
        """The row whose prompt chunk runs this step: the one with the least left to prefill, unless rows are
        decoding and are owed time (then only a prompt short enough to cost about a step may go)."""
        waiting = [row for row in self.rows if row.pending]
        if not waiting:
            return None
        shortest = min(waiting, key=lambda row: len(row.pending))  # the oldest among equals
        if all(row.pending for row in self.rows):  # nobody decodes: nobody is owed time
            self.prefill_debt = 0.0
        elif self.prefill_debt > 0 and len(shortest.pending) > self.SHORT_PREFILL:
            return None
        return shortest

    @torch.inference_mode()
    def next_tokens(self) -> list[tuple[Row, int]]:
        """Prefill one chunk of a row still prefilling (_next_to_prefill), then sample the next token of every
        row with logits. Rows that end (end-of-text or max_new_tokens) leave the batch."""
        prefilling = self._next_to_prefill()
        if prefilling is not None:
            started = self.clock()
            chunk = prompt_chunks(prefilling.pending)[0]
            prefilling.pending = prefilling.pending[len(chunk) :]
            last = not prefilling.pending
            logits = self._run([prefilling], [chunk], logits=last)
            prefilling.position += len(chunk)
            if last:
                prefilling.logits = logits[0]
            if any(not row.pending and row is not prefilling for row in self.rows):
                self.prefill_debt += self.clock() - started
        sampled = []
        for row in [row for row in self.rows if row.logits is not None]:
            token = draw(row.logits, row.params, row.generator, row.tokens, row.position)  # the window it sees
            if row.probabilities:
                row.last_probability = token_probability(row.logits, token)
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
                row.pending, row.position = kept_after_shift(row.tokens, block_size), 0
        if decoding:
            started = self.clock()
            for row, logits in zip(decoding, self._run(decoding, [[row.tokens[-1]] for row in decoding]), strict=True):
                row.logits, row.position = logits, row.position + 1
            self.prefill_debt = max(0.0, self.prefill_debt - (self.clock() - started))

    def _run(self, rows: list[Row], tokens: list[list[int]], logits: bool = True) -> torch.Tensor | None:
        """Run each row's tokens at its position into its cache slot; each row's next logits, if asked for."""
        idx = torch.tensor(tokens, device=self.model.device)
        positions, slots = [row.position for row in rows], [row.slot for row in rows]
        if not logits:
            self.model.fill_cache(idx, self.cache, positions, slots)
            return None
        return self.step(idx, self.cache, positions, slots).float()
