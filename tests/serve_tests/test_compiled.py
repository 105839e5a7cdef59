"""The batched decoding step (GPT.decode_step) and its compiled form (serve.CompiledDecoding): the same
logits as the eager step within rounding, every row bit-identical alone and beside rows at other positions,
the scheduler's seeded answers equal to generate()'s, and a compiler that fails leaves decoding eager."""

import logging
import threading

import pytest
import torch

from model import GPT, GPTConfig, SamplingParams, generate
from model.gpt import ATTENTION_BLOCK, DecodeRows
from serve import CompiledDecoding, Scheduler, batching, native
from serve.inference import int8_supported
from serve.kernels import quantize_int8

# a context of three attention blocks, so rows of one step read different numbers of blocks
CONFIG = GPTConfig.from_preset("tiny", block_size=3 * ATTENTION_BLOCK)
PROMPTS = {
    0: [5, 6, 7],
    1: list(range(100, 100 + ATTENTION_BLOCK + 9)),
    2: list(range(300, 300 + 2 * ATTENTION_BLOCK + 20)),
}


@pytest.fixture(scope="module")
def int8_model(perturb, make_varied):
    if not int8_supported():
        pytest.skip("the served CPU path is int8 (fbgemm), which this PyTorch build lacks")
    torch.manual_seed(0)
    return quantize_int8(make_varied(perturb(GPT(CONFIG))))


@pytest.fixture(scope="module")
def compiled(int8_model):
    """The int8 model's decoding step compiled once (about 30 s on a 2-core CPU), handed to no decoder yet, with
    this project's library loaded first where the CPU can run it, as the app has it by then."""
    native.load()
    decoding = CompiledDecoding(int8_model)
    assert decoding.compile(), decoding.failed
    return decoding


def prefilled(model: GPT, slots: list[int]):
    """A cache of 4 slots with PROMPTS[i] (all but its last token) in slots[i]; each row's last token and position."""
    cache = model.new_kv_cache(4)
    with torch.inference_mode():
        for i, slot in enumerate(slots):
            model.fill_cache(torch.tensor([PROMPTS[i][:-1]]), cache, 0, [slot])
    return cache, [PROMPTS[i][-1] for i in range(len(slots))], [len(PROMPTS[i]) - 1 for i in range(len(slots))]


def step(next_token_logits, model: GPT, rows: list[int], slots=(3, 0, 2)) -> list[torch.Tensor]:
    """Next logits of the prompts `rows`, run as one call at their own slots and positions of a fresh cache."""
    cache, last, positions = prefilled(model, list(slots))
    with torch.inference_mode():
        logits = next_token_logits(
            torch.tensor([[last[i]] for i in rows]), cache, [positions[i] for i in rows], [slots[i] for i in rows]
        )
    return list(logits)


def alone_and_together(next_token_logits, model: GPT) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return [step(next_token_logits, model, [i])[0] for i in range(3)], step(next_token_logits, model, [0, 1, 2])


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_the_eager_batched_step_matches_the_row_by_row_step(precision, int8_model, perturb, make_varied):
    """GPT.decode_step without a compiler: three rows reading one, two and three blocks of their cache give
    the row-by-row path's logits within rounding, and with int8 Linear layers (batch-invariant kernels)
    each row's logits alone, bit for bit."""
    if precision == "int8":
        model = int8_model
    else:
        torch.manual_seed(0)
        model = make_varied(perturb(GPT(CONFIG))).eval()

    def batched(idx, cache, positions, slots):
        rows = DecodeRows.of(slots, positions, CONFIG.block_size, idx.device)
        return model.decode_step(idx[:, 0], cache.keys, cache.values, rows)

    alone, together = alone_and_together(batched, model)
    reference = [step(model.next_token_logits, model, [i])[0] for i in range(3)]
    spread = torch.stack(reference).std()
    for row in range(3):
        assert (alone[row] - reference[row]).abs().max() < 1e-3 * spread, row
        assert (together[row] - reference[row]).abs().max() < 1e-3 * spread, row
        assert torch.equal(together[row], alone[row]) or precision == "fp32", row


