"""Loading a model for serving: device, precision and quantisation chosen in one place."""

from __future__ import annotations

from pathlib import Path

import torch

from .gpt import GPT

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZE = ("none", "int8")


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_precision(device: torch.device, dtype: str = "auto", quantize: str = "auto") -> tuple[torch.dtype, str]:
    """The weight dtype and quantisation to serve with: on CUDA bf16 (fp16 where bf16 is not
    supported); on the CPU fp32 weights."""
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantize != "auto" and quantize not in QUANTIZE:
        raise ValueError(f"quantize must be auto or one of {', '.join(QUANTIZE)}, got {quantize!r}")
    if device.type == "cuda":
        auto_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        auto_quantize = "none"
    else:
        auto_dtype, auto_quantize = torch.float32, "none"
    chosen_dtype = auto_dtype if dtype == "auto" else DTYPES[dtype]
    chosen_quantize = auto_quantize if quantize == "auto" else quantize
    if chosen_quantize == "int8" and device.type != "cpu":
        raise ValueError("int8 quantisation runs on the CPU only; use --dtype on CUDA")
    return chosen_dtype, chosen_quantize


def load_for_inference(source: str | Path, device: str = "auto", dtype: str = "auto", quantize: str = "auto") -> GPT:
    """GPT.from_pretrained(source), moved to the device and precision that serve it best."""
    target = pick_device(device)
    weight_dtype, quantization = pick_precision(target, dtype, quantize)
    model = GPT.from_pretrained(source, device=target, dtype=weight_dtype)
    model.precision = str(weight_dtype).removeprefix("torch.") + ("" if quantization == "none" else "+int8")
    return model
