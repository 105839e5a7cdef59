"""A long prompt shares the machine: what a short request and the rows already decoding see while a
1000-token prompt is prefilled, in-process through serve.Scheduler (the app's decoder), in one run.

    python bench/prefill_share.py [--model SOURCE] [--long 1000] [--decoding 4]

Prints, on GPT-2 124M with random weights (or --model) loaded as the app loads it (int8 on the CPU):
- the first-token time of a 10-token request alone, and when it arrives 0.5 s after the long prompt;
- the seconds between tokens of the rows already decoding, before and during the long prompt's prefill,
  and their ratio (goal: during >= half the rate before);
- the long prompt's own first-token time, alone and beside the decoding rows (what sharing costs it).
Goals: the short request's first token within 0.5 s; decoding rows keep at least half their rate.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import GPT, GPTConfig, SamplingParams  # noqa: E402
from serve import Scheduler, load_for_inference, use_cpu_threads  # noqa: E402
from serve.flags import at_least_one  # noqa: E402

SHORT = list(range(1000, 1010))


def drain(stream) -> None:
    """Read a stream to its end, or to the scheduler's close at the end of the run."""
    try:
        for _ in stream:
            pass
    except RuntimeError:
        pass


def first_token_seconds(scheduler: Scheduler, prompt: list[int], new_tokens: int) -> tuple[float, threading.Thread]:
    """Submit a request and return (seconds to its first token, the thread reading the rest)."""
    start = time.perf_counter()
    stream = scheduler.generate(prompt, new_tokens, SamplingParams(0.8, top_k=50, seed=1))
    next(stream)
    first = time.perf_counter() - start
    reader = threading.Thread(target=drain, args=(stream,), daemon=True)
    reader.start()
    return first, reader


def decoding_rows(scheduler: Scheduler, count: int, stop: threading.Event) -> list[list[float]]:
    """count rows decoding until stop; each row's token arrival times."""
    times: list[list[float]] = [[] for _ in range(count)]

    def read(i: int) -> None:
        stream = scheduler.generate([500 + i, 501, 502], 100_000, SamplingParams(0.8, top_k=50, seed=i))
        try:
            for _ in stream:
                times[i].append(time.perf_counter())
                if stop.is_set():
                    return stream.close()
        except RuntimeError:  # the scheduler closed first
            pass

    for i in range(count):
        threading.Thread(target=read, args=(i,), daemon=True).start()
    return times


def gaps(times: list[list[float]], start: float, end: float) -> float:
    """The mean seconds between consecutive tokens of a row, between start and end (a mean, not a median:
    a long step and the short ones that pay it back count by their time)."""
    spans = [b - a for row in times for a, b in zip(row, row[1:], strict=False) if start <= a and b <= end]
    return statistics.fmean(spans) if spans else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model source (default: GPT-2 124M, random weights)")
    parser.add_argument("--long", type=at_least_one, default=1000, help="tokens of the long prompt")
    parser.add_argument("--decoding", type=at_least_one, default=4, help="rows decoding while it is prefilled")
    args = parser.parse_args()
    use_cpu_threads()
    if args.model:
        model = load_for_inference(args.model)
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            GPT(GPTConfig()).save_pretrained(folder)
            model = load_for_inference(folder)
    long_prompt = [(7 * i) % 50_000 for i in range(min(args.long, model.config.block_size - 8))]
    with Scheduler(model) as scheduler:
        alone, reader = first_token_seconds(scheduler, SHORT, 16)
        reader.join()
        long_alone, reader = first_token_seconds(scheduler, long_prompt, 4)
        reader.join()
        stop = threading.Event()
        times = decoding_rows(scheduler, args.decoding, stop)
        time.sleep(3.0)
        submitted = time.perf_counter()
        long_first: list[float] = []
        threading.Thread(target=lambda: long_first.append(first_token_seconds(scheduler, long_prompt, 4)[0])).start()
        time.sleep(0.5)
        behind, _ = first_token_seconds(scheduler, SHORT, 16)
        while not long_first:
            time.sleep(0.01)
        prefilled = submitted + long_first[0]
        stop.set()
    before, during = gaps(times, submitted - 2.0, submitted), gaps(times, submitted, prefilled)
    long_tokens = len(long_prompt)
    print(
        f"| a {len(SHORT)}-token request's first token | alone {alone:.3f} s | "
        f"0.5 s behind a {long_tokens}-token prompt {behind:.3f} s (goal <= 0.5 s) |"
    )
    print(
        f"| {args.decoding} decoding rows, seconds per token | before {before:.3f} | "
        f"during the prefill {during:.3f} | rate kept {before / during:.0%} (goal >= 50%) |"
    )
    print(
        f"| the {long_tokens}-token prompt's first token | alone {long_alone:.2f} s | beside the decoding rows "
        f"{long_first[0]:.2f} s |"
    )


if __name__ == "__main__":
    main()
