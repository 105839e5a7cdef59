"""model/device.py: the machine's capabilities, the one override that takes the other branch of every
machine-dependent choice, and the device chosen from them."""

import subprocess
import sys

import pytest
import torch

import model.device as device
from model.device import OVERRIDE, capabilities, fast_dtype, native_bf16, pick_device, probed


def test_without_an_override_the_capabilities_are_the_machines(monkeypatch):
    monkeypatch.delenv(OVERRIDE, raising=False)
    assert capabilities() == probed()
    assert probed().cuda == torch.cuda.is_available() and probed().threads >= 1


@pytest.mark.parametrize(
    "text, expected",
    [
        ("bf16=none", dict(bf16=None)),
        ("bf16=amx", dict(bf16="AMX")),
        (" BF16 = AVX512 , threads=3 ", dict(bf16="AVX-512 BF16", threads=3)),
        ("threads=1", dict(threads=1)),
        ("int8=no,onednn_bf16=0,cuda=false", dict(int8=False, onednn_bf16=False, cuda=False)),
        ("simd=none", dict(simd=None)),
    ],
)
def test_the_override_changes_only_what_it_names(monkeypatch, text, expected):
    monkeypatch.setenv(OVERRIDE, text)
    found = capabilities()
    for name, value in vars(probed()).items():
        assert getattr(found, name) == expected.get(name, value), name


@pytest.mark.parametrize(
    "text", ["bf16=yes", "threads=0", "threads=two", "gpu=no", "int8", "int8=maybe", "simd=avx512", "simd=yes"]
)
def test_an_override_that_cannot_be_read_says_what_it_takes(monkeypatch, text):
    monkeypatch.setenv(OVERRIDE, text)
    with pytest.raises(ValueError, match=rf"{OVERRIDE}: cannot read .*bf16=amx\|avx512\|none"):
        capabilities()


@pytest.mark.parametrize("name", ["int8", "onednn_bf16", "cuda"])
def test_the_override_cannot_claim_a_kernel_or_device_the_machine_lacks(monkeypatch, name):
    monkeypatch.setenv(OVERRIDE, f"{name}=no")  # taking away is always allowed
    assert getattr(capabilities(), name) is False
    monkeypatch.setenv(OVERRIDE, f"{name}=yes")
    if getattr(probed(), name):
        assert getattr(capabilities(), name) is True
    else:
        with pytest.raises(ValueError, match=f"claims {name}, which this machine does not have"):
            capabilities()


@pytest.mark.parametrize("found", ["avx512_vnni", "avx2", None])
def test_the_override_may_lower_the_int8_kernels_instructions_but_not_raise_them(monkeypatch, fresh_probe, found):
    monkeypatch.setattr(device, "_simd", lambda: found)
    probed.cache_clear()
    levels = ["none", "avx2", "avx512_vnni"]
    for level in levels:
        monkeypatch.setenv(OVERRIDE, f"simd={level}")
        if levels.index(level) <= levels.index(found or "none"):
            assert capabilities().simd == (None if level == "none" else level)
        else:
            with pytest.raises(ValueError, match=f"claims simd={level}, which this machine does not have"):
                capabilities()


def test_the_int8_kernels_instructions_are_read_from_the_cpu(monkeypatch, fresh_probe):
    for avx512, vnni, bw, avx2, fma, expected in [
        (True, True, True, True, True, "avx512_vnni"),
        (True, False, True, True, True, "avx2"),  # AVX-512 without VNNI (Skylake-SP): the AVX2 path
        (True, True, False, True, True, "avx2"),
        (False, False, False, True, True, "avx2"),
        (False, False, False, True, False, None),  # the kernel rounds with FMA, as torch does
        (True, True, True, True, False, None),
        (False, False, False, False, True, None),
    ]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda v=avx512: v)
        monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda v=vnni: v)
        monkeypatch.setattr(torch.cpu, "_is_avx2_supported", lambda v=avx2: v)
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda bw=bw, fma=fma: {"avx512_bw": bw, "fma3": fma})
        probed.cache_clear()
        assert probed().simd == expected


def test_without_cuda_auto_is_the_cpu_and_cuda_is_refused(monkeypatch):
    monkeypatch.setenv(OVERRIDE, "cuda=no")
    assert pick_device("auto") == pick_device() == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU is visible; use cpu"):
        pick_device("cuda")


def test_the_override_reaches_a_process_started_from_this_one(monkeypatch):
    monkeypatch.setenv(OVERRIDE, "bf16=amx,threads=5")
    code = "from model.device import capabilities; c = capabilities(); print(c.bf16, c.threads)"
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert printed.split() == ["AMX", "5"]


@pytest.fixture
def fresh_probe(monkeypatch):
    """probed() read afresh (it is cached per process) with no override; the machine's own answer again after."""
    monkeypatch.delenv(OVERRIDE, raising=False)
    probed.cache_clear()
    yield
    monkeypatch.undo()
    probed.cache_clear()


def test_native_bf16_reads_the_cpus_features(monkeypatch, fresh_probe):
    monkeypatch.delenv("SHAKESPEARE_MACHINE", raising=False)
    for amx, avx512_bf16, expected in [(True, True, "AMX"), (False, True, "AVX-512 BF16"), (False, False, None)]:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda avx=avx512_bf16: avx)
        probed.cache_clear()
        assert native_bf16() == expected
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")  # a torch without the probes: no claim of bf16
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    probed.cache_clear()
    assert native_bf16() is None
    monkeypatch.undo()
    probed.cache_clear()  # the machine's own answer again, for the tests after this one


@pytest.mark.parametrize("affinity, quota, expected", [({0, 1, 2, 3}, None, 4), ({0, 1, 2, 3}, 2, 2), ({5}, 8, 1)])
def test_threads_are_the_affinity_capped_by_the_cgroup_quota(monkeypatch, fresh_probe, affinity, quota, expected):
    monkeypatch.setattr(device.os, "sched_getaffinity", lambda pid: affinity)
    monkeypatch.setattr(device, "cgroup_cpus", lambda: quota)
    assert probed().threads == expected


def test_the_kernels_are_offered_only_where_the_build_has_them(monkeypatch, fresh_probe):
    truth = (probed().int8, probed().onednn_bf16)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    probed.cache_clear()
    assert probed().onednn_bf16 is False and probed().int8 == truth[0]
    monkeypatch.undo()
    monkeypatch.delenv(OVERRIDE, raising=False)
    monkeypatch.setattr(type(torch.backends.quantized), "supported_engines", property(lambda self: ["none"]))
    probed.cache_clear()
    assert probed().int8 is False and probed().onednn_bf16 == truth[1]


def test_with_a_gpu_auto_is_cuda_at_the_index_asked_and_its_dtype_is_what_it_computes(monkeypatch, fresh_probe):
    """The CUDA branches, without a GPU: only torch.device objects and the bf16 probe are involved."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    probed.cache_clear()
    assert pick_device() == pick_device("auto") == torch.device("cuda", 0)
    assert pick_device("auto", 1) == torch.device("cuda", 1)
    assert pick_device("cuda", 1) == torch.device("cuda", 1) and pick_device("cuda:2", 1) == torch.device("cuda", 2)
    assert pick_device("cpu") == torch.device("cpu")
    for supported, dtype in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert fast_dtype(torch.device("cuda", 0)) == dtype
    assert fast_dtype(torch.device("cpu")) == torch.float32
