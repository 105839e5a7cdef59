"""Loading a model for serving: device, precision, int8 quantisation and CPU threads, chosen in one place (the
layers and kernels they use are serve/kernels.py's)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from model import GPT
from model.device import DTYPES, capabilities, fast_dtype, pick_device

from . import native
from .kernels import Int8Linear, PackedBF16Linear, quantize_int8, replace_linears

QUANTIZE = ("none", "int8")


def cpu_threads() -> int:
    """The CPUs this process may really use (model.device.capabilities)."""
    return capabilities().threads


def use_cpu_threads() -> int:
    """Run torch on cpu_threads() threads, unless OMP_NUM_THREADS says how many; returns the count."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cpu_threads())
    return torch.get_num_threads()


def int8_supported() -> bool:
    """Whether the int8 Linear (fbgemm's, with a fixed input range and fp32 output) is offered here."""
    return capabilities().int8


def onednn_bf16_supported() -> bool:
    """Whether oneDNN can pack bf16 weights on this CPU: it needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, which
    many CPUs lack (AMD before Zen 4, Intel before Skylake-SP); elsewhere bf16 runs through F.linear."""
    return capabilities().onednn_bf16


def pick_precision(device: torch.device, dtype: str = "auto", quantize: str = "auto") -> tuple[torch.dtype, str]:
    """The weight dtype and quantisation to serve with: on CUDA bf16 (fp16 where bf16 is not
    supported); on the CPU int8 weights with fp32 activations (its held-out loss is within 1% of
    fp32, bench/generate.py), or fp32 where the build has no int8 kernels."""
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantize != "auto" and quantize not in QUANTIZE:
        raise ValueError(f"quantize must be auto or one of {', '.join(QUANTIZE)}, got {quantize!r}")
    auto_dtype = fast_dtype(device)
    if device.type == "cuda":
        auto_quantize = "none"
    else:
        auto_quantize = "int8" if dtype in ("auto", "float32") and int8_supported() else "none"
    chosen_dtype = auto_dtype if dtype == "auto" else DTYPES[dtype]
    chosen_quantize = auto_quantize if quantize == "auto" else quantize
    if chosen_quantize == "int8" and device.type != "cpu":
        raise ValueError("int8 quantisation runs on the CPU only; use --dtype on CUDA")
    if chosen_quantize == "int8" and chosen_dtype != torch.float32:
        raise ValueError("int8 quantisation keeps fp32 activations: use it with --dtype float32 (or auto)")
    return chosen_dtype, chosen_quantize


def why_precision(device: torch.device, dtype: str = "auto", quantize: str = "auto") -> str:
    """One line for the start-up log: the path pick_precision chooses for these flags on this machine, and why
    (the measurements behind each choice are in docs/performance.md)."""
    weight_dtype, quantization = pick_precision(device, dtype, quantize)
    name = "int8 weights, fp32 activations" if quantization == "int8" else str(weight_dtype).removeprefix("torch.")
    if (dtype, quantize) != ("auto", "auto"):
        return f"{name}, as --dtype {dtype} --quantize {quantize} asked"
    if device.type == "cuda":
        return f"{name}: the fastest precision this GPU computes in"
    if quantization != "int8":
        return f"{name}: this PyTorch build has no fbgemm int8 kernels"
    level = capabilities().simd
    kernel = (
        f"decoding steps of up to {native.MOST_ROWS[native.SIMD[level]]} rows on this project's {level} int8 kernel "
        "once it is built (the same bits as fbgemm's, faster for a few rows), longer calls on fbgemm's"
        if level
        else "every call on fbgemm's kernel (this project's needs AVX2 and FMA)"
    )
    return f"{name}: the fastest batch-invariant path on every CPU measured; {kernel}"


def load_for_inference(source: str | Path, device: str = "auto", dtype: str = "auto", quantize: str = "auto") -> GPT:
    """GPT.from_pretrained(source), moved to the device and precision that serve it best
    (see pick_precision); precision_of(model) names what was chosen."""
    target = pick_device(device)  # raises ValueError for CUDA on a machine without a GPU
    weight_dtype, quantization = pick_precision(target, dtype, quantize)
    if target.type == "cuda":
        # cuDNN's attention builds a plan for every new sequence length: decoding (one length more per
        # token) ran at 16-19 tokens/s until each length had been seen once (H100, GPT-2 124M, bf16);
        # flash / memory-efficient attention run at full speed from the first request.
        torch.backends.cuda.enable_cudnn_sdp(False)
    model = GPT.from_pretrained(source, device=target, dtype=weight_dtype)
    if quantization == "int8":
        quantize_int8(model)
    elif target.type == "cpu" and weight_dtype == torch.bfloat16 and onednn_bf16_supported():
        replace_linears(model, PackedBF16Linear)
    return model


def precision_of(model: GPT) -> str:
    """What a model computes in: its weight dtype, plus "+int8" when its Linear layers are int8."""
    dtype = str(model.transformer.wte.weight.dtype).removeprefix("torch.")
    return dtype + ("+int8" if isinstance(model.lm_head, Int8Linear) else "")
