"""Many visitors at once: the real app under 1, 2, 4, 8 and 16 concurrent clients, in one run.

    python bench/serve_load.py [--models random assets] [--new-tokens 64] [--device cuda] [-- app flags]

For each model (`random`: GPT-2 124M with GPT-2's random initialisation, seed 0; `assets`: the model
shipped in assets/; or any source) it launches `python app.py --device DEVICE` (its defaults: int8 on the
CPU, bf16 on CUDA, --max-batch 16), waits on the CPU until the app serves its compiled decoding step (pass
`-- --no-compile` to time the eager one) and prints, as clients of its HTTP API see it (the times are when
the streamed bytes arrive):
- tokens/s for N clients asking at once: the aggregate, and each client's own (median), and their
  ratios to one client alone;
- the time to the first token of a client arriving while 8 others stream.
On the CPU, 8 clients' aggregate through the app against the same requests given to a Scheduler in this
process with the compiled step (the app without HTTP), taking turns. Then, in-process, how many seeded answers
are identical alone and in a batch of 8, for each precision the device offers (int8 on the CPU only).
Goals: 8 clients >= 4x one client's aggregate, each >= 45% of one alone; first token
<= 0.5 s while 8 stream; the app's 8 clients >= 0.9x the in-process Scheduler's; every int8 answer identical.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.launch, the app launcher, is not an installed package

import httpx  # noqa: E402
import torch  # noqa: E402

from model import GPT, GPTConfig, SamplingParams, load_tokenizer  # noqa: E402
from model.device import pick_device  # noqa: E402
from serve import Scheduler, load_for_inference, native  # noqa: E402
from serve.compiled import compile_now  # noqa: E402
from serve.flags import at_least_one  # noqa: E402
from tests.launch import API_TIMEOUT, app_env, running_app, timed_generate  # noqa: E402

# one connection pool for every visitor: a client made per call (httpx.post) loads its TLS certificates each
# time, CPU taken from the app on the same small machine (a real visitor's client runs elsewhere)
HTTP = httpx.Client(timeout=API_TIMEOUT, limits=httpx.Limits(max_connections=64))
PROMPT = "ROMEO:"
TEMPERATURE, TOP_K, TOP_P = 0.8, 50, 1.0  # every request here, through the app and in-process alike
CLIENTS = (1, 2, 4, 8, 16)
PRECISIONS = {"fp32": dict(dtype="float32", quantize="none"), "bf16": dict(dtype="bfloat16", quantize="none"),
              "int8": dict(dtype="float32", quantize="int8")}  # fmt: skip


def ask(url: str, new_tokens: int, seed: int, started: threading.Event | None = None) -> tuple[float, float, int]:
    """(seconds to the first streamed token, seconds to the end, tokens received) of one visitor calling the
    HTTP API (server-sent events): the times are when the bytes arrive."""
    on_first = None if started is None else started.set
    first, total, text = timed_generate(url, [PROMPT, new_tokens, TEMPERATURE, TOP_K, TOP_P, seed], HTTP, on_first)
    return first, total, len(load_tokenizer().encode(text[len(PROMPT) :]))


def load(url: str, clients: int, new_tokens: int) -> tuple[float, float, float]:
    """(aggregate tokens/s, median tokens/s of one client from its request to its end, median first token s)."""
    with ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        runs = list(pool.map(lambda seed: ask(url, new_tokens, seed), range(clients)))
        wall = time.perf_counter() - start
    aggregate = sum(tokens for _, _, tokens in runs) / wall
    return aggregate, statistics.median(t / total for _, total, t in runs), statistics.median(f for f, _, _ in runs)


def first_token_while_streaming(url: str, streaming: int, new_tokens: int, tries: int = 3) -> float:
    """Median seconds to the first token of a visitor arriving once `streaming` others all stream."""
    firsts = []
    for attempt in range(tries):
        events = [threading.Event() for _ in range(streaming)]
        with ThreadPoolExecutor(streaming + 1) as pool:
            others = [pool.submit(ask, url, new_tokens, 100 * attempt + i, event) for i, event in enumerate(events)]
            for event, other in zip(events, others, strict=True):
                while not event.wait(timeout=0.1):
                    if other.done():
                        other.result()  # a request that failed raises here instead of being waited for
            firsts.append(pool.submit(ask, url, 16, 99).result()[0])
            for other in others:
                other.result()
    return statistics.median(firsts)


def compiled_or_eager(log: Path, compiling: bool, timeout: float = 900) -> str:
    """Once the app has switched to its compiled decoding step (or failed to), what it serves with."""
    start = time.perf_counter()
    while compiling and time.perf_counter() - start < timeout:
        text = log.read_text()
        if "decoding steps now run compiled" in text:
            return f"serving the compiled decoding step ({time.perf_counter() - start:.0f} s after start-up)"
        if "compiled decoding unavailable" in text:
            return "serving eagerly: " + text.split("compiled decoding unavailable")[1].splitlines()[0]
        time.sleep(1)
    return "serving eagerly" + (f" (not compiled within {timeout:.0f} s)" if compiling else " (--no-compile)")


def against_in_process(url: str, source: str, new_tokens: int, rounds: int) -> tuple[float, float]:
    """Medians of (8 clients' aggregate tokens/s through the app at url, the same 8 requests given at once to a
    Scheduler in this process with the compiled step): the app without HTTP. The two take turns, round by
    round, while the other idles, so the machine's drift falls on both alike."""
    model = load_for_inference(source, device="cpu")
    native.load()  # as the app has it by the time it serves the compiled step
    tokenizer, app_rates, own_rates = load_tokenizer(), [], []
    requests = [
        (tokenizer.encode(PROMPT), new_tokens, SamplingParams(TEMPERATURE, TOP_K, TOP_P, seed=s)) for s in range(8)
    ]

    def rounds_of_both(scheduler: Scheduler) -> None:
        try:
            for turn in range(rounds + 1):  # the first: set-up, not timed
                start = time.perf_counter()
                total = sum(len(list(stream)) for stream in [scheduler.generate(*request) for request in requests])
                rate = total / (time.perf_counter() - start)
                app_rate = load(url, 8, new_tokens)[0]
                if turn:
                    own_rates.append(rate)
                    app_rates.append(app_rate)
        finally:
            scheduler.close()

    scheduler = Scheduler(model, compiled=compile_now(model))
    thread = threading.Thread(target=rounds_of_both, args=(scheduler,))
    thread.start()
    scheduler.run()  # on the thread that loaded the model, as app.py runs it
    thread.join()
    return statistics.median(app_rates), statistics.median(own_rates)


