"""serve/inference.py: the precision chosen for serving, int8 and bf16 models that keep the fp32
model's predictions, and the CPU thread count."""

import json
import os

import pytest
import torch

from model import generate
from model.device import OVERRIDE, capabilities, cgroup_cpus
from serve import load_for_inference, native, precision_of
from serve.inference import cpu_threads, pick_precision
from serve.kernels import Int8Linear, PackedBF16Linear

PROMPT = [464, 3290, 373, 257]
IDS = torch.tensor([[50256, 464, 3290, 373, 257, 1332, 13, 15, 31373, 995, 50255, 0]])  # ends of the vocabulary too

CPU = torch.device("cpu")


@pytest.fixture
def saved(tiny_model, make_varied, tmp_path):
    return make_varied(tiny_model).save_pretrained(tmp_path / "saved")


def test_cpu_default_is_int8_weights_with_fp32_activations(saved):
    assert pick_precision(CPU) == (torch.float32, "int8")
    model = load_for_inference(saved, device="cpu")
    assert precision_of(model) == "float32+int8"
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears == [] and isinstance(model.lm_head, Int8Linear)
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 4 * model.config.n_layer + 1
    assert model.transformer.wte.weight.dtype == torch.float32
    assert model.num_parameters() == load_for_inference(saved, device="cpu", quantize="none").num_parameters()


# int8 quantises activations per call with one scale for the whole input, so a prefilled position
# differs slightly from the same position run alone: only bf16 matches recomputation token for token.
@pytest.mark.parametrize(
    "options, matches_recomputation",
    [(dict(quantize="int8"), False), (dict(dtype="bfloat16"), True)],
    ids=["int8", "bf16"],
)
def test_low_precision_keeps_the_predictions(saved, options, matches_recomputation, greedy_by_recomputation):
    reference = load_for_inference(saved, device="cpu", quantize="none")
    model = load_for_inference(saved, device="cpu", **options)
    with torch.no_grad():
        expected, got = (m(IDS)[0].float().log_softmax(-1) for m in (reference, model))
    divergence = torch.nn.functional.kl_div(got, expected, log_target=True, reduction="none").sum(-1)
    assert divergence.max() < 0.02  # nats per position
    greedy = list(generate(model, PROMPT, 20, temperature=0))
    assert len(greedy) == 20
    if matches_recomputation:
        assert greedy == greedy_by_recomputation(model, PROMPT, 20)
    assert len(list(generate(model, PROMPT, 20, temperature=0.8, top_k=50, seed=1))) == 20


@pytest.mark.skipif(
    not capabilities().onednn_bf16, reason="oneDNN's bf16 Linear needs AVX-512 (BW, VL, DQ), not on this CPU"
)
def test_bf16_on_the_cpu_runs_through_onednn_packed_layers(saved):
    model = load_for_inference(saved, device="cpu", dtype="bfloat16")
    assert precision_of(model) == "bfloat16" and isinstance(model.lm_head, PackedBF16Linear)
    assert not [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    x = torch.randn(1, 3, model.config.n_embd).to(torch.bfloat16)
    assert torch.equal(model.lm_head(x), torch.nn.functional.linear(x, model.transformer.wte.weight))


def test_bf16_without_onednn_runs_through_plain_linear_layers(saved, monkeypatch):
    monkeypatch.setenv(OVERRIDE, "onednn_bf16=no")  # a CPU without AVX-512: the branch every such CPU takes
    model = load_for_inference(saved, device="cpu", dtype="bfloat16")
    assert precision_of(model) == "bfloat16" and isinstance(model.lm_head, torch.nn.Linear)
    assert not [m for m in model.modules() if isinstance(m, PackedBF16Linear)]
    assert len(list(generate(model, PROMPT, 5, temperature=0))) == 5


def test_fp32_on_request_and_without_int8_kernels(saved, monkeypatch):
    model = load_for_inference(saved, device="cpu", quantize="none")
    assert precision_of(model) == "float32" and model.lm_head.weight is model.transformer.wte.weight
    assert pick_precision(CPU, dtype="bfloat16") == (torch.bfloat16, "none")
    monkeypatch.setenv(OVERRIDE, "int8=no")  # a PyTorch build without fbgemm
    assert pick_precision(CPU) == (torch.float32, "none")
    with pytest.raises(ValueError, match="no fbgemm int8 kernels; use --quantize none"):
        load_for_inference(saved, device="cpu", quantize="int8")


def test_a_bf16_checkpoint_loads_in_the_precision_asked_for(tiny_model, tmp_path):
    folder = tiny_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = load_for_inference(folder, device="cpu", quantize="none")
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(dtype="float8"), "dtype must be auto or one of"),
        (dict(quantize="int4"), "quantize must be auto or one of"),
        (dict(dtype="bfloat16", quantize="int8"), "use it with --dtype float32"),
    ],
)
def test_unknown_or_conflicting_precision_is_refused(saved, options, message):
    with pytest.raises(ValueError, match=message):
        load_for_inference(saved, device="cpu", **options)


def test_cpu_threads_are_the_cpus_this_process_may_use(monkeypatch):
    assert 1 <= cpu_threads() <= os.cpu_count()
    monkeypatch.setenv(OVERRIDE, "threads=3")
    assert cpu_threads() == 3


def test_a_cgroup_cpu_quota_caps_the_threads(tmp_path):
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "cpu.max").write_text("200000 100000\n")
    assert cgroup_cpus(tmp_path / "v2") == 2
    (tmp_path / "v2" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpus(tmp_path / "v2") is None
    (tmp_path / "v1" / "cpu").mkdir(parents=True)
    (tmp_path / "v1" / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    (tmp_path / "v1" / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpus(tmp_path / "v1") == 1
    (tmp_path / "v1" / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # v1's "no quota"
    assert cgroup_cpus(tmp_path / "v1") is None
    assert cgroup_cpus(tmp_path / "none") is None


def test_a_model_loaded_for_serving_refuses_to_save_an_incomplete_checkpoint(saved, tmp_path):
    model = load_for_inference(saved, device="cpu", quantize="int8")
    with pytest.raises(ValueError, match=r"(?s)cannot save: .*missing tensor transformer\.h\.0\.attn\.c_attn\.weight"):
        model.save_pretrained(tmp_path / "int8")
    assert not (tmp_path / "int8").exists()


@pytest.mark.parametrize(
    "machine, flags, expected",
    [
        ("simd=avx512_vnni", {}, "int8 weights, fp32 activations: the fastest batch-invariant path on every CPU "
         f"measured; decoding steps of up to {native.MOST_ROWS[2]} rows on this project's avx512_vnni int8 kernel"),
        ("simd=avx2", {}, f"decoding steps of up to {native.MOST_ROWS[1]} rows on this project's avx2 int8 kernel"),
        ("simd=none", {}, "every call on fbgemm's kernel (this project's needs AVX2 and FMA)"),
        ("int8=no", {}, "float32: this PyTorch build has no fbgemm int8 kernels"),
        ("", dict(quantize="none"), "float32, as --dtype auto --quantize none asked"),
    ],
)  # fmt: skip
def test_the_start_up_log_says_which_path_was_chosen_and_why(monkeypatch, machine, flags, expected):
    from serve import why_precision

    if (
        "avx512_vnni" in machine
        and capabilities().simd != "avx512_vnni"
        or "avx2" in machine
        and not capabilities().simd
    ):
        pytest.skip("the override may only take instructions away, and this CPU lacks them")
    if machine == "int8=no" or capabilities().int8:
        monkeypatch.setenv(OVERRIDE, machine)
        assert expected in why_precision(CPU, **flags)
