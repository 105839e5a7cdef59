"""Generation on the CPU, side by side in one run: this project's decoding against transformers'
GPT2LMHeadModel.generate on the same weights, each precision, beside the machine's memory-bandwidth
ceiling; then the held-out loss of each precision.

    python bench/generate.py [--model SOURCE] [--threads 2] [--quality-model assets ...]

--model picks the weights to time (default: a GPT-2 124M with GPT-2's random initialisation, seed 0).
Decoding reads every weight once per token, so the ceiling of a precision is the bandwidth of a large
read measured here divided by the bytes of weights one token reads. The held-out loss is measured on
the last 10% of Tiny Shakespeare (the trainer's split) for each --quality-model (default: assets/ and
--model when given), so a precision is judged on a trained model, not on random weights.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]

from model import GPT, GPTConfig, generate  # noqa: E402
from serve import load_for_inference, native  # noqa: E402
from serve.compiled import compile_now  # noqa: E402
from serve.flags import at_least_one  # noqa: E402
from serve.inference import cpu_threads  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.data import load_tokens, split_held_out  # noqa: E402

PRECISIONS = {
    "fp32": dict(dtype="float32", quantize="none"),
    "bf16": dict(dtype="bfloat16", quantize="none"),
    "int8": dict(dtype="float32", quantize="int8"),
}
MODES = {"greedy": dict(temperature=0.0), "sampled": dict(temperature=0.8, top_k=50)}


def read_bandwidth(gigabytes: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second of the fastest of a few sums over a buffer far larger than any cache."""
    buffer = torch.ones(int(gigabytes * 2**30) // 4)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best


def bytes_per_token(model: GPT) -> int:
    """Weight bytes one decoding step reads: every Linear (int8 or not), the layer norms, one row of
    each embedding table; the tied head reads the whole token embedding."""
    total = 0
    for module in model.modules():
        if hasattr(module, "weight_bytes"):  # the int8 and packed bf16 layers of serve.inference
            total += module.weight_bytes
        elif isinstance(module, (nn.Linear, nn.LayerNorm)):
            total += sum(p.nbytes for p in module.parameters(recurse=False))
        elif isinstance(module, nn.Embedding):
            total += module.weight[0].nbytes
    return total


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two generations share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def held_out_tokens(data: str) -> torch.Tensor:
    """The trainer's held-out tokens of the text (its default split, the last 10%)."""
    config = TrainConfig(data=data)
    tokens = load_tokens(config.data, config.cache_dir)
    return torch.from_numpy(split_held_out(tokens, config.val_fraction)[1].astype(np.int64))


@torch.inference_mode()
def held_out_loss(model: GPT, tokens: torch.Tensor, max_tokens: int) -> float:
    """Mean cross-entropy over non-overlapping block_size windows of the held-out tokens."""
    block = model.config.block_size
    windows = min(len(tokens) - 1, max_tokens) // block
    total = 0.0
    for w in range(windows):
        chunk = tokens[w * block : (w + 1) * block + 1][None]
        _, loss = model(chunk[:, :-1], chunk[:, 1:])
        total += float(loss)
    return total / windows


def compiled(model: GPT) -> tuple[GPT, dict]:
    """The model and generate()'s step= for its one-token decoding step compiled (serve.CompiledDecoding, as the
    app serves once ready)."""
    decoding = compile_now(model)
    if decoding is None:
        raise RuntimeError("the decoding step did not compile (see the log line above)")
    return model, {"step": decoding.next_token_logits}


def time_ours(model: GPT, prompt: list[int], new_tokens: int, mode: dict) -> tuple[float, float, list[int]]:
    """(seconds to the first token, decode tokens/s after it, the tokens) of model.generate."""
    tokens, times = [], []
    start = time.perf_counter()
    for token in generate(model, prompt, new_tokens, seed=0, **mode):
        times.append(time.perf_counter())
        tokens.append(token)
    return times[0] - start, (len(times) - 1) / (times[-1] - times[0]), tokens


def time_transformers(hf_model, prompt: list[int], new_tokens: int, mode: dict) -> tuple[float, float, list[int]]:
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times, self.tokens, self.prompt_seen = [], [], False

        def put(self, value) -> None:
            if self.prompt_seen:  # the first put() is the prompt itself
                self.times.append(time.perf_counter())
                self.tokens += value.flatten().tolist()
            self.prompt_seen = True

        def end(self) -> None:
            pass

    clock = Clock()
    sampling = dict(do_sample=False) if not mode["temperature"] else dict(do_sample=True, **mode)
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    hf_model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, streamer=clock, pad_token_id=50256,
        **sampling,
    )  # fmt: skip
    return clock.times[0] - start, (len(clock.times) - 1) / (clock.times[-1] - clock.times[0]), clock.tokens


def build_weights(source: str | None, folder: Path) -> Path:
    if source:
        GPT.from_pretrained(source).save_pretrained(folder)
    else:
        torch.manual_seed(0)
        GPT(GPTConfig()).save_pretrained(folder)
    return folder


