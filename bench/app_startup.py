"""How long `python app.py` takes to serve, and how soon the first token comes, on this machine.

    python bench/app_startup.py [--model assets] [--starts 3] [--runs 5] [--max-new-tokens 100] [-- app flags]

Starts the real app as a subprocess and times, from the moment it is launched: the server
answering (the median of several starts, each printed: start-up varies with the machine's load),
then the first complete answer through its HTTP API. Then, for several requests, the
first streamed token as a program calling the API sees it (the moment its bytes arrive), beside the
same figures measured in-process (the model alone, no HTTP) so the app's own overhead shows.
Goals: ready <= 10 s, first token <= 0.5 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.launch, the app launcher, is not an installed package

import httpx  # noqa: E402

import serve  # noqa: E402
from model import SamplingParams, generate, load_tokenizer  # noqa: E402
from serve.flags import at_least_one  # noqa: E402
from tests.launch import API_TIMEOUT, app_env, running_app, timed_generate  # noqa: E402

PROMPT = "ROMEO:"
READY_GOAL_S, FIRST_TOKEN_GOAL_S = 10.0, 0.5


def through_the_app(url: str, client: httpx.Client, max_new_tokens: int, seed: int) -> tuple[float, float, int]:
    """Seconds to the first streamed token and to the end, and the tokens generated (re-tokenised), as a
    program calling the HTTP API sees them, the moment the bytes arrive."""
    first, total, text = timed_generate(url, [PROMPT, max_new_tokens, 0.8, 50, 1.0, seed], client)
    return first, total, len(load_tokenizer().encode(text[len(PROMPT) :]))


def in_process(model, max_new_tokens: int, seed: int) -> tuple[float, float]:
    """(seconds to the first token, decode tokens/s after it) of the model's own generate()."""
    params = SamplingParams(0.8, top_k=50, seed=seed, served=True)
    request = serve.check_request(model, PROMPT, max_new_tokens, params)
    start, times = time.perf_counter(), []
    for _ in generate(model, request.prompt_ids, request.max_new_tokens, params=request.params):
        times.append(time.perf_counter())
    return times[0] - start, (len(times) - 1) / (times[-1] - times[0])


def verdict(value: float, goal: float) -> str:
    return f"goal <= {goal:g} s: {'met' if value <= goal else 'MISSED'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(ROOT / "assets"))
    parser.add_argument("--starts", type=at_least_one, default=3, help="app launches timed to ready")
    parser.add_argument("--runs", type=at_least_one, default=5)
    parser.add_argument("--max-new-tokens", type=at_least_one, default=100)
    parser.add_argument("app_flags", nargs="*", help="passed to app.py after --, e.g. -- --quantize int8")
    args = parser.parse_args()

    app_args = ["--model", args.model, *args.app_flags]
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} (other work slows every figure)")
    print("command: app.py --port PORT", " ".join(app_args))
    readies = []
    for _ in range(args.starts - 1):
        with running_app(ROOT / "app.py", *app_args, env=app_env()) as app:
            readies.append(app.ready_seconds)
    launched = time.perf_counter()
    with running_app(ROOT / "app.py", *app_args, env=app_env()) as app:
        readies.append(app.ready_seconds)
        with httpx.Client(timeout=API_TIMEOUT) as client:
            through_the_app(app.url, client, args.max_new_tokens, seed=0)
            first_answer = time.perf_counter() - launched
            runs = [through_the_app(app.url, client, args.max_new_tokens, seed) for seed in range(1, args.runs + 1)]

    model = serve.load_for_inference(args.model)
    serve.warm_up(model)
    # on the main thread, where the app decodes too (its scheduler runs there)
    direct = [in_process(model, args.max_new_tokens, seed) for seed in range(1, args.runs + 1)]

    app_first = statistics.median(first for first, _, _ in runs)
    app_rate = statistics.median(tokens / (total - first) for first, total, tokens in runs if total > first)
    model_first = statistics.median(first for first, _ in direct)
    model_rate = statistics.median(rate for _, rate in direct)
    print(f"model: {args.model} ({model.num_parameters():,} parameters, {serve.precision_of(model)})")
    ready = statistics.median(readies)
    each = ", ".join(f"{seconds:.2f}" for seconds in readies)
    print(f"ready (server answers)        {ready:6.2f} s   {verdict(ready, READY_GOAL_S)} (median of {each} s)")
    print(f"first answer ({args.max_new_tokens} tokens)     {first_answer:6.2f} s   from launch")
    print(f"median of {args.runs} runs           through the app   model alone   app overhead")
    overhead = app_first - model_first
    print(f"first token                   {app_first:8.3f} s   {model_first:9.3f} s   {overhead:+8.3f} s")
    print(f"decode tokens/s               {app_rate:10.1f}   {model_rate:11.1f}")
    print(f"first token {verdict(app_first, FIRST_TOKEN_GOAL_S)}")


if __name__ == "__main__":
    main()
