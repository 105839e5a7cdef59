"""Batched decoding (serve.decoding.DecodeBatch, serve.Scheduler): rows are independent (a seeded request gives
the same tokens alone and beside others), join and leave between steps, prefill in chunks, and the
scheduler frees the row of a request nobody reads."""

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from model import GPT, GPTConfig, SamplingParams, generate
from model import sampling as sampling_module
from serve import Scheduler
from serve.decoding import DecodeBatch
from serve.inference import int8_supported
from serve.kernels import quantize_int8

# (prompt, max_new_tokens, settings) of requests that differ in every way a visitor can make them differ
REQUESTS = [
    (list(range(300, 303)), 40, SamplingParams(0.0, seed=1)),
    (list(range(500, 590)), 25, SamplingParams(0.9, top_k=40, seed=2)),  # longer than one prefill chunk
    ([50256], 60, SamplingParams(1.2, top_p=0.9, seed=3)),  # crosses the 64-token context
    (list(range(700, 710)), 12, SamplingParams(0.7, seed=4)),
    (list(range(40, 61)), 33, SamplingParams(1.0, top_k=5, top_p=0.8, seed=5)),
    ([11, 12], 50, SamplingParams(0.0, seed=6)),
    (list(range(900, 1000)), 8, SamplingParams(1.5, seed=7)),  # longer than the context: cropped
    ([464, 3290, 373], 45, SamplingParams(0.8, top_k=50, seed=8)),
]


@pytest.fixture(scope="module")
def int8_model(perturb, make_varied):
    """A tiny GPT-2 (64-token context) served as the app serves on a CPU: int8 Linear layers."""
    if not int8_supported():
        pytest.skip("the batch-invariant CPU path is int8 (fbgemm), which this PyTorch build lacks")
    torch.manual_seed(0)
    return quantize_int8(make_varied(perturb(GPT(GPTConfig.from_preset("tiny")))))


@pytest.fixture(scope="module")
def alone(int8_model):
    """Each request's tokens when it runs alone (generate(), a batch of one)."""
    return [list(generate(int8_model, prompt, n, params=params)) for prompt, n, params in REQUESTS]


def run_together(scheduler: Scheduler, indices: list[int], stagger: float = 0.0) -> dict[int, list[int]]:
    """The tokens of REQUESTS[i] for each i, all submitted to the scheduler at once (or stagger s apart)
    and read on their own threads, as the app's workers read them."""
    results: dict[int, list[int]] = {}

    def read(i: int) -> None:
        prompt, n, params = REQUESTS[i]
        results[i] = list(scheduler.generate(prompt, n, params))

    threads = []
    for i in indices:
        threads.append(threading.Thread(target=read, args=(i,)))
        threads[-1].start()
        time.sleep(stagger)
    for thread in threads:
        thread.join(timeout=120)
    return results


@pytest.mark.parametrize("others", [1, 3, 7])
def test_a_seeded_request_gives_the_same_tokens_alone_and_beside_others(int8_model, alone, others):
    """Request 0 (greedy) and request 7 (sampled) beside `others` requests of other lengths and settings,
    some joining while it runs: every request's tokens equal its solo run, bit for bit."""
    with Scheduler(int8_model, max_batch=8) as scheduler:
        for subject in (0, 7):
            indices = [subject] + [i for i in range(len(REQUESTS)) if i != subject][:others]
            together = run_together(scheduler, indices, stagger=0.01)
            assert {i: together[i] for i in indices} == {i: alone[i] for i in indices}


def test_generate_and_the_scheduler_agree_with_fewer_rows_than_requests(int8_model, alone):
    """Eight requests through two rows: six wait, join as rows free up, and still match their solo runs."""
    with Scheduler(int8_model, max_batch=2) as scheduler:
        assert run_together(scheduler, list(range(len(REQUESTS)))) == dict(enumerate(alone))


