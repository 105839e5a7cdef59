"""model/device.py: the machine's capabilities, the one override that takes the other branch of every
machine-dependent choice, and the device chosen from them."""

import subprocess
import sys

import pytest
import torch

from model.device import OVERRIDE, capabilities, pick_device, probed


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
        ("int8=no,onednn_bf16=0,cuda=false", dict(int8=False, onednn_bf16=False, cuda=False)),
    ],
)
def test_the_override_changes_only_what_it_names(monkeypatch, text, expected):
    monkeypatch.setenv(OVERRIDE, text)
    found = capabilities()
    for name, value in vars(probed()).items():
        assert getattr(found, name) == expected.get(name, value), name


@pytest.mark.parametrize("text", ["bf16=yes", "threads=0", "threads=two", "gpu=no", "int8", "int8=maybe"])
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


def test_without_cuda_auto_is_the_cpu_and_cuda_is_refused(monkeypatch):
    monkeypatch.setenv(OVERRIDE, "cuda=no")
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU is visible; use cpu"):
        pick_device("cuda")


def test_the_override_reaches_a_process_started_from_this_one(monkeypatch):
    monkeypatch.setenv(OVERRIDE, "bf16=amx,threads=5")
    code = "from model.device import capabilities; c = capabilities(); print(c.bf16, c.threads)"
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert printed.split() == ["AMX", "5"]
