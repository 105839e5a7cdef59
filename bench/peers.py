"""This project's CPU decoding against llama.cpp and OpenVINO GenAI on the same weights: each engine alone in a
process of its own, one after another, in alternating rounds, so no engine's idle threads take the cores from
the next.

    python3 -m venv .venv-bench && .venv-bench/bin/pip install -r requirements-bench.txt   # once: see that file
    python bench/peers.py [--peer-python .venv-bench/bin/python] [--rounds 3] [--new-tokens 128] [--threads 2]

This script and this project's engine run in the test command's venv; the peers and their exports run in
--peer-python's. The weights are GPT-2 124M with GPT-2's random initialisation (seed 0, as bench/generate.py;
--model for others), written once as GGUF Q8_0 (the gguf package) for llama.cpp and as OpenVINO IR with int8
weights (optimum-intel) for OpenVINO. Every engine decodes greedily and never stops early. It prints, per engine,
the median over the rounds (each round's figure beside it):
- one stream: decode tokens/s after a 10-token prompt;
- 8 streams: the aggregate tokens/s of 8 requests of 10-token prompts given at once (this project's Scheduler,
  OpenVINO's ContinuousBatchingPipeline; llama-cpp-python has no batching API);
- the time to the first token after a 512-token prompt;
and this project's ratio to the best peer on each, with the CPU's features, since the order changes by CPU.
This project runs as the app serves it: int8, its own int8 kernel (serve/native.py), the Scheduler with the
compiled decoding step; generate() (the eager, unbatched path of scripts) is timed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = ("llama.cpp", "openvino")
FEATURES = ("avx2", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
STREAMS = 8


def cpu_line() -> str:
    """The CPU's model and the features that decide which kernels run, from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "CPU: unknown (no /proc/cpuinfo)"
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    have = [name for name in FEATURES if name in flags]
    return f"CPU: {model}, {os.cpu_count()} CPUs; features: {' '.join(have) or 'none of ' + ' '.join(FEATURES)}"


# ---- the workers: each runs in a process of its own and prints one JSON line ----


def timed_stream(tokens) -> tuple[float, float, int]:
    """(seconds to the first token, tokens/s after it, tokens) of an iterator of tokens."""
    start = time.perf_counter()
    stamps = [time.perf_counter() for _ in tokens]
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")
    return stamps[0] - start, rate, len(stamps)


def work_ours(args, prompts: dict) -> dict:
    import threading

    import torch

    from model import SamplingParams, generate
    from serve import Scheduler, load_for_inference, native
    from serve.compiled import compile_now

    torch.set_num_threads(args.threads)
    model = load_for_inference(args.folder, device="cpu")
    if not native.load():
        print(f"warning: the int8 layers run on fbgemm ({native.failure()})", file=sys.stderr)
    greedy = SamplingParams(temperature=0.0)
    generate_rate = timed_stream(generate(model, prompts["short"], args.new_tokens, params=greedy))[1]
    step = compile_now(model)
    scheduler = Scheduler(model, max_batch=16, compiled=step)
    result: dict = {"generate() one stream": generate_rate, "compiled": step is not None}

    def ask(prompt: list[int], new_tokens: int):
        return scheduler.generate(prompt, new_tokens, greedy)

    def clients() -> None:
        try:
            timed_stream(ask(prompts["short"], 8))  # first-call set-up, not timed
            result["one stream"] = timed_stream(ask(prompts["short"], args.new_tokens))[1]
            result["first token after 512"] = timed_stream(ask(prompts["long"], 2))[0]
            start = time.perf_counter()
            streams = [ask(prompt, args.new_tokens) for prompt in prompts["streams"]]
            total = sum(len(list(stream)) for stream in streams)
            result[f"{STREAMS} streams"] = total / (time.perf_counter() - start)
        finally:
            scheduler.close()

    thread = threading.Thread(target=clients)
    thread.start()
    scheduler.run()  # on the thread that loaded the model, as app.py runs it
    thread.join()
    return result


def work_llama(args, prompts: dict) -> dict:
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(args.folder / "model-q8_0.gguf"), n_ctx=1024, n_batch=512, n_ubatch=512,
        n_threads=args.threads, n_threads_batch=args.threads, verbose=False,
    )  # fmt: skip

    def run(prompt: list[int], new_tokens: int) -> tuple[float, float, int]:
        llm.reset()  # no prefix of an earlier prompt is reused
        tokens = llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True)
        return timed_stream(token for token, _ in zip(tokens, range(new_tokens), strict=False))

    return one_stream_and_long_prompt(run, prompts, args.new_tokens)


def one_stream_and_long_prompt(run, prompts: dict, new_tokens: int) -> dict:
    """run(prompt, new_tokens) -> (first token s, tok/s after it): once untimed, then the two timed figures."""
    run(prompts["short"], 8)  # first-call set-up, not timed
    return {"one stream": run(prompts["short"], new_tokens)[1], "first token after 512": run(prompts["long"], 2)[0]}


