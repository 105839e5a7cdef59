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