def batch_and_solo_logits(model: GPT) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Next-token logits of three prompts, each run alone and then all three as rows at their own positions
    and cache slots (3, 0, 2) of one call."""
    prompts = [torch.randint(0, 50257, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 17, 40)]
    batch_cache, solo_logits = model.new_kv_cache(4), []
    with torch.inference_mode():
        for slot, prompt in zip((3, 0, 2), prompts, strict=True):
            solo_cache = model.new_kv_cache(1)
            model.fill_cache(prompt[None, :-1], solo_cache, 0)
            solo_logits.append(model.next_token_logits(prompt[None, -1:], solo_cache, len(prompt) - 1)[0])
            model.fill_cache(prompt[None, :-1], batch_cache, 0, [slot])
        last = torch.stack([prompt[-1:] for prompt in prompts])
        positions = [len(prompt) - 1 for prompt in prompts]
        return solo_logits, model.next_token_logits(last, batch_cache, positions, [3, 0, 2])


@pytest.mark.parametrize("prompt_length", [63, 64])
def test_a_batched_row_shifts_its_context_exactly_where_generate_does(int8_model, prompt_length):
    """Rows decoded together well past the 64-token context (each shift keeps the last half and goes on), token
    for token against generate(): a row shifting one token early or late writes other tokens from there, and a
    repetition penalty reads the same window in both."""
    block_size = int8_model.config.block_size
    settings = [SamplingParams(0.0, seed=1), SamplingParams(0.9, top_k=40, seed=2),
                SamplingParams(0.0, seed=3, repetition_penalty=1.3)]  # fmt: skip
    requests = [(list(range(2000 + 1000 * i, 2000 + 1000 * i + prompt_length)), s) for i, s in enumerate(settings)]
    expected = [list(generate(int8_model, prompt, 2 * block_size, params=params)) for prompt, params in requests]
    with Scheduler(int8_model, max_batch=3) as scheduler:
        streams = [scheduler.generate(prompt, 2 * block_size, params) for prompt, params in requests]
        together = [[] for _ in requests]
        for _ in range(2 * block_size):  # read in step, so the two rows are decoded together throughout
            for tokens, stream in zip(together, streams, strict=True):
                tokens.append(next(stream))
    assert together == expected


def test_rows_logits_are_bit_identical_to_a_batch_of_one(int8_model):
    """next_token_logits for rows at their own positions and cache slots equals each row run alone: the
    kernels and the attention never mix rows (a batch-wide int8 input range would move them ~1e-2)."""
    solo_logits, together = batch_and_solo_logits(int8_model)
    for row, logits in enumerate(solo_logits):
        assert torch.equal(together[row], logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_rows_match_a_batch_of_one_within_rounding_in_float_precisions(dtype, perturb, make_varied):
    """The path a GPU serves (bf16, plain Linear layers; never run on one here) and fp32: batched rows are
    not bit-identical to a row alone (other kernels for other shapes), but only rounding apart; a row that
    read another row's slot or position would be off by whole logits."""
    torch.manual_seed(0)
    model = make_varied(perturb(GPT(GPTConfig.from_preset("tiny")))).to(dtype).eval()
    solo_logits, together = batch_and_solo_logits(model)
    spread = torch.stack(solo_logits).float().std()
    for row, logits in enumerate(solo_logits):
        assert (together[row].float() - logits.float()).abs().max() < 0.02 * spread, row


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode(int8_model, monkeypatch):
    """While a prompt of three chunks is prefilled, a running row gets a token at every step; the prompt's
    first token comes with its last chunk."""
    monkeypatch.setattr(sampling_module, "PREFILL_CHUNK", 8)
    batch = DecodeBatch(int8_model, 4)
    running = batch.add([1, 2, 3], 50, SamplingParams(0.0, seed=0))
    assert [row for row, _ in batch.next_tokens()] == [running]  # a short prompt: prefilled and sampled at once
    batch.advance()
    joining = batch.add(list(range(100, 120)), 5, SamplingParams(0.0, seed=0))
    steps = []
    for _ in range(4):
        steps.append([row for row, _ in batch.next_tokens()])
        batch.advance()
    assert steps == [[running], [running], [running, joining], [running, joining]]
    assert (joining.position, running.position) == (20 + 2, 3 + 5)  # prompt + each token sampled, run after
    # two prompts: the one with less left to prefill goes first, though it came later
    older = batch.add(list(range(200, 217)), 5, SamplingParams(0.0, seed=0))  # three chunks of 8, 8, 1
    newer = batch.add(list(range(300, 309)), 5, SamplingParams(0.0, seed=0))  # two chunks
    firsts = []
    for _ in range(5):
        firsts += [row for row, _ in batch.next_tokens() if row in (older, newer) and row.new_tokens == 1]
        batch.advance()
    assert firsts == [newer, older]