def work_openvino(args, prompts: dict) -> dict:
    import numpy as np
    import openvino as ov
    import openvino_genai as genai

    folder, threads = str(args.folder / "openvino"), {"INFERENCE_NUM_THREADS": args.threads}
    config = genai.GenerationConfig(max_new_tokens=args.new_tokens, ignore_eos=True, do_sample=False)

    def ids(prompt: list[int]):
        tensor = np.array([prompt], dtype=np.int64)
        return genai.TokenizedInputs(ov.Tensor(tensor), ov.Tensor(np.ones_like(tensor)))

    pipes = [genai.LLMPipeline(folder, "CPU", **threads)]

    def run(prompt: list[int], new_tokens: int):
        config.max_new_tokens = new_tokens
        metrics = pipes[0].generate(ids(prompt), config).perf_metrics
        if metrics.get_num_input_tokens() != len(prompt):
            raise RuntimeError(f"GenAI read {metrics.get_num_input_tokens()} prompt tokens, not {len(prompt)}")
        return metrics.get_ttft().mean / 1e3, 1e3 / metrics.get_tpot().mean

    result = one_stream_and_long_prompt(run, prompts, args.new_tokens)
    pipes.clear()  # one pipeline alive at a time
    batched = genai.ContinuousBatchingPipeline(folder, genai.SchedulerConfig(), "CPU", threads)
    config.max_new_tokens = args.new_tokens
    inputs = [ov.Tensor(np.array([prompt], dtype=np.int64)) for prompt in prompts["streams"]]
    batched.generate(inputs[:2], [config] * 2)  # first-call set-up, not timed
    start = time.perf_counter()
    outputs = batched.generate(inputs, [config] * len(inputs))
    total = sum(len(output.m_generation_ids[0]) for output in outputs)
    result[f"{STREAMS} streams"] = total / (time.perf_counter() - start)
    return result


WORKERS = {"ours": work_ours, "llama.cpp": work_llama, "openvino": work_openvino}


# ---- the exports, run with the peers' Python ----


