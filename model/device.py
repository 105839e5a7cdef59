"""Which device and which reduced precision this machine offers, decided in one place for the trainer
and for serving."""

from __future__ import annotations

import torch

# The precisions a user may name (--dtype), for training (autocast) and serving (weights) alike.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(name: str = "auto", index: int = 0) -> torch.device:
    """The device called name; auto is CUDA device index when a GPU is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda", index) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but no CUDA GPU is visible; use cpu")
    return torch.device("cuda", index) if device.type == "cuda" and device.index is None else device


def fast_dtype(device: torch.device) -> torch.dtype:
    """The reduced precision to run on device: bf16 on CUDA where supported (Ampere and newer), fp16 on
    older GPUs such as the T4; fp32 on the CPU (the CPU paths choose bf16 or int8 themselves)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def native_bf16() -> str | None:
    """The feature with which this CPU computes bf16 in hardware (AMX, or AVX-512 BF16), or None. Without one,
    each bf16 op converts to fp32 and back, and runs slower than fp32 itself (AMD before Zen 4, Intel before
    Cooper Lake)."""
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX-512 BF16"
    return None