def fake_costs(model, monkeypatch, seconds_per_token: float) -> list[float]:
    """A clock that only the model moves: each call costs seconds_per_token per token it runs (a prompt chunk
    of T tokens T times a decoding row's token), so the prefill schedule is the same on any machine."""
    now = [0.0]
    for name in ("next_token_logits", "fill_cache"):
        original = getattr(model, name)

        def costed(idx, *args, original=original):
            now[0] += seconds_per_token * idx.shape[1]
            return original(idx, *args)

        monkeypatch.setattr(model, name, costed)
    return now


def batch_with_a_decoding_row(model, monkeypatch):
    """A batch on the fake clock (chunks of 8, prompts of up to 4 tokens short) with one row decoding."""
    monkeypatch.setattr(sampling_module, "PREFILL_CHUNK", 8)
    monkeypatch.setattr(DecodeBatch, "SHORT_PREFILL", 4)
    now = fake_costs(model, monkeypatch, 0.01)
    batch = DecodeBatch(model, 4, clock=lambda: now[0])
    running = batch.add([1, 2, 3], 60, SamplingParams(0.0, seed=0))
    batch.next_tokens()
    batch.advance()
    return batch, running, now


def test_a_long_prefill_takes_at_most_half_the_time_of_decoding_rows(int8_model, monkeypatch):
    """While rows decode, a long prompt's chunks take at most half of the time: after a chunk of 8 tokens, the
    next 8 one-token steps decode only; the decoding row keeps at least half its rate, and the prompt still
    gets through."""
    batch, running, now = batch_with_a_decoding_row(int8_model, monkeypatch)
    long = batch.add(list(range(100, 124)), 5, SamplingParams(0.0, seed=0))  # three chunks of 8
    chunks_at, running_tokens, start = [], 0, now[0]
    for step in range(30):
        pending = len(long.pending)
        running_tokens += sum(row is running for row, _ in batch.next_tokens())
        chunks_at += [step] if len(long.pending) < pending else []
        batch.advance()
    assert chunks_at == [0, 8, 16]  # each chunk (0.08 s) paid back by eight decoding steps (0.01 s each), its own too
    assert long.new_tokens >= 1
    assert running_tokens / (now[0] - start) >= 0.5 / 0.01  # at least half of one token per 0.01 s


def test_a_short_prompt_is_prefilled_at_once_behind_a_long_one(int8_model, monkeypatch):
    """A short prompt that arrives while a long one is being prefilled (and decoding rows are owed time) gets its
    first token at the next step."""
    batch, running, now = batch_with_a_decoding_row(int8_model, monkeypatch)
    long = batch.add(list(range(100, 140)), 5, SamplingParams(0.0, seed=0))
    batch.next_tokens()  # its first chunk: now the decoding row is owed 0.08 s
    batch.advance()
    assert batch.prefill_debt > 0 and long.pending
    short = batch.add([7, 8, 9], 5, SamplingParams(0.0, seed=0))
    assert {row for row, _ in batch.next_tokens()} == {running, short}
    assert len(long.pending) == 40 - 8  # the long prompt waits its turn


def test_with_nobody_decoding_a_long_prompt_is_prefilled_chunk_after_chunk(int8_model, monkeypatch):
    """Prefill owes time only to decoding rows: alone, a long prompt runs a chunk at every step."""
    monkeypatch.setattr(sampling_module, "PREFILL_CHUNK", 8)
    monkeypatch.setattr(DecodeBatch, "SHORT_PREFILL", 4)
    now = fake_costs(int8_model, monkeypatch, 0.01)
    batch = DecodeBatch(int8_model, 4, clock=lambda: now[0])
    long = batch.add(list(range(100, 124)), 5, SamplingParams(0.0, seed=0))
    sampled = [batch.next_tokens() for _ in range(3)]
    assert [len(rows) for rows in sampled] == [0, 0, 1] and batch.prefill_debt == 0 and long.new_tokens == 1


