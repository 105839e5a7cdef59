"""serve/native.py and serve/int8_kernel.cpp: this project's int8 kernel gives fbgemm's bits on every path the CPU
has, for any number of rows; Int8Linear and a whole model switch to it without changing a token; it is built
once and cached; without a compiler (or with its instructions taken away) fbgemm keeps serving, with one line."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from model import GPT, GPTConfig, generate
from model.device import OVERRIDE, SIMD_LEVELS, capabilities
from model.gpt import DecodeRows
from serve import native
from serve.inference import int8_supported
from serve.kernels import Int8Linear, quantize_int8

pytestmark = pytest.mark.skipif(
    not int8_supported() or capabilities().simd is None, reason="needs fbgemm's int8 Linear and AVX2"
)
FBGEMM = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32.default
# the kernel's paths this CPU can run: AVX2 everywhere here, AVX-512 VNNI where the CPU has it
PATHS = [native.SIMD[level] for level in SIMD_LEVELS[1 : SIMD_LEVELS.index(capabilities().simd) + 1]]


@pytest.fixture(scope="module")
def loaded():
    assert native.load(), native.failure()


def fbgemm(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    return FBGEMM(x, layer.INPUT_SCALE, layer.INPUT_ZERO_POINT, layer._packed)


def scaled_rows(rows: int, width: int, seed: int) -> torch.Tensor:
    """Rows scaled to max |x| = 1, as Int8Linear hands them on, with values on the quantiser's rounding ties."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=generator)
    x[:, : width // 4] = (torch.randint(-63, 63, (rows, width // 4), generator=generator) + 0.5) / 63
    x[:, -1] = 0.0
    return x / x.abs().amax(dim=-1, keepdim=True)


SHAPES = [(48, 64), (37, 21), (16, 4), (5, 130), (40, 96)]  # (out, in): tiles and groups filled or not


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("out_features, in_features", SHAPES)
def test_the_kernel_gives_fbgemms_bits_for_any_rows_and_shape(loaded, path, out_features, in_features):
    """The int8 product alone, on rows already scaled; 1-20 rows (past a pass's 8, and past MOST_ROWS)."""
    generator = torch.Generator().manual_seed(out_features)
    weight = torch.randn(out_features, in_features, generator=generator) * torch.logspace(-3, 0, in_features)
    layer = Int8Linear(weight, None)
    for rows in (1, 2, 3, 7, 8, 9, 16, 20):
        x = scaled_rows(rows, in_features, seed=rows)
        assert torch.equal(layer.through(x, path), fbgemm(layer, x)), rows


@pytest.mark.parametrize("path", [0, *PATHS])
@pytest.mark.parametrize("out_features, in_features", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_the_kernel_is_int8_linears_whole_forward_pass_bit_for_bit(loaded, monkeypatch, path, out_features,
                                                                  in_features, with_bias):  # fmt: skip
    """Row scaling, the product and the bias (which torch's addcmul adds with one rounding) in one call, on raw
    rows of any size, zero rows and a leading batch shape included, as the eager torch ops compute them; path 0
    wraps fbgemm's kernel, the others are this project's."""
    generator = torch.Generator().manual_seed(in_features)
    weight = torch.randn(out_features, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator) if with_bias else None
    layer = Int8Linear(weight, bias)
    x = torch.randn(3, 4, in_features, generator=generator) * torch.logspace(-4, 3, 4)[None, :, None]
    x[1, 2] = 0.0
    monkeypatch.setattr(native._BUILD, "path", None)  # the eager torch ops around fbgemm
    expected = layer(x)
    assert torch.equal(layer.through(x, path), expected)


@pytest.mark.parametrize("path", PATHS)
def test_a_rows_result_does_not_depend_on_its_batch_mates(loaded, path):
    layer = Int8Linear(torch.randn(40, 96), None)
    x = scaled_rows(13, 96, seed=1)
    together = layer.through(x, path)
    for i in (0, 7, 12):
        assert torch.equal(layer.through(x[i : i + 1], path)[0], together[i])


def test_calls_of_a_few_rows_take_the_kernel_and_longer_ones_fbgemm(loaded):
    path = native.SIMD[capabilities().simd]
    chosen = torch.ops.shakespeare_native.chosen_path
    assert [chosen(rows) for rows in (1, native.MOST_ROWS[path], native.MOST_ROWS[path] + 1, 128)] == [path, path, 0, 0]


def test_a_model_decodes_the_same_tokens_on_the_kernel_as_on_fbgemm(loaded, monkeypatch, perturb):
    torch.manual_seed(0)
    model = quantize_int8(perturb(GPT(GPTConfig(block_size=32, vocab_size=97, n_layer=2, n_head=2, n_embd=32))))
    tokens = {}
    for name, path in (("kernel", native._BUILD.path), ("fbgemm", None)):  # None: the torch ops around fbgemm
        monkeypatch.setattr(native._BUILD, "path", path)
        tokens[name] = list(generate(model, [1, 2, 3], 40, temperature=1.0, seed=5))
        logits = model(torch.tensor([[4, 5, 6]]))[0]
        tokens[name + " logits"] = logits
    assert tokens["kernel"] == tokens["fbgemm"]
    assert torch.equal(tokens["kernel logits"], tokens["fbgemm logits"])


def a_cache(head_size: int, slots: int = 3, heads: int = 2, context: int = 40, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    keys, values = (torch.randn(slots, heads, context, head_size, generator=generator) for _ in range(2))
    return keys, values, torch.randn(4, heads, head_size, generator=generator)


@pytest.mark.parametrize("head_size", [64, 16])  # GPT-2's, with the output held in registers, and any other
def test_the_attention_kernel_is_each_rows_softmax_attention_over_its_own_positions(loaded, head_size):
    keys, values, q = a_cache(head_size)
    slots, positions, scale = torch.tensor([2, 0, 1, 0]), torch.tensor([39, 0, 17, 5]), head_size**-0.5
    y = torch.ops.shakespeare_native.attend(q, keys, values, slots, positions, scale)
    for b, (slot, position) in enumerate(zip(slots.tolist(), positions.tolist(), strict=True)):
        seen = slice(0, position + 1)
        weights = ((keys[slot, :, seen] @ q[b, :, :, None])[..., 0] * scale).softmax(-1)  # (heads, positions)
        assert torch.allclose(y[b], (weights[..., None] * values[slot, :, seen]).sum(1), atol=1e-6, rtol=1e-5), b
    # positions past a row's own are never read: changing them changes nothing
    keys[0, :, 6:], values[0, :, 6:] = float("nan"), float("nan")
    assert torch.equal(torch.ops.shakespeare_native.attend(q[3:], keys, values, slots[3:], positions[3:], scale), y[3:])


def test_the_attention_kernels_rows_do_not_depend_on_their_batch_mates(loaded):
    keys, values, q = a_cache(64, seed=1)
    slots, positions = torch.tensor([1, 2, 0, 1]), torch.tensor([3, 39, 20, 3])
    together = torch.ops.shakespeare_native.attend(q, keys, values, slots, positions, 0.125)
    for b in range(4):
        alone = torch.ops.shakespeare_native.attend(
            q[b : b + 1], keys, values, slots[b : b + 1], positions[b : b + 1], 0.125
        )
        assert torch.equal(alone[0], together[b]), b


def test_the_attention_kernel_refuses_what_it_cannot_read(loaded):
    keys, values, q = a_cache(64)
    with pytest.raises(RuntimeError, match="position 40 is outside the cache"):
        torch.ops.shakespeare_native.attend(q[:1], keys, values, torch.tensor([0]), torch.tensor([40]), 0.125)
    with pytest.raises(RuntimeError, match="slot 3 or position 0 is outside the cache"):
        torch.ops.shakespeare_native.attend(q[:1], keys, values, torch.tensor([3]), torch.tensor([0]), 0.125)
    keys, values, q = a_cache(12)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        torch.ops.shakespeare_native.attend(q[:1], keys, values, torch.tensor([0]), torch.tensor([0]), 0.125)


def test_a_models_decoding_step_attends_with_the_kernel_row_by_row(loaded, perturb):
    """GPT.decode_step with the library's attention: the same logits within rounding as the model's own batched
    attention, and each row's logits bit-identical alone and beside rows of other lengths and slots."""
    torch.manual_seed(0)
    model = quantize_int8(perturb(GPT(GPTConfig(block_size=160, vocab_size=97, n_layer=2, n_head=2, n_embd=128))))
    cache = model.new_kv_cache(3)
    with torch.inference_mode():
        for slot, length in ((0, 3), (1, 70), (2, 140)):
            model.fill_cache(torch.randint(0, 97, (1, length)), cache, 0, [slot])

        def logits(rows: list[int], attend=None) -> torch.Tensor:
            scratch = [t.clone() for t in cache.keys], [t.clone() for t in cache.values]
            positions = [(3, 70, 140)[row] for row in rows]
            decode_rows = DecodeRows.of(rows, positions, model.config.block_size, "cpu")
            return model.decode_step(torch.tensor([7] * len(rows)), *scratch, decode_rows, attend)

        kernel = torch.ops.shakespeare_native.attend
        together, own = logits([2, 0, 1], kernel), logits([2, 0, 1])
        assert torch.allclose(together, own, atol=1e-4 * own.std().item(), rtol=0)
        for i, row in enumerate([2, 0, 1]):
            assert torch.equal(logits([row], kernel)[0], together[i]), row


def in_a_new_process(code: str, env: dict) -> str:
    """What code prints in a fresh Python (the library loads once per process), with env added."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=os.environ | env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


LOAD = """
    import logging
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch
    from serve import native
    loaded = native.load()
    print("loaded", loaded, "path", torch.ops.shakespeare_native.chosen_path(1) if loaded else None)
"""


def test_the_kernel_is_built_once_then_loaded_from_the_cache(tmp_path):
    env = {"SHAKESPEARE_CACHE": str(tmp_path), OVERRIDE: ""}
    first = in_a_new_process(LOAD, env)
    assert "loaded True" in first and "built the int8 kernel into" in first
    (library,) = tmp_path.glob("int8_kernel-*.so")
    assert not list(tmp_path.glob("*.tmp"))
    again = in_a_new_process(LOAD, env | {"CXX": "/nonexistent/c++"})  # no compiler needed once cached
    assert "loaded True" in again and "built" not in again


def test_without_a_compiler_fbgemm_serves_and_one_line_says_why(tmp_path):
    env = {"SHAKESPEARE_CACHE": str(tmp_path), "CXX": "/bin/false", OVERRIDE: ""}
    out = in_a_new_process(LOAD + "    print('again', native.load())\n", env)
    assert "loaded False path None" in out and "again False" in out
    assert out.count("own int8 kernel unavailable, int8 layers stay on fbgemm (compiling int8_kernel.cpp failed") == 1
    assert not list(tmp_path.iterdir())  # nothing half-built left behind


@pytest.mark.parametrize("level", SIMD_LEVELS[: SIMD_LEVELS.index(capabilities().simd) + 1])
def test_the_override_picks_the_path_and_none_keeps_fbgemm(level):
    out = in_a_new_process(LOAD, {OVERRIDE: f"simd={level}"})
    expected = "loaded False path None" if level == "none" else f"loaded True path {native.SIMD[level]}"
    assert expected in out