@pytest.mark.slow
def test_the_compiled_step_matches_the_eager_one_and_is_bit_identical_per_row(int8_model, compiled):
    alone, together = alone_and_together(compiled.next_token_logits, int8_model)
    eager = [step(int8_model.next_token_logits, int8_model, [i])[0] for i in range(3)]
    spread = torch.stack(eager).std()
    for row in range(3):
        assert torch.equal(together[row], alone[row]), row
        assert (alone[row] - eager[row]).abs().max() < 1e-3 * spread, row
    with torch.inference_mode():  # longer calls (prompt chunks) are not the compiled step's: they stay eager
        cache = int8_model.new_kv_cache(1)
        chunk = torch.tensor([PROMPTS[1]])
        assert torch.equal(compiled.next_token_logits(chunk, cache, 0), int8_model.next_token_logits(chunk, cache, 0))


@pytest.mark.slow
def test_the_compiled_step_attends_with_the_librarys_kernel_where_it_loaded(int8_model, compiled):
    if not native.ready():
        pytest.skip("this project's library needs AVX2 and a C++ compiler")
    with torch.profiler.profile() as profile:
        step(compiled.next_token_logits, int8_model, [0, 1, 2])
    calls = [event.name for event in profile.events()]
    assert calls.count("shakespeare_native::attend") == CONFIG.n_layer


def test_the_step_attends_with_the_library_in_fp32_and_with_its_own_batched_attention_otherwise(monkeypatch, perturb):
    if not native.load():
        pytest.skip("this project's library needs AVX2 and a C++ compiler")
    monkeypatch.setattr(torch, "compile", lambda step, **options: step)  # what compile() hands the compiler
    for dtype, attend in ((torch.float32, torch.ops.shakespeare_native.attend), (torch.bfloat16, None)):
        torch.manual_seed(0)
        decoding = CompiledDecoding(perturb(GPT(CONFIG)).to(dtype).eval())
        assert decoding.compile(), decoding.failed
        assert decoding._step.keywords["attend"] is attend, dtype
    # where the library is not loaded (no compiler, a CPU without AVX2 and FMA, simd=none), fp32 keeps its own too
    monkeypatch.setattr(native._BUILD, "path", None)
    decoding = CompiledDecoding(perturb(GPT(CONFIG)).eval())
    assert decoding.compile(), decoding.failed
    assert decoding._step.keywords["attend"] is None


@pytest.mark.slow
def test_the_scheduler_switches_between_requests_and_a_seeded_answer_is_the_same_alone_and_together(
    int8_model, compiled
):
    """A scheduler given the compiled step hands it to its decoder before its first request (the model's own
    step untouched); then each seeded request gives generate()'s tokens with the same step, though they run
    together."""
    requests = [(PROMPTS[i], 30, SamplingParams(0.9, top_k=20, seed=i)) for i in range(3)]
    eager_first = list(generate(int8_model, *requests[2][:2], params=requests[2][2]))
    eager = int8_model.next_token_logits
    with Scheduler(int8_model, max_batch=4, compiled=compiled) as scheduler:
        streams = [scheduler.generate(*request) for request in requests]
        together = [list(stream) for stream in streams]
        assert scheduler._batch.step == compiled.next_token_logits  # handed to the decoder
    assert int8_model.next_token_logits == eager
    step = compiled.next_token_logits
    alone = [list(generate(int8_model, prompt, n, params=params, step=step)) for prompt, n, params in requests]
    assert together == alone
    assert eager_first[:5] == alone[2][:5]  # rounding apart: the same first tokens, not necessarily all


