"""This project's CPU decoding beside the engines a CPU user could pick instead, on the same weights, in the
same run, interleaved: OpenVINO with int8 weights through its C++ GenAI pipeline and through optimum-intel's
Python loop, and CTranslate2 int8 when it is installed.

    python3 -m venv .venv-bench && .venv-bench/bin/pip install torch==2.13.0 -r requirements.txt \\
        -r requirements-bench.txt -e .
    .venv-bench/bin/pip uninstall -y torchvision  # a CUDA build pip pulls in: see requirements-bench.txt
    .venv-bench/bin/python bench/anchors.py [--model SOURCE] [--repeats 3] [--new-tokens 96] [--threads 2]

--model picks the weights (default: GPT-2 124M with GPT-2's random initialisation, seed 0, as
bench/generate.py). Each engine decodes greedily, never stopping early, after a 10-token prompt (decode
tokens/s) and after a 512-token prompt, or the longest the model's context holds (time to the first
token); each figure is the median over the repeats, and the ratios are against this project's int8 with
the compiled decoding step (what the app serves once its background compile is done), beside the eager
step it serves until then. The engines' packages are in requirements-bench.txt: the app and the tests
never need them. Nothing is downloaded: the exports are made here from the weights folder, tokenizer
included.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from generate import build_weights, compiled, time_ours, time_transformers

from model.tokenizer import load_tokenizer
from serve import load_for_inference
from serve.flags import at_least_one
from train.config import TrainConfig
from train.data import load_tokens

GREEDY = dict(temperature=0.0)


def prompt_of(length: int) -> list[int]:
    """The first length tokens of the shipped Tiny Shakespeare."""
    config = TrainConfig()  # the trainer's default text and token cache
    return [int(t) for t in load_tokens(config.data, config.cache_dir)[:length]]


class Ours:
    name = "this project int8, compiled step (the app once compiled)"

    def __init__(self, folder: Path, compile_step: bool = True) -> None:
        self.model, self.extra = load_for_inference(folder, device="cpu"), {}
        if compile_step:
            self.model, self.extra = compiled(self.model)  # generate()'s step=
        else:
            self.name = "this project int8, eager (the app until then; generate())"

    def run(self, prompt: list[int], new_tokens: int) -> tuple[float, float]:
        first, rate, _ = time_ours(self.model, prompt, new_tokens, GREEDY | self.extra)
        return first, rate


class OptimumIntel:
    name = "OpenVINO int8, optimum-intel"

    def __init__(self, folder: Path, threads: int, out: Path) -> None:
        from optimum.intel import OVModelForCausalLM, OVWeightQuantizationConfig
        from transformers import AutoTokenizer

        config = {"INFERENCE_NUM_THREADS": str(threads), "PERFORMANCE_HINT": "LATENCY", "CACHE_DIR": ""}
        int8 = OVWeightQuantizationConfig(bits=8)
        self.model = OVModelForCausalLM.from_pretrained(folder, export=True, quantization_config=int8, ov_config=config)
        self.model.save_pretrained(out)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.save_pretrained(out)
        self.folder = out

    def run(self, prompt: list[int], new_tokens: int) -> tuple[float, float]:
        first, rate, _ = time_transformers(self.model, prompt, new_tokens, GREEDY)
        return first, rate


class GenAI:
    name = "OpenVINO int8, GenAI LLMPipeline"

    def __init__(self, folder: Path, threads: int) -> None:
        import openvino as ov
        import openvino_genai
        from openvino_tokenizers import convert_tokenizer
        from transformers import AutoTokenizer

        tokenizer, detokenizer = convert_tokenizer(AutoTokenizer.from_pretrained(folder), with_detokenizer=True)
        ov.save_model(tokenizer, folder / "openvino_tokenizer.xml")
        ov.save_model(detokenizer, folder / "openvino_detokenizer.xml")
        self.pipe = openvino_genai.LLMPipeline(str(folder), "CPU", INFERENCE_NUM_THREADS=threads)
        self.config = openvino_genai.GenerationConfig(max_new_tokens=1, ignore_eos=True, do_sample=False)
        self.text = load_tokenizer().decode

    def run(self, prompt: list[int], new_tokens: int) -> tuple[float, float]:
        self.config.max_new_tokens = new_tokens
        metrics = self.pipe.generate([self.text(prompt)], self.config).perf_metrics
        if metrics.get_num_input_tokens() != len(prompt):
            raise RuntimeError(f"GenAI read {metrics.get_num_input_tokens()} prompt tokens, not {len(prompt)}")
        return metrics.get_ttft().mean / 1e3, 1e3 / metrics.get_tpot().mean


class CTranslate2:
    name = "CTranslate2 int8"

    def __init__(self, folder: Path, threads: int, out: Path) -> None:
        import ctranslate2
        from transformers import AutoTokenizer

        ctranslate2.converters.TransformersConverter(str(folder)).convert(str(out), quantization="int8", force=True)
        self.generator = ctranslate2.Generator(str(out), device="cpu", intra_threads=threads)
        self.pieces = AutoTokenizer.from_pretrained(folder).convert_ids_to_tokens

    def run(self, prompt: list[int], new_tokens: int) -> tuple[float, float]:
        times = []
        start = time.perf_counter()
        pieces = self.pieces(prompt)
        for _ in self.generator.generate_tokens(pieces, max_length=new_tokens, sampling_topk=1, end_token=[]):
            times.append(time.perf_counter())
        return times[0] - start, (len(times) - 1) / (times[-1] - times[0])


def engines(folder: Path, threads: int, scratch: Path) -> list:
    """Every engine this environment can run; one that cannot be built is reported and left out."""
    built = [Ours(folder), Ours(folder, compile_step=False)]
    try:
        optimum = OptimumIntel(folder, threads, scratch / "openvino")
    except ImportError as err:
        print(f"OpenVINO left out ({err}): pip install -r requirements-bench.txt")
        return built
    built.append(optimum)
    makers = [
        lambda: GenAI(optimum.folder, threads),  # GenAI reads optimum-intel's export
        lambda: CTranslate2(folder, threads, scratch / "ctranslate2"),
    ]
    for make in makers:
        try:
            built.append(make())
        except ImportError as err:
            print(f"left out: {err}")
    return built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="weights to time (default: random GPT-2 124M, seed 0)")
    parser.add_argument("--repeats", type=at_least_one, default=3)
    parser.add_argument("--new-tokens", type=at_least_one, default=96)
    parser.add_argument("--threads", type=at_least_one, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        folder = build_weights(args.model, Path(scratch) / "weights")
        runners = engines(folder, args.threads, Path(scratch))
        # the long prompt and its 2 new tokens fit the context (the shipped model's is 256); runners[0] is ours
        short, long = prompt_of(10), prompt_of(min(512, runners[0].model.config.block_size - 2))
        for runner in runners:  # first-call set-up, not timed
            runner.run(short, 4)
        decode = {r.name: [] for r in runners}
        first = {r.name: [] for r in runners}
        for _ in range(args.repeats):
            for runner in runners:  # interleaved: each repeat times every engine once
                decode[runner.name].append(runner.run(short, args.new_tokens)[1])
                first[runner.name].append(runner.run(long, 2)[0])
    ours = Ours.name
    rate = {name: statistics.median(values) for name, values in decode.items()}
    ttft = {name: statistics.median(values) for name, values in first.items()}
    print(f"\n{args.new_tokens} greedy tokens, {args.threads} threads, median of {args.repeats} interleaved repeats")
    print(f"| engine | decode tok/s (10-token prompt) | our speed / its | first token after {len(long)} tokens (ms) | "
          "our speed / its |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in rate:
        all_rates = ", ".join(f"{v:.1f}" for v in decode[name])
        print(
            f"| {name} | {rate[name]:.1f} ({all_rates}) | {rate[ours] / rate[name]:.2f}x | "
            f"{ttft[name] * 1e3:.0f} | {ttft[name] / ttft[ours]:.2f}x |"
        )
    fastest = max(rate, key=rate.get)
    print(f"decode: this project runs at {rate[ours] / rate[fastest]:.2f}x the fastest ({fastest})")


if __name__ == "__main__":
    main()