def test_finished_and_removed_rows_free_their_slots(int8_model):
    batch = DecodeBatch(int8_model, 2)
    first = batch.add([5], 1, SamplingParams(0.0, seed=0))
    second = batch.add([6], 10, SamplingParams(0.0, seed=0))
    assert batch.full
    with pytest.raises(RuntimeError, match="full"):
        batch.add([7], 1, SamplingParams(0.0, seed=0))
    while not first.done:
        batch.next_tokens()
        batch.advance()
    assert first.new_tokens == 1 and len(batch) == 1 and not batch.full
    batch.remove(second)
    assert len(batch) == 0 and second.done
    third = batch.add([7], 1, SamplingParams(0.0, seed=0))
    assert third.slot == 0


def test_a_closed_stream_leaves_at_the_next_step(int8_model, monkeypatch, slow_steps, wait_until):
    """Closing a request's tokens (its reader went away) takes its row out within a step or two, long
    before its 200 tokens would have ended; then the scheduler is idle, not stepping an empty batch."""
    slow_steps(0.02)
    with Scheduler(int8_model, max_batch=4) as scheduler:
        stream = scheduler.generate([1, 2, 3], 200, SamplingParams(0.0, seed=0))
        next(stream)
        assert scheduler.running == 1
        stream.close()
        assert wait_until(lambda: scheduler.running == 0, seconds=0.5)
        with pytest.raises(StopIteration):
            next(stream)
        steps = []
        monkeypatch.setattr(DecodeBatch, "next_tokens", lambda self: steps.append(1) or [])
        time.sleep(0.2)
        assert steps == []


def test_requests_beyond_the_batch_wait_in_order(int8_model):
    with Scheduler(int8_model, max_batch=1) as scheduler:
        first = scheduler.generate([1], 10_000, SamplingParams(0.0, seed=0))
        second = scheduler.generate([2], 3, SamplingParams(0.0, seed=0))
        next(first)
        assert (scheduler.running, scheduler.waiting) == (1, 1)
        first.close()
        assert len(list(second)) == 3


def failing_step(batch: DecodeBatch) -> None:
    """DecodeBatch.advance as a step that runs out of memory."""
    raise MemoryError("out of memory")


def test_a_failed_step_ends_its_requests_with_an_error_and_serving_goes_on(int8_model, monkeypatch, caplog):
    with Scheduler(int8_model, max_batch=2) as scheduler:
        original = DecodeBatch.advance
        monkeypatch.setattr(DecodeBatch, "advance", failing_step)
        with pytest.raises(RuntimeError, match="generation failed: out of memory"):
            list(scheduler.generate([1, 2], 5, SamplingParams(0.0, seed=0)))
        assert "a decoding step failed; ending the 1 requests in it" in caplog.messages
        monkeypatch.setattr(DecodeBatch, "advance", original)
        assert len(list(scheduler.generate([1, 2], 5, SamplingParams(0.0, seed=0)))) == 5


def test_closing_the_scheduler_ends_what_waits(int8_model):
    scheduler = Scheduler(int8_model, max_batch=1).start()
    running = scheduler.generate([1], 10_000, SamplingParams(0.0, seed=0))
    waiting = scheduler.generate([2], 5, SamplingParams(0.0, seed=0))
    next(running)
    scheduler.close()
    for stream in (running, waiting):
        with pytest.raises(RuntimeError, match="^the server is shutting down$"):
            list(stream)
    with pytest.raises(RuntimeError, match="^the scheduler is closed$"):
        scheduler.generate([1], 1, SamplingParams(0.0, seed=0))


@pytest.mark.parametrize("max_batch", [0, -1, 2.0, True])
def test_max_batch_must_be_a_whole_number(int8_model, max_batch):
    with pytest.raises(ValueError, match="max_batch"):
        Scheduler(int8_model, max_batch)