def speed(args, folder: Path, prompts: dict[int, list[int]], bandwidth: float) -> None:
    from transformers import GPT2LMHeadModel

    native.load()  # the int8 layers' library, built or loaded now rather than part-way through a timing

    # each loader gives a model and what generate() takes beside the sampling mode (a compiled step)
    loaders = {f"this project {name}": (lambda kw=kw: (load_for_inference(folder, device="cpu", **kw), {}))
               for name, kw in PRECISIONS.items()}  # fmt: skip
    loaders["this project int8, compiled step"] = lambda: compiled(load_for_inference(folder, device="cpu"))
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        loaders[f"transformers {name}"] = lambda dtype=dtype: (
            GPT2LMHeadModel.from_pretrained(folder, dtype=dtype).eval(),
            {},
        )
    rows, reference_tokens = {}, {}
    for name, load in loaders.items():
        model, extra = load()
        ours = isinstance(model, GPT)
        timed = time_ours if ours else time_transformers

        def run(model, prompt, new_tokens, mode, timed=timed, extra=extra):
            return timed(model, prompt, new_tokens, mode | extra)

        run(model, prompts[min(prompts)], 4, MODES["greedy"])  # first-call set-up, not timed
        ceiling = bandwidth / bytes_per_token(model) if ours else None
        for length, prompt in prompts.items():
            for mode_name, mode in MODES.items():
                first, rate, tokens = run(model, prompt, args.new_tokens, mode)
                if mode_name == "greedy":
                    reference_tokens.setdefault(length, tokens)  # the first loader: this project's fp32
                    same = common_prefix(tokens, reference_tokens[length])
                else:
                    same = None
                rows[name, length, mode_name] = (first, rate, ceiling, same)
        del model
        gc.collect()

    threads = torch.get_num_threads()
    print(f"\n{args.new_tokens} new tokens, {threads} threads, read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print("| implementation | prompt | mode | first token (ms) | decode tok/s | x transformers fp32 | "
          "ceiling tok/s | of ceiling | greedy tokens shared with this fp32 |")  # fmt: skip
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (name, length, mode_name), (first, rate, ceiling, same) in rows.items():
        baseline = rows["transformers fp32", length, mode_name][1]
        cells = [
            name,
            str(length),
            mode_name,
            f"{first * 1e3:.0f}",
            f"{rate:.1f}",
            f"{rate / baseline:.2f}x",
            f"{ceiling:.0f}" if ceiling else "",
            f"{rate / ceiling:.0%}" if ceiling else "",
            f"{same}/{args.new_tokens}" if same is not None else "",
        ]
        print("| " + " | ".join(cells) + " |")
    for length in prompts:
        ours, theirs = rows["this project fp32", length, "greedy"][0], rows["transformers fp32", length, "greedy"][0]
        print(f"prefill + first token, {length}-token prompt, fp32: {theirs / ours:.2f}x transformers")


def quality(args, sources: list[str]) -> None:
    tokens = held_out_tokens(args.data)
    text = args.data or "the shipped Tiny Shakespeare"
    print(f"\nheld-out loss (last 10% of {text}, up to {args.eval_tokens} tokens)")
    print("| model | " + " | ".join(PRECISIONS) + " |")
    print("| --- |" + " ---: |" * len(PRECISIONS))
    for source in sources:
        losses = {name: held_out_loss(load_for_inference(source, device="cpu", **kw), tokens, args.eval_tokens)
                  for name, kw in PRECISIONS.items()}  # fmt: skip
        cells = [f"{loss:.4f} ({loss / losses['fp32'] - 1:+.2%})" for loss in losses.values()]
        print(f"| {source} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="weights to time (default: random GPT-2 124M)")
    parser.add_argument("--threads", type=at_least_one, default=cpu_threads())
    parser.add_argument("--new-tokens", type=at_least_one, default=200)
    parser.add_argument("--prompt-lengths", type=at_least_one, nargs="+", default=[10, 512])
    parser.add_argument("--data", default="", help="the text, as the trainer's --data (default: the trainer's)")
    parser.add_argument("--quality-model", action="append", help="default: assets/ and --model")
    parser.add_argument("--eval-tokens", type=at_least_one, default=40_000, help="held-out tokens per loss")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if not args.skip_speed:
        tokens = held_out_tokens(args.data).tolist()
        with tempfile.TemporaryDirectory() as tmp:
            folder = build_weights(args.model, Path(tmp))
            block_size = GPT.from_pretrained(folder).config.block_size
            prompts = {n: tokens[:n] for n in args.prompt_lengths if n + args.new_tokens <= block_size}
            speed(args, folder, prompts, read_bandwidth())
    quality(args, args.quality_model or [str(ROOT / "assets"), *([args.model] if args.model else [])])


if __name__ == "__main__":
    main()
