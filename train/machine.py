"""The machine a run trains on: device, autocast dtype, torch.compile, and the DDP process group."""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from model.device import fast_dtype, native_bf16, pick_device

from .config import TrainConfig

# Dense bf16/fp16 tensor-core peaks (FLOP/s) for MFU, by a substring of the device name.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L4": 121e12,
    "V100": 125e12,
    "T4": 65e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}
SHORT_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass
class Machine:
    device: torch.device
    autocast_dtype: torch.dtype | None
    compile: bool
    rank: int = 0
    world_size: int = 1
    why: str = ""  # the autocast dtype's reason, for the run's log line

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def precision(self) -> str:
        """The autocast dtype's name, and whether the model is compiled."""
        name = SHORT_NAMES[self.autocast_dtype or torch.float32]
        return name + (" + torch.compile" if self.compile else "")

    def hardware(self) -> str:
        name = (
            torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
        )
        return f"{self.world_size} x {name}" if self.world_size > 1 else name

    def peak_flops(self) -> float | None:
        """One device's dense bf16/fp16 peak, when known."""
        if self.device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(self.device)
        return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)

    def max_over_processes(self, values: list[float]) -> list[float]:
        """The element-wise maximum of values over all processes (this one's own values when it is alone):
        any process's flag raised is every process's."""
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, device=self.device, dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.tolist()


def process_rank() -> tuple[int, int]:
    """This process's rank and the number of processes (torchrun's RANK and WORLD_SIZE; 0 and 1 alone)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def choose_dtype(name: str, device: torch.device) -> tuple[torch.dtype, str]:
    """The autocast dtype that --dtype name means on device, and why. auto is the GPU's fastest on CUDA; on a
    CPU it is bf16 only where the CPU computes bf16 natively, else fp32."""
    if name != "auto":
        dtype = getattr(torch, name)
        slow = device.type == "cpu" and dtype == torch.bfloat16 and not native_bf16()
        return dtype, "--dtype " + name + (": this CPU emulates bf16, slower than fp32" if slow else "")
    if device.type == "cuda":
        return fast_dtype(device), "--dtype auto: the fastest this GPU computes"
    feature = native_bf16()
    if feature:
        return torch.bfloat16, f"--dtype auto: this CPU computes bf16 natively ({feature})"
    return torch.float32, "--dtype auto: this CPU has neither AMX nor AVX-512 BF16, so bf16 would be slower"


def setup_machine(config: TrainConfig) -> Machine:
    """Device, autocast dtype and process group, decided once (RANK / WORLD_SIZE / LOCAL_RANK come from torchrun)."""
    rank, world_size = process_rank()
    device = pick_device(config.device, int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    dtype, why = choose_dtype(config.dtype, device)
    compiled = config.compile == "true" or (config.compile == "auto" and device.type == "cuda")
    return Machine(device, None if dtype == torch.float32 else dtype, compiled, rank, world_size, why)