def test_a_compiler_that_fails_leaves_decoding_eager_with_one_log_line(monkeypatch, caplog, perturb):
    torch.manual_seed(0)
    model = perturb(GPT(GPTConfig.from_preset("tiny"))).eval()
    eager = model.next_token_logits
    decoding = CompiledDecoding(model)

    def no_compiler(*args):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", lambda step, **options: no_compiler)  # Inductor fails on the first call
    with caplog.at_level(logging.INFO, logger="serve.compiled"):
        assert decoding.start().join(timeout=60) is None
    assert not decoding.ready.is_set()
    assert decoding.failed == "RuntimeError: InvalidCxxCompiler: No working C++ compiler found"
    assert [record.getMessage() for record in caplog.records] == [
        f"compiled decoding unavailable, decoding stays eager ({decoding.failed})"
    ]
    with Scheduler(model, max_batch=2, compiled=decoding) as scheduler:
        assert len(list(scheduler.generate([1, 2], 3, SamplingParams(0.0)))) == 3
    assert model.next_token_logits == eager


def test_a_compiled_step_that_fails_while_serving_hands_back_to_eager(monkeypatch, caplog, perturb):
    """A compiled step that raises (an Inductor runtime error) gives the eager step's logits for that call,
    one log line, and the eager step for every call after."""
    torch.manual_seed(0)
    model = perturb(GPT(CONFIG)).eval()
    eager = model.next_token_logits
    decoding = CompiledDecoding(model)
    calls = []

    def broken(*args):
        calls.append(args)
        raise RuntimeError("CppCompileError: C++ compile error\nmore detail")

    monkeypatch.setattr(decoding, "_step", broken)
    expected = step(eager, model, [0, 1, 2])
    with caplog.at_level(logging.WARNING, logger="serve.compiled"):
        for _ in range(2):
            got = step(decoding.next_token_logits, model, [0, 1, 2])
            assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert len(calls) == 1 and decoding.failed is not None and model.next_token_logits == eager
    assert [record.getMessage() for record in caplog.records] == [
        "the compiled decoding step failed, decoding goes on eagerly (RuntimeError: CppCompileError: C++ compile error)"
    ]


class FakeCompile:
    """Stands in for CompiledDecoding's compiler to pin when the scheduler starts it and takes its step."""

    def __init__(self, batch_events: list[str], model: GPT) -> None:
        self.events, self.started, self.model = batch_events, False, model
        self.ready = threading.Event()

    def start(self, on_ready) -> None:
        self.started = True
        self.events.append("compile")
        self.ready.set()
        on_ready()

    @property
    def next_token_logits(self):
        self.events.append("install")
        return self.model.next_token_logits


def test_the_scheduler_compiles_only_once_idle_and_switches_only_between_requests(monkeypatch, wait_until):
    """A request that runs keeps the compiler waiting (it would take the interpreter lock from the decoding),
    and the compiled step is installed when no request runs."""
    monkeypatch.setattr(batching, "COMPILE_AFTER_IDLE", 0.3)
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny")).eval()
    events: list[str] = []
    compiler = FakeCompile(events, model)
    with Scheduler(model, max_batch=2, compiled=compiler) as scheduler:
        for _ in range(4):  # back-to-back requests, each shorter than the idle time
            events.append("request")
            assert len(list(scheduler.generate([1, 2], 5, SamplingParams(0.0)))) == 5
        assert "compile" not in events
        assert wait_until(lambda: "install" in events, seconds=5)
    assert events == ["request"] * 4 + ["compile", "install"]


def test_loading_a_model_and_getting_its_compiled_decoding_ready_leaves_the_compiler_unimported(tmp_path):
    """The compiler is seconds of imports on a small CPU: the app's start-up (loading the weights, building the
    model on the meta device, CompiledDecoding()) must not pay them; compile() does, on its own thread."""
    import subprocess
    import sys

    GPT(GPTConfig.from_preset("tiny")).save_pretrained(tmp_path)
    script = (
        "import sys, serve\n"
        f"model = serve.load_for_inference({str(tmp_path)!r})\n"
        "decoding = serve.CompiledDecoding(model)\n"
        "print(sorted(name for name in ('torch._dynamo', 'torch._inductor') if name in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]"]