def export_gguf(folder: Path) -> None:
    """folder's weights as GGUF with Q8_0 matrices (llama.cpp's gpt2 architecture), tokenizer included."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(folder / "model.safetensors")
    writer = gguf.GGUFWriter(folder / "model-q8_0.gguf", "gpt2")
    writer.add_context_length(config["n_positions"])
    writer.add_embedding_length(config["n_embd"])
    writer.add_feed_forward_length(4 * config["n_embd"])
    writer.add_block_count(config["n_layer"])
    writer.add_head_count(config["n_head"])
    writer.add_layer_norm_eps(config.get("layer_norm_epsilon", 1e-5))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    vocab = json.loads((folder / "vocab.json").read_text())
    merges = [line for line in (folder / "merges.txt").read_text().splitlines()[1:] if line]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list([piece for piece, _ in sorted(vocab.items(), key=lambda item: item[1])])
    writer.add_token_types([gguf.TokenType.NORMAL] * len(vocab))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    names = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}  # fmt: skip
    for name, array in tensors.items():
        name = name.removeprefix("transformer.")
        if name.startswith("h."):
            _, layer, rest = name.split(".", 2)
            part, kind = rest.rsplit(".", 1)
            if part.startswith(("attn.c_", "mlp.c_")) and kind == "weight":
                array = array.T  # Conv1D (in, out) to (out, in)
            target = f"blk.{layer}.{names[part]}.{kind}"
        else:
            target = {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
                      "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias"}.get(name)  # fmt: skip
            if target is None:
                continue  # lm_head.weight: tied to the token embedding, which llama.cpp uses for the output
        array = np.ascontiguousarray(array, dtype=np.float32)
        if array.ndim == 2:
            quantized = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(target, quantized, raw_shape=quantized.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(target, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_openvino(folder: Path, threads: int) -> None:
    """folder's weights as OpenVINO IR with int8 weights (optimum-intel), with OpenVINO's tokenizer models."""
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer
    from optimum.intel import OVModelForCausalLM, OVWeightQuantizationConfig
    from transformers import AutoTokenizer

    out = folder / "openvino"
    int8 = OVWeightQuantizationConfig(bits=8)
    options = {"INFERENCE_NUM_THREADS": str(threads), "CACHE_DIR": ""}
    model = OVModelForCausalLM.from_pretrained(folder, export=True, quantization_config=int8, ov_config=options)
    model.save_pretrained(out)
    tokenizer, detokenizer = convert_tokenizer(AutoTokenizer.from_pretrained(folder), with_detokenizer=True)
    ov.save_model(tokenizer, out / "openvino_tokenizer.xml")
    ov.save_model(detokenizer, out / "openvino_detokenizer.xml")


# ---- the driver ----


def prompts_of(length_long: int) -> dict:
    """A 10-token prompt, a long one, and 8 different 10-token prompts, from the shipped Tiny Shakespeare."""
    from train.config import TrainConfig
    from train.data import load_tokens

    config = TrainConfig()
    tokens = [int(t) for t in load_tokens(config.data, config.cache_dir)[: 1000 + 100 * STREAMS]]
    return {
        "short": tokens[:10],
        "long": tokens[:length_long],
        "streams": [tokens[1000 + 100 * i : 1010 + 100 * i] for i in range(STREAMS)],
    }


def run_worker(python: str, engine: str, folder: Path, prompts: Path, args) -> dict | None:
    command = [python, __file__, "--worker", engine, "--folder", str(folder), "--prompts", str(prompts),
               "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        print(f"  {engine} failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-3:]}")
        return None
    return json.loads(lines[-1])


def inner(argv: list[str]) -> None:
    """A worker or an export, as the driver starts them (in the peers' Python for theirs)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", choices=list(WORKERS))
    parser.add_argument("--export", choices=["gguf", "openvino"])
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--prompts", type=Path)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args, json.loads(args.prompts.read_text()))))
    elif args.export == "gguf":
        export_gguf(args.folder)
    else:
        export_openvino(args.folder, args.threads)


def main() -> None:
    if sys.argv[1:2] in (["--worker"], ["--export"]):
        inner(sys.argv[1:])
        return
    sys.path.insert(0, str(ROOT))
    from generate import build_weights

    from serve.flags import at_least_one

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer-python", default=str(ROOT / ".venv-bench" / "bin" / "python"),
                        help="the Python with llama-cpp-python, openvino-genai and the exporters")  # fmt: skip
    parser.add_argument("--model", default=None, help="weights to time (default: random GPT-2 124M, seed 0)")
    parser.add_argument("--rounds", type=at_least_one, default=3)
    parser.add_argument("--new-tokens", type=at_least_one, default=128)
    parser.add_argument("--threads", type=at_least_one, default=2)
    parser.add_argument("--engines", nargs="+", default=["ours", *PEERS], choices=list(WORKERS))
    args = parser.parse_args()
    peers = [engine for engine in args.engines if engine in PEERS]
    if peers and not Path(args.peer_python).exists():
        parser.error(f"--peer-python {args.peer_python} does not exist: build it as requirements-bench.txt says")
    print(cpu_line())
    with tempfile.TemporaryDirectory() as scratch:
        folder = build_weights(args.model, Path(scratch) / "weights")
        for engine, export in (("llama.cpp", "gguf"), ("openvino", "openvino")):
            if engine in peers:
                command = [args.peer_python, __file__, "--export", export, "--folder", str(folder)]
                subprocess.run([*command, "--threads", str(args.threads)], check=True, capture_output=True, cwd=ROOT)
        prompts = Path(scratch) / "prompts.json"
        prompts.write_text(json.dumps(prompts_of(512)))
        results: dict[str, list[dict]] = {engine: [] for engine in args.engines}
        for round_ in range(args.rounds):
            order = args.engines if round_ % 2 == 0 else args.engines[::-1]
            for engine in order:
                python = sys.executable if engine == "ours" else args.peer_python
                result = run_worker(python, engine, folder, prompts, args)
                if result is not None:
                    results[engine].append(result)
                    print(f"  round {round_ + 1}, {engine}: " + ", ".join(f"{k} {v:.3g}" for k, v in result.items()))
    report(results, args)


def report(results: dict[str, list[dict]], args) -> None:
    measures = ["one stream", f"{STREAMS} streams", "first token after 512"]
    print(f"\n{args.new_tokens} greedy tokens, {args.threads} threads, medians of {args.rounds} rounds, "
          "each engine alone in its own process; " + cpu_line())  # fmt: skip
    print("| engine | one stream tok/s | 8 streams aggregate tok/s | first token after 512 tokens (s) |")
    print("| --- | ---: | ---: | ---: |")
    medians: dict[str, dict[str, float]] = {}
    for engine, runs in results.items():
        cells, medians[engine] = [], {}
        for measure in measures:
            values = [run[measure] for run in runs if measure in run]
            if not values:
                cells.append("–")
                continue
            medians[engine][measure] = statistics.median(values)
            cells.append(f"{medians[engine][measure]:.3g} ({', '.join(f'{v:.3g}' for v in values)})")
        print(f"| {engine} | " + " | ".join(cells) + " |")
    extra = [run["generate() one stream"] for run in results.get("ours", [])]
    if extra:
        print(f"this project's generate() (eager, unbatched): {statistics.median(extra):.3g} tok/s one stream")
    ours = medians.get("ours", {})
    for measure in measures:
        peers = {engine: m[measure] for engine, m in medians.items() if engine != "ours" and measure in m}
        if measure not in ours or not peers:
            continue
        faster = min if measure.startswith("first token") else max
        best = faster(peers, key=peers.get)
        ratio = peers[best] / ours[measure] if faster is min else ours[measure] / peers[best]
        print(f"{measure}: this project at {ratio:.2f}x the best peer ({best}), speed over speed")


if __name__ == "__main__":
    main()