def serve_under_load(source: str, label: str, args) -> None:
    context = GPT.from_pretrained(source).config.block_size  # the most tokens a request may ask for
    # every client here is 127.0.0.1: the per-client limit (8) would refuse the 9th of 16
    app_args = ["--model", source, "--device", args.device, "--max-per-client", "64", *args.app_flags]
    with running_app(ROOT / "app.py", *app_args, env=app_env()) as app:
        print(f"{label}: {compiled_or_eager(app.log, args.device == 'cpu' and '--no-compile' not in app_args)}")
        ask(app.url, 8, 0)  # first-call set-up, not timed
        load(app.url, 8, 8)
        runs = [{n: load(app.url, n, args.new_tokens) for n in CLIENTS} for _ in range(args.repeats)]
        # each figure the median over the sweeps: other work on a small machine moves single runs by 20%
        rows = {n: tuple(statistics.median(run[n][i] for run in runs) for i in range(3)) for n in CLIENTS}
        arriving = first_token_while_streaming(app.url, 8, min(4 * args.new_tokens, context))
        if args.device == "cpu" and "--no-compile" not in app_args:
            app8, own8 = against_in_process(app.url, source, args.new_tokens, args.repeats)
    solo_aggregate, solo_client, _ = rows[1]
    print(f"\n{label}: app.py {' '.join(app_args[2:])} ({args.new_tokens} new tokens per client, "
          f"medians of {args.repeats} sweeps)")  # fmt: skip
    print("| clients | aggregate tok/s | x one client | per client tok/s (median) | of one alone | first token s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for n, (aggregate, per_client, first) in rows.items():
        print(f"| {n} | {aggregate:.1f} | {aggregate / solo_aggregate:.2f}x | {per_client:.1f} | "
              f"{per_client / solo_client:.0%} | {first:.2f} |")  # fmt: skip
    aggregate8, per_client8, _ = rows[8]
    print(f"8 clients: {aggregate8 / solo_aggregate:.2f}x one client (goal >= 4x), each "
          f"{per_client8 / solo_client:.0%} of one alone (goal >= 45%)")  # fmt: skip
    print(f"first token of a client arriving while 8 stream: {arriving:.2f} s (goal <= 0.5 s)")
    if args.device == "cpu" and "--no-compile" not in app_args:
        print(f"8 clients through the app: {app8 / own8:.2f}x the Scheduler in this process, taking turns "
              f"({app8:.1f} against {own8:.1f} tok/s; goal >= 0.9x)")  # fmt: skip


def invariance(source: str, label: str, new_tokens: int, device: str) -> None:
    """How many of 8 seeded answers are identical alone and all 8 together, for each precision."""
    tokenizer = load_tokenizer()
    prompts = ["ROMEO:", "First Citizen:", "To be or not", "JULIET:\nO", "KING", "Now is the winter", "A", "HAMLET:"]
    requests = [
        (tokenizer.encode(p), new_tokens, SamplingParams(TEMPERATURE, TOP_K, TOP_P, seed=i))
        for i, p in enumerate(prompts)
    ]
    print(f"\n{label} on {device}: seeded answers identical alone and in a batch of 8 ({new_tokens} tokens each)")
    variants = [(name, options, False) for name, options in PRECISIONS.items() if name != "int8" or device == "cpu"]
    variants += [("int8, compiled step", PRECISIONS["int8"], True)] if device == "cpu" else []
    for name, options, compiled in variants:
        model = load_for_inference(source, device=device, **options)
        step = compile_now(model) if compiled else None
        if compiled and step is None:
            continue
        with Scheduler(model, max_batch=8, compiled=step) as scheduler:
            alone = [list(scheduler.generate(*request)) for request in requests]
            streams = [scheduler.generate(*request) for request in requests]
            together = [list(stream) for stream in streams]
        same = sum(a == b for a, b in zip(alone, together, strict=True))
        print(f"  {name}: {same} of {len(requests)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["random", "assets"], help="random, assets or a source")
    parser.add_argument("--new-tokens", type=at_least_one, default=128)
    parser.add_argument("--repeats", type=at_least_one, default=3, help="sweeps over the client counts (medians shown)")
    parser.add_argument("--skip-invariance", action="store_true")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("app_flags", nargs="*", help="passed to app.py after --, e.g. -- --max-batch 4")
    args = parser.parse_args()
    args.device = str(pick_device(args.device))
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            if name == "random":
                torch.manual_seed(0)
                source, label = str(GPT(GPTConfig()).save_pretrained(Path(tmp) / "gpt2")), "GPT-2 124M (random)"
            else:
                source = str(ROOT / "assets") if name == "assets" else name
                label = name
            serve_under_load(source, label, args)
            if not args.skip_invariance:
                invariance(source, label, args.new_tokens, args.device)


if __name__ == "__main__":
    main()
