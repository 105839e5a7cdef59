"""What the probability view costs: the real app's /generate against /generate_with_probabilities (the same
request and seed), alternated in one run, as a program calling the HTTP API sees them.

    python bench/probability_view.py [--model assets] [--rounds 5] [--new-tokens 128]

Prints each endpoint's median tokens/s over the rounds and their ratio. Goal: the view costs at most 10%.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.launch, the app launcher, is not an installed package

import httpx  # noqa: E402

from model import GPT, GPTConfig, load_tokenizer  # noqa: E402
from serve.flags import at_least_one  # noqa: E402
from tests.launch import API_TIMEOUT, api_events, app_env, running_app  # noqa: E402

PROMPT = "ROMEO:"


def tokens_per_second(url: str, api_name: str, new_tokens: int, client: httpx.Client) -> float:
    """Generated tokens per second of one call, from the request to the last byte."""
    start, outputs = time.perf_counter(), None
    for event, data in api_events(url, [PROMPT, new_tokens, 0.8, 50, 1.0, 7], api_name, client):
        if event == "error":
            raise RuntimeError(f"{api_name} answered an error: {data}")
        outputs = data
    seconds = time.perf_counter() - start
    return len(load_tokenizer().encode(outputs[0][len(PROMPT) :])) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model source (default: GPT-2 124M, random weights)")
    parser.add_argument("--rounds", type=at_least_one, default=5)
    parser.add_argument("--new-tokens", type=at_least_one, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        model = args.model or GPT(GPTConfig()).save_pretrained(folder)
        app_args = ("--model", str(model))
        with running_app(ROOT / "app.py", *app_args, env=app_env()) as app, httpx.Client(timeout=API_TIMEOUT) as client:
            tokens_per_second(app.url, "generate", 8, client)  # warm both paths up
            tokens_per_second(app.url, "generate_with_probabilities", 8, client)
            figures: dict[str, list[float]] = {"generate": [], "generate_with_probabilities": []}
            for _ in range(args.rounds):
                for name, runs in figures.items():
                    runs.append(tokens_per_second(app.url, name, args.new_tokens, client))
    off, on = (statistics.median(runs) for runs in figures.values())
    print(f"| /generate | {off:.1f} tokens/s | /generate_with_probabilities | {on:.1f} tokens/s | "
          f"view on / off {on / off:.2f} (goal >= 0.90) |")  # fmt: skip


if __name__ == "__main__":
    main()
