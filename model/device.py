"""What this machine offers (capabilities: native bf16, the int8 and oneDNN kernels, CPU threads, CUDA), read in
one place for the trainer and for serving, with one override that tests and users set in the environment; and
the device and reduced precision chosen from it."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

# The precisions a user may name (--dtype), for training (autocast) and serving (weights) alike.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# SHAKESPEARE_MACHINE="bf16=none,int8=no,simd=avx2,threads=1,cuda=no": run as if the machine offered that, in this
# process and every process it starts (the trainer's tests run train/train.py as a subprocess). Set to take the
# other branch of a machine-dependent choice on any machine; see docs/testing.md.
OVERRIDE = "SHAKESPEARE_MACHINE"
BF16_FEATURES = {"amx": "AMX", "avx512": "AVX-512 BF16", "none": None}
SIMD_LEVELS = ("none", "avx2", "avx512_vnni")  # each level's instructions include the ones before it
YES, NO = ("yes", "1", "true"), ("no", "0", "false")


@dataclass(frozen=True)
class Capabilities:
    """What the machine offers to the choices made from it.

    bf16: the feature with which the CPU computes bf16 in hardware (AMX, or AVX-512 BF16), or None: without
        one each bf16 op converts to fp32 and back, slower than fp32 itself (AMD before Zen 4, Intel before
        Cooper Lake). Claiming it where the CPU lacks it only changes choices: bf16 still runs, emulated.
    onednn_bf16: oneDNN packs bf16 weights (it needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT).
    int8: this PyTorch build has fbgemm's int8 Linear with a fixed input range and fp32 output.
    simd: the widest instructions this project's own int8 kernel (serve/int8_kernel.cpp) has a path for here:
        "avx512_vnni" (AVX-512 with VNNI), "avx2", or None (it then is not used).
    cuda: a CUDA GPU is visible.
    threads: the CPUs this process may really use (its affinity, capped by a cgroup CPU quota).
    """

    bf16: str | None
    onednn_bf16: bool
    int8: bool
    simd: str | None
    cuda: bool
    threads: int


def cgroup_cpus(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The CPUs a cgroup CPU quota allows (v2 `cpu.max`, else v1 `cpu.cfs_quota_us`), or None without one."""
    try:
        try:
            quota, period = (root / "cpu.max").read_text().split()[:2]
        except OSError:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        return None if quota in ("max", "-1") else max(1, int(quota) // int(period))
    except (OSError, ValueError):
        return None


def _native_bf16() -> str | None:
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX-512 BF16"
    return None


def _onednn_bf16() -> bool:
    ops = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")):
        return False
    return bool(ops._is_mkldnn_bf16_supported())


def _int8() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32"
    )


def _simd() -> str | None:
    cpu = torch.cpu
    if not cpu.get_capabilities().get("fma3"):  # the kernel rounds as torch does, with FMA
        return None
    if cpu._is_avx512_supported() and cpu._is_vnni_supported() and cpu.get_capabilities().get("avx512_bw"):
        return "avx512_vnni"
    return "avx2" if cpu._is_avx2_supported() else None


def _threads() -> int:
    # a container on a 2-vCPU Space can see every core of the host, and more threads than CPUs only spin
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(available, cgroup_cpus() or available))


@functools.cache
def probed() -> Capabilities:
    """What the machine itself offers, read once per process."""
    return Capabilities(_native_bf16(), _onednn_bf16(), _int8(), _simd(), torch.cuda.is_available(), _threads())


def capabilities() -> Capabilities:
    """What the machine offers, as SHAKESPEARE_MACHINE overrides it: the one place every machine-dependent choice
    reads. The override may take away what the machine has; it may claim native bf16 (which then runs emulated),
    but no kernel or device that is not there, since those would fail when used."""
    found = probed()
    text = os.environ.get(OVERRIDE, "").strip()
    return _overridden(found, text) if text else found


def _overridden(found: Capabilities, text: str) -> Capabilities:
    changes: dict = {}
    for item in text.split(","):
        name, _, value = (part.strip().lower() for part in item.partition("="))
        if name == "bf16" and value in BF16_FEATURES:
            changes[name] = BF16_FEATURES[value]
        elif name == "simd" and value in SIMD_LEVELS:
            if SIMD_LEVELS.index(value) > SIMD_LEVELS.index(found.simd or "none"):
                raise ValueError(
                    f"{OVERRIDE} claims simd={value}, which this machine does not have; it may only take it away"
                )
            changes[name] = None if value == "none" else value
        elif name == "threads" and value.isdigit() and int(value) > 0:
            changes[name] = int(value)
        elif name in ("onednn_bf16", "int8", "cuda") and value in YES + NO:
            if value in YES and not getattr(found, name):
                raise ValueError(
                    f"{OVERRIDE} claims {name}, which this machine does not have; it may only take it away"
                )
            changes[name] = value in YES
        else:
            raise ValueError(
                f"{OVERRIDE}: cannot read {item.strip()!r}; give comma-separated name=value pairs from bf16=amx|avx512|"
                "none, onednn_bf16=yes|no, int8=yes|no, simd=avx512_vnni|avx2|none, cuda=yes|no, threads=N (N >= 1)"
            )
    return replace(found, **changes)


def native_bf16() -> str | None:
    """The feature with which this CPU computes bf16 in hardware (AMX, or AVX-512 BF16), or None."""
    return capabilities().bf16


def pick_device(name: str = "auto", index: int = 0) -> torch.device:
    """The device called name; auto is CUDA device index when a GPU is visible, else the CPU."""
    cuda = capabilities().cuda
    if name == "auto":
        return torch.device("cuda", index) if cuda else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not cuda:
        raise ValueError(f"device {name!r} asked for, but no CUDA GPU is visible; use cpu")
    return torch.device("cuda", index) if device.type == "cuda" and device.index is None else device


def fast_dtype(device: torch.device) -> torch.dtype:
    """The reduced precision to run on device: bf16 on CUDA where supported (Ampere and newer), fp16 on
    older GPUs such as the T4; fp32 on the CPU (the CPU paths choose bf16 or int8 themselves)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32
