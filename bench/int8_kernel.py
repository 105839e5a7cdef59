"""The int8 Linear kernels side by side on GPT-2 124M's 49 Linear layers, as a decoding step meets them: every
layer's weights distinct (124.5 MB, far more than the caches hold), each layer called once per pass, in order.

    python bench/int8_kernel.py [--rows 1 2 4 8 16] [--passes 20] [--threads 2]

For each row count it prints the milliseconds of one pass (median over the passes) through Int8Linear: as torch
operations around fbgemm's kernel (before serve/native.py's library loads), as one call of the library around
fbgemm's kernel, and as one call of this project's kernel on each path this CPU has; the bandwidth each reaches
(weight bytes / time) and a plain read of the same bytes for scale. native.MOST_ROWS is set from the ratios.
Every variant's output is checked to be the torch operations', bit for bit, before it is timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import cpu_line  # noqa: E402

from model.device import SIMD_LEVELS, capabilities  # noqa: E402
from serve import native  # noqa: E402
from serve.flags import at_least_one  # noqa: E402
from serve.kernels import Int8Linear  # noqa: E402

SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(50257, 768)]  # (out, in), in step order


def one_pass(layers: list[Int8Linear], inputs: dict[int, torch.Tensor], path: int | None) -> float:
    """Seconds for every layer once, in order: path None the torch operations, else the library's path."""
    start = time.perf_counter()
    for layer in layers:
        x = inputs[layer.in_features]
        layer(x) if path is None else layer.through(x, path)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=at_least_one, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--passes", type=at_least_one, default=20)
    parser.add_argument("--threads", type=at_least_one, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not native.load():
        sys.exit(f"this project's kernel is not available here: {native.failure()}")
    print(cpu_line())
    generator = torch.Generator().manual_seed(0)
    layers = [Int8Linear(torch.randn(out, width, generator=generator) * 0.02, torch.randn(out) * 0.01)
              for out, width in SHAPES]  # fmt: skip
    total = sum(layer.weight_bytes for layer in layers)
    flat = torch.ones(total // 4)
    paths = {"torch ops + fbgemm": None, "fbgemm, one call": 0}
    paths |= {f"own, {level}": native.SIMD[level] for level in SIMD_LEVELS[1:] if level in _levels()}
    print(
        f"{len(layers)} layers, {total / 1e6:.1f} MB of weights, {args.threads} threads, median of {args.passes} passes"
    )
    print("| rows | Int8Linear as | ms per pass | GB/s | x torch ops + fbgemm |")
    print("| ---: | --- | ---: | ---: | ---: |")
    with torch.inference_mode():
        for rows in args.rows:
            inputs = {width: torch.randn(rows, width, generator=generator) for width in (768, 3072)}
            times: dict[str, list[float]] = {name: [] for name in paths}
            loaded, native._BUILD.path = native._BUILD.path, None  # Int8Linear as torch operations
            reference = [layer(inputs[layer.in_features]) for layer in layers]
            for name, path in paths.items():
                for layer, expected in zip(layers, reference, strict=True):
                    got = (
                        layer(inputs[layer.in_features])
                        if path is None
                        else layer.through(inputs[layer.in_features], path)
                    )
                    assert torch.equal(got, expected), name
            for _ in range(args.passes):  # interleaved: each pass times every variant once
                for name, path in paths.items():
                    times[name].append(one_pass(layers, inputs, path))
            native._BUILD.path = loaded
            read = statistics.median(_read(flat) for _ in range(args.passes))
            base = statistics.median(times["torch ops + fbgemm"])
            for name, values in times.items():
                ms = statistics.median(values)
                print(f"| {rows} | {name} | {ms * 1e3:.2f} | {total / ms / 1e9:.1f} | {base / ms:.2f}x |")
            print(f"| {rows} | (a plain read of as many bytes) | {read * 1e3:.2f} | {total / read / 1e9:.1f} | |")


def _levels() -> list[str]:
    """The kernel's instruction sets this CPU runs: the one capabilities() names and every one below it."""
    top = capabilities().simd
    return SIMD_LEVELS[1 : SIMD_LEVELS.index(top) + 1] if top else []


def _read(flat: torch.Tensor) -> float:
    start = time.perf_counter()
    flat.sum()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
