"""Continuous batching: every running request is one row of a shared decoding step (decoding.DecodeBatch),
driven by one thread that owns the model. Decoding is memory-bound, so a step for 8 rows costs little more
than a step for one: the weights are read once for all of them.

A request joins at the next step boundary when a row is free (else it waits, in arrival order) and
leaves at the next one when it ends, is stopped or its reader goes away: no work is spent on it after.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Iterator

from model import GPT, SamplingParams
from model.sampling import TokenProbability

from .compiled import CompiledDecoding
from .decoding import DecodeBatch, Row

log = logging.getLogger(__name__)

MAX_BATCH = 16  # rows decoded together: a visitor arriving while 8 others stream joins at the next step
COMPILE_AFTER_IDLE = 5.0  # seconds without a request before a compiled decoding step starts compiling
_END = object()


class TokenStream(Iterator[int]):
    """The tokens of one request as the scheduler produces them. close() (or dropping a generator that
    reads it) cancels the request: its row leaves the batch at the next step. A stream made with
    probabilities also collects each token's TokenProbability, in order, in self.probabilities."""

    def __init__(
        self,
        scheduler: Scheduler,
        prompt_ids: list[int],
        max_new_tokens: int,
        params: SamplingParams,
        probabilities: bool = False,
    ):
        self.prompt_ids, self.max_new_tokens, self.params = prompt_ids, max_new_tokens, params
        self.with_probabilities, self.probabilities = probabilities, []
        self.closed = False
        self._scheduler = scheduler
        self._items: queue.SimpleQueue = queue.SimpleQueue()

    def __next__(self) -> int:
        if self.closed:
            raise StopIteration
        item = self._items.get()
        if item is _END:
            self.closed = True
            raise StopIteration
        if isinstance(item, BaseException):
            self.closed = True
            raise item
        if isinstance(item, TokenProbability):
            self.probabilities.append(item)
            return item.id
        return item

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._scheduler.wake()

    def put(self, item) -> None:
        self._items.put(item)


class Scheduler:
    """Runs every request's generation as a row of one DecodeBatch, max_batch rows at a time; requests beyond
    that wait in arrival order. generate() is a drop-in for model.generate: the same tokens for the same
    seed (bit-identical where the model's kernels are batch-invariant, as the CPU int8 path is),
    whatever else runs. The decoding runs in run(), on the thread that calls it, until close(); start()
    or `with Scheduler(...)` runs it on a thread of its own.

    Run it on the thread that loaded the model where you can (app.py runs it on its main thread): on
    the CPU, torch's parallel kernels ran ~30% slower from another thread than from the one that first
    used them (GPT-2 124M int8, 2 cores: 75-80 instead of 110 tokens/s).

    Given a CompiledDecoding (compiled), it starts compiling once no request has come for COMPILE_AFTER_IDLE
    seconds, and installs the compiled step when it is ready and no request runs."""

    def __init__(self, model: GPT, max_batch: int = MAX_BATCH, compiled: CompiledDecoding | None = None) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a whole number >= 1, got {max_batch!r}")
        self.model, self.max_batch = model, max_batch
        self._compiled = compiled  # compiled once idle, installed once ready and no request runs (see _admit)
        model.eval()
        self._batch = DecodeBatch(model, max_batch)
        self._streams: dict[Row, TokenStream] = {}
        self._waiting: deque[TokenStream] = deque()
        self._changed = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def generate(
        self, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams, probabilities: bool = False
    ) -> TokenStream:
        """Queue a request (token ids checked by the caller, at least one new token) and return its tokens
        (with probabilities, the stream also collects each token's TokenProbability)."""
        if max_new_tokens < 1 or not prompt_ids:
            raise ValueError("a request needs a prompt and at least one new token")
        stream = TokenStream(self, list(prompt_ids), max_new_tokens, params, probabilities)
        with self._changed:
            if self._stopped:
                raise RuntimeError("the scheduler is closed")
            self._waiting.append(stream)
            self._changed.notify()
        return stream

    @property
    def running(self) -> int:
        """Requests in the batch now."""
        return len(self._streams)

    @property
    def waiting(self) -> int:
        """Requests waiting for a row."""
        return len(self._waiting)

    def wake(self) -> None:
        with self._changed:
            self._changed.notify()

    def start(self) -> Scheduler:
        """Run the decoding on a thread of its own."""
        self._thread = threading.Thread(target=self.run, name="batched-decoding", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the decoding (run() returns); requests still running or waiting end with an error."""
        with self._changed:
            self._stopped = True
            self._changed.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> Scheduler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _admit(self) -> bool:
        """Drop closed requests, move waiting ones into free rows; False once the scheduler is closed."""
        with self._changed:
            while True:
                if self._compiled is not None and self._compiled.ready.is_set() and not self._streams:
                    self._batch.step = self._compiled.next_token_logits  # between requests: one path per request
                    self._compiled = None
                    log.info("decoding steps now run compiled")
                for row, stream in list(self._streams.items()):
                    if stream.closed:
                        self._leave(row)
                self._waiting = deque(stream for stream in self._waiting if not stream.closed)
                while self._waiting and not self._batch.full:
                    stream = self._waiting.popleft()
                    row = self._batch.add(
                        stream.prompt_ids, stream.max_new_tokens, stream.params, stream.with_probabilities
                    )
                    self._streams[row] = stream
                if self._stopped or self._streams:
                    return not self._stopped
                if self._compiled is None or self._compiled.started:
                    self._changed.wait()
                elif not self._changed.wait(COMPILE_AFTER_IDLE) and not self._waiting:
                    self._compiled.start(on_ready=self.wake)  # idle for a while: compile now, beside no request

    def _leave(self, row: Row, last=None) -> None:
        self._batch.remove(row)
        stream = self._streams.pop(row)
        stream.put(_END if last is None else last)

    def run(self) -> None:
        """Decode until close(): every step, admit waiting requests, sample a token for every row and
        run the new tokens through the model in one call."""
        while self._admit():
            try:
                for row, token in self._batch.next_tokens():
                    self._streams[row].put(row.last_probability if row.probabilities else token)
                    if row.done:
                        self._leave(row)
                self._batch.advance()
            except Exception as err:  # noqa: BLE001 - a failed step must end its requests, not the server
                log.exception("a decoding step failed; ending the %d requests in it", len(self._streams))
                for row in list(self._streams):
                    self._leave(row, RuntimeError(f"generation failed: {err}"))
        for row in list(self._streams):
            self._leave(row, RuntimeError("the server is shutting down"))
        for stream in self._waiting:
            stream.put(RuntimeError("the server is shutting down"))