def test_prefill_chunk_is_what_the_step_runs(int8_model, monkeypatch):
    """A prompt of n tokens takes ceil(n / PREFILL_CHUNK) forward passes before its first token, and only
    the last of them runs the output head."""
    monkeypatch.setattr(sampling_module, "PREFILL_CHUNK", 4)
    calls = []

    def recording(name):
        original = getattr(int8_model, name)
        return lambda idx, *args: calls.append((name, idx.shape)) or original(idx, *args)

    for name in ("next_token_logits", "fill_cache"):
        monkeypatch.setattr(int8_model, name, recording(name))
    assert len(list(generate(int8_model, list(range(10)), 1, temperature=0))) == 1
    assert calls == [("fill_cache", (1, 4)), ("fill_cache", (1, 4)), ("next_token_logits", (1, 2))]


def test_a_request_needs_a_prompt_and_a_new_token(int8_model):
    with Scheduler(int8_model) as scheduler:
        for prompt, new_tokens in (([], 5), ([1, 2], 0)):
            with pytest.raises(ValueError, match="^a request needs a prompt and at least one new token$"):
                scheduler.generate(prompt, new_tokens, SamplingParams(0.0, seed=0))
        assert (scheduler.running, scheduler.waiting) == (0, 0)


def next_from_a_thread(stream, seconds: float = 10.0):
    """next(stream, None) read on a thread of its own: what it gave, or "still waiting" after seconds."""
    got = ["still waiting"]
    reader = threading.Thread(target=lambda: got.__setitem__(0, next(stream, None)), daemon=True)
    reader.start()
    reader.join(timeout=seconds)
    return got[0]


def test_a_stream_read_past_its_end_or_its_error_stops_at_once(int8_model, monkeypatch):
    """A reader that asks again after the last token (or after the error) gets StopIteration, not a wait
    for tokens that never come."""
    with Scheduler(int8_model, max_batch=2) as scheduler:
        finished = scheduler.generate([1, 2], 3, SamplingParams(0.0, seed=0))
        assert len(list(finished)) == 3
        assert next_from_a_thread(finished) is None
        monkeypatch.setattr(DecodeBatch, "advance", failing_step)
        failed = scheduler.generate([1, 2], 3, SamplingParams(0.0, seed=0))
        with pytest.raises(RuntimeError, match="out of memory"):
            list(failed)
        assert next_from_a_thread(failed) is None


def test_close_returns_once_the_decoding_thread_has_ended(int8_model):
    def decoding_threads() -> int:
        return [thread.name for thread in threading.enumerate()].count("batched-decoding")

    before = decoding_threads()
    scheduler = Scheduler(int8_model, max_batch=1).start()
    next(scheduler.generate([1], 10_000, SamplingParams(0.0, seed=0)))
    assert decoding_threads() == before + 1
    scheduler.close()
    assert decoding_threads() == before


def test_run_on_the_callers_thread_ends_when_another_thread_closes_it(int8_model):
    """The app runs the decoding on its main thread (run()) and stops it from another (close())."""
    scheduler = Scheduler(int8_model, max_batch=1)
    stream = scheduler.generate([1], 10_000, SamplingParams(0.0, seed=0))
    closed = []
    closer = threading.Thread(target=lambda: (next(stream), scheduler.close(), closed.append(True)), daemon=True)
    closer.start()
    scheduler.run()  # returns once closed
    closer.join(timeout=10)
    assert closed == [True]
    with pytest.raises(RuntimeError, match="^the server is shutting down$"):
        list(stream)


def test_a_program_that_never_closes_its_scheduler_still_exits(tmp_path, root):
    """The decoding thread is a daemon: a script that forgets close() ends when its main thread does."""
    script = tmp_path / "forgets_close.py"
    script.write_text(
        "import torch\nfrom model import GPT, GPTConfig, SamplingParams\nfrom serve import Scheduler\n"
        "scheduler = Scheduler(GPT(GPTConfig.from_preset('tiny'))).start()\n"
        "print(len(list(scheduler.generate([1], 3, SamplingParams(0.0, seed=0)))))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(root)}  # this tree's packages, whatever is installed
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env)
    assert (done.returncode, done.stdout) == (0, "3\n"), done.stderr
