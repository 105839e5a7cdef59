"""Decoding steps compiled by torch.compile (Inductor): GPT.decode_step, all rows of a step in one batched
computation, compiled once for any number of rows, cache slots and positions.

Eager PyTorch runs a decoding step as ~25 small operations per layer, each with its own dispatch and
memory pass; compiled, the per-row input scaling of the int8 Linear layers, the layer norms, GELU,
residual adds and the attention of every row fuse into a few loops around fbgemm's int8 kernel
(called through torch.ops.shakespeare.int8_linear, which the compiler can trace). The compile takes
tens of seconds on a small CPU, so it runs on a thread of its own while the eager path serves
(CompiledDecoding.start). Compiling is Python work that holds the interpreter lock for most of that time,
and a request decoded meanwhile runs several times slower, so the Scheduler starts it only once no
request has come for a few seconds, and switches to the compiled step when no request is running (a
request's tokens all come from one path). If compiling fails, decoding stays eager and one log line says why.

A row's numbers do not depend on its batch-mates on either path: the eager path attends row by row;
the compiled one reads whole blocks of each row's cache with the positions past its own masked out
(CausalSelfAttention.decode). The two paths round differently, so a seed's text can differ between them.
"""

from __future__ import annotations

import functools
import logging
import threading
import time

import torch

from model import GPT
from model.gpt import DecodeRows

from . import native
from .kernels import Int8Linear

log = logging.getLogger(__name__)


class CompiledDecoding:
    """model.decode_step compiled for one-token steps of any batch. Its next_token_logits is a step a decoder
    takes in place of the model's own (DecodeBatch's step, generate()'s step=): one-token steps compiled, longer
    calls (prompt chunks) eager, and eager for good once a compiled step has failed."""

    def __init__(self, model: GPT) -> None:
        self.model = model
        self.ready = threading.Event()  # set once compiled and checked
        self.started = False
        self.failed: str | None = None  # why the step did not compile, or failed once while serving: eager for good
        self._eager = model.next_token_logits
        for module in model.modules():
            if isinstance(module, Int8Linear):
                module.traceable()  # registered now: the compiler must not see the registry change
        self._step = None  # torch.compile imports the compiler (seconds): done by compile(), off the start-up

    def compile(self) -> bool:
        """Compile and run the step on a scratch cache of two slots: one row in the first block, then two rows
        of which one reads the whole context (the compiler tells a read of all the cache from one of a part
        of it); True when it ran, False (and one log line) when it could not."""
        started = time.perf_counter()
        library = native.ready()  # read once: the graph calls the library, or the op around fbgemm, for good
        for module in self.model.modules():
            if isinstance(module, Int8Linear):
                if library:
                    module.native_number()
                module.native_in_graph = library
        try:
            # with the library, each row's attention (fp32, as the cache is with int8 weights) is its C++ kernel,
            # over the row's own positions only
            fp32 = self.model.transformer.wte.weight.dtype == torch.float32
            attend = torch.ops.shakespeare_native.attend if library and fp32 else None
            self._step = torch.compile(functools.partial(self.model.decode_step, attend=attend), dynamic=True)
            cache = self.model.new_kv_cache(2)
            block_size = self.model.config.block_size
            with torch.inference_mode():
                for slots, positions in (([1], [0]), ([0, 1], [block_size - 1, 1])):
                    idx = torch.zeros(len(slots), dtype=torch.long, device=self.model.device)
                    self._run(idx, cache, DecodeRows.of(slots, positions, block_size, idx.device))
        except Exception as err:  # noqa: BLE001 - any failure of the compiler leaves the eager path serving
            self.failed = _first_line(err)
            log.warning("compiled decoding unavailable, decoding stays eager (%s)", self.failed)
            return False
        log.info("compiled decoding ready in %.1f s", time.perf_counter() - started)
        self.ready.set()
        return True

    def start(self, on_ready=None) -> threading.Thread:
        """compile() on a thread of its own; on_ready() is called after it succeeds."""

        def work() -> None:
            if self.compile() and on_ready is not None:
                on_ready()

        thread = threading.Thread(target=work, name="compile-decoding", daemon=True)
        self.started = True
        thread.start()
        return thread

    def next_token_logits(self, idx: torch.Tensor, cache, start, slots=None) -> torch.Tensor:
        """GPT.next_token_logits, with one-token steps compiled."""
        B, T = idx.shape
        if T != 1 or self.failed is not None:
            return self._eager(idx, cache, start, slots)
        starts, slots = self.model.rows_of(B, T, start, slots)
        try:
            return self._run(idx[:, 0], cache, DecodeRows.of(slots, starts, self.model.config.block_size, idx.device))
        except Exception as err:  # noqa: BLE001 - a compiled step that fails once is not trusted again
            self.failed = _first_line(err)
            log.warning("the compiled decoding step failed, decoding goes on eagerly (%s)", self.failed)
            return self._eager(idx, cache, start, slots)

    def _run(self, idx: torch.Tensor, cache, rows: DecodeRows) -> torch.Tensor:
        # every size that varies (rows, cache slots) is symbolic from the start, so no batch size, not even
        # 1, gets a graph of its own: the same kernels for every row (a read of part of the cache and a read
        # of all of it are the two graphs compile() makes)
        for tensor in (idx, rows.slots, rows.positions, *cache.keys, *cache.values):
            torch._dynamo.decorators.mark_unbacked(tensor, 0)
        return self._step(idx, cache.keys, cache.values, rows)


def compile_now(model: GPT) -> CompiledDecoding | None:
    """model's decoding step compiled on this thread, to hand to a decoder (for scripts and benches that time
    it); None when the compiler fails."""
    decoding = CompiledDecoding(model)
    return decoding if decoding.compile() else None


def _first_line(err: Exception) -> str:
    """The exception's type and the first line of its message, for one log line."""
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
