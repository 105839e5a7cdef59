"""Training throughput of a preset with each optimisation on and off, side by side in one run.

    python bench/train_throughput.py [--preset cpu] [--steps 8] [--data PATH]

It first prints what the preset runs on this machine and why (--dtype auto: bf16 only on a CPU that
computes it natively), then marks that variant and says how close it comes to the fastest.

--data defaults to the trainer's: the shipped data/tinyshakespeare.txt.

Each variant builds the real Trainer (train/train.py) and times its optimizer_step on the same
batches. MFU is against the peak of a known GPU, or on a CPU against a large fp32 matmul measured
in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's packages, not an installed copy

from model import GPT  # noqa: E402
from model.device import DTYPES  # noqa: E402
from serve.flags import at_least_one  # noqa: E402
from train.config import parse_config  # noqa: E402
from train.machine import setup_machine  # noqa: E402
from train.trainer import Trainer, prepare  # noqa: E402

VARIANTS = {
    "eager fp32 (baseline)": dict(dtype="float32", compile="false"),
    "bf16 autocast": dict(dtype="bfloat16", compile="false"),
    "torch.compile": dict(dtype="float32", compile="true"),
    "torch.compile + bf16": dict(dtype="bfloat16", compile="true"),
}


def matmul_flops(device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def time_variant(argv: list[str], overrides: dict, steps: int, warmup: int) -> float:
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in overrides.items()]
    config = parse_config(argv + flags)
    trainer = Trainer(config, setup_machine(config))
    batches = [trainer.batches.next()[:2] for _ in range(warmup + steps)]
    for inputs, targets in batches[:warmup]:  # compilation and allocator warm-up
        trainer.optimizer_step(inputs, targets)
    start = time.perf_counter()
    for inputs, targets in batches[warmup:]:
        loss, _ = trainer.optimizer_step(inputs, targets)
    float(loss)  # wait for the device
    return steps * trainer.plan.tokens_per_step / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="", help="the training text (default: the trainer's)")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--steps", type=at_least_one, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    argv = ["--preset", args.preset, "--dropout", "0", *(["--data", args.data] if args.data else [])]
    config = parse_config(argv)
    machine = setup_machine(config)
    plan, _ = prepare(config, machine.world_size)
    shape, seq_len = plan.shape, plan.seq_len
    with torch.device("meta"):
        n_params = GPT(shape).num_parameters()
    flops_per_token = 6 * n_params + 12 * shape.n_layer * shape.n_embd * seq_len
    peak = machine.peak_flops() or matmul_flops(machine.device)
    print(
        f"preset {args.preset}: {n_params:,} parameters, batch {config.batch_size} x {seq_len}, "
        f"{torch.get_num_threads()} threads, peak {peak / 1e9:.0f} GFLOP/s ({machine.device})"
    )
    runs = (machine.autocast_dtype or torch.float32, machine.compile)  # what the preset runs on this machine
    chosen = next((n for n, v in VARIANTS.items() if (DTYPES[v["dtype"]], v["compile"] == "true") == runs), None)
    print(f"the preset runs {machine.precision()} here: {machine.why}")
    print(f"{'variant':<24} {'tokens/s':>10} {'MFU':>7} {'vs baseline':>12}")
    speeds = {}
    for name, overrides in VARIANTS.items():
        try:
            speeds[name] = time_variant(argv, overrides, args.steps, args.warmup)
        except Exception as err:  # a variant this machine cannot run (e.g. no compiler) is reported, not fatal
            print(f"{name:<24} failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}")
            continue
        baseline = next(iter(speeds.values()))
        mfu = flops_per_token * speeds[name] / peak
        mark = "  <- the preset's choice" if name == chosen else ""
        print(f"{name:<24} {speeds[name]:>10,.0f} {mfu:>7.1%} {speeds[name] / baseline:>11.2f}x{mark}")
    if chosen in speeds:
        fastest = max(speeds, key=speeds.get)
        print(f"the preset's choice runs at {speeds[chosen] / speeds[fastest]:.0%} of the fastest ({fastest})")


if __name__ == "__main__":
    main()
