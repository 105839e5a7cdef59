"""ShakespeareGPT's Gradio app: streams text from the model, in the browser and as the API `/generate`."""

from __future__ import annotations

import argparse
import base64
import logging
import mimetypes
import os
import sys
from collections.abc import Callable
from pathlib import Path

import gradio as gr
from gradio.data_classes import ImageData
from starlette.middleware import Middleware

import serve
from model import CheckpointError, load_tokenizer
from model.device import DTYPES
from serve import guards, policy
from serve.inference import QUANTIZE

ASSETS = Path(__file__).resolve().parent / "assets"
log = logging.getLogger("app")
QUEUE_SIZE = 32


def at_least_one(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--model",
        default=os.environ.get("MODEL_ID") or str(ASSETS),
        help="a folder, a .safetensors / .pt file or a Hub repo id (org/name[@revision]); "
        "default: env MODEL_ID, else the model shipped in assets/",
    )
    default_host = "0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1"
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME") or default_host)
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT") or 7860))
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--max-batch", type=at_least_one, default=serve.MAX_BATCH, help="generations decoded "
                        "together, one row each of a model step (more wait in the queue)")  # fmt: skip
    parser.add_argument("--max-per-client", type=at_least_one, default=8,
                        help="generations a client may have queued or running")  # fmt: skip
    parser.add_argument("--update-seconds", type=float, default=serve.UPDATE_SECONDS, help="stream updates at most "
                        "this often (the first token is shown at once); 0 = every token")  # fmt: skip
    parser.add_argument(
        "--dtype", choices=["auto", *DTYPES], default="auto",
        help="weight dtype; auto: bf16 (or fp16) on CUDA, fp32 activations on the CPU",
    )  # fmt: skip
    parser.add_argument(
        "--quantize", choices=["auto", *QUANTIZE], default="auto",
        help="auto: int8 weights on the CPU (2.6x fp32 decoding on GPT-2 124M, same held-out loss), none on CUDA",
    )  # fmt: skip
    return parser.parse_args(argv)


def generation_handler(scheduler: serve.Scheduler, tokenizer, update_seconds: float, blocks: Callable[[], gr.Blocks]):
    """The /generate function: checks a request, streams its completion, and stops it when nobody reads it."""
    model = scheduler.model

    def generate(prompt, max_new_tokens, temperature, top_k, top_p, seed, visitor: gr.Request):
        """Stream the prompt followed by its continuation. temperature 0 is greedy; top_k 0 and
        top_p 1 are off; seed None or -1 draws a random seed. The stream yields the growing text."""
        try:
            request = serve.check_request(model, prompt, max_new_tokens, temperature, top_k, top_p, seed, tokenizer)
        except serve.RequestError as err:  # the caller's mistake: one log line, not a traceback
            log.info("refused a request: %s", err)
            raise gr.Error(str(err), print_exception=False) from None
        if request.cropped:
            gr.Warning(serve.crop_note(request))
        for text, stats in serve.stream_completion(scheduler, request, tokenizer, update_seconds):
            if guards.unread_updates(blocks(), visitor.session_hash) > guards.UNREAD_LIMIT:  # a /call/ nobody reads
                log.info("stopped a generation after %d tokens: nobody reads its result", stats.new_tokens)
                return
            yield text, stats.summary()

    return generate


def sampling_controls(block_size: int) -> list[gr.components.Component]:
    """The sliders and the seed box, in /generate's parameter order after the prompt, starting from the app's
    defaults and bounded by the served ranges."""
    defaults, served = policy.default_params(seed=0), policy.SERVED_RANGES
    return [
        gr.Slider(1, block_size, value=min(200, block_size), step=1, label="Max new tokens", elem_id="max-new-tokens"),
        gr.Slider(
            *served["temperature"], value=defaults.temperature, step=0.05, label="Temperature", info="0 = greedy"
        ),
        gr.Slider(*served["top_k"], value=defaults.top_k, step=1, label="Top-k", info="0 = off"),
        gr.Slider(*served["top_p"], value=defaults.top_p, step=0.05, label="Top-p", info="1 = off"),
        gr.Number(value=policy.RANDOM_SEED, precision=0, label="Seed", info="blank or -1 = random", elem_id="seed"),
    ]


def inline_image(path: Path, **options) -> gr.Image:
    """A gr.Image of the file at path whose value is the file's bytes (a data: URL), not Gradio's copy of the
    file in its cache, whose absolute path /config and the page would name. (Set after construction: a
    subclass of gr.Image would have Gradio write a .pyi stub beside this file.)"""
    kind = mimetypes.guess_type(path.name)[0] or "image/png"
    url = f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"
    image = gr.Image(**options)
    image.value = ImageData(url=url, orig_name=path.name, mime_type=kind).model_dump()
    return image


def model_panel(facts: serve.ModelFacts) -> None:
    with gr.Accordion("Model", open=True):
        gr.Markdown("".join(f"- **{k}**: {v}\n" for k, v in facts.rows()), elem_id="model-facts")
        if facts.loss_curve:
            inline_image(Path(facts.loss_curve), label="Loss curve", buttons=["fullscreen", "download"])


def build(
    scheduler: serve.Scheduler, facts: serve.ModelFacts, update_seconds: float = serve.UPDATE_SECONDS
) -> gr.Blocks:
    tokenizer = load_tokenizer(facts.location)  # the model folder's own tokenizer files, else the packaged ones
    generate = generation_handler(scheduler, tokenizer, update_seconds, lambda: demo)
    with gr.Blocks(title="ShakespeareGPT") as demo:
        gr.Markdown("# ShakespeareGPT\nA GPT-2 trained on Tiny Shakespeare. Give it a line and it writes on.")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=3, placeholder="ROMEO:", elem_id="prompt")
                with gr.Row():
                    generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
                    clear_button = gr.Button("Clear", elem_id="clear")
                output = gr.Textbox(
                    label="Prompt + continuation", lines=14, interactive=False, buttons=["copy"], elem_id="output"
                )
                stats = gr.Markdown(elem_id="stats")
                examples = [[e] for e in policy.EXAMPLE_PROMPTS]
                gr.Examples(examples, inputs=[prompt], cache_examples=False, api_visibility="private")
            with gr.Column(scale=2):
                settings = sampling_controls(scheduler.model.config.block_size)
                model_panel(facts)

        run_stats = gr.State("")
        # Raw values reach generate(), which checks them itself: the API sees exactly what callers sent.
        run = generate_button.click(
            generate,
            [prompt, *settings],
            [output, run_stats],
            api_name="generate",
            preprocess=False,
            concurrency_limit=scheduler.max_batch,  # each running call is one row of the scheduler's batch
        )
        for event in (run, stop_button.click(None, cancels=[run])):
            event.then(lambda summary: summary, run_stats, stats, api_visibility="private", queue=False)
        clear_button.click(None, js="() => ['', '', '']", outputs=[prompt, output, stats])
    return demo.queue(max_size=QUEUE_SIZE)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's start-up checks, one line each
    threads = serve.use_cpu_threads()
    try:
        model = serve.load_for_inference(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize)
        facts = serve.ModelFacts.of(model, args.model, shipped=ASSETS)
    except (CheckpointError, ValueError) as err:
        origin = {os.environ.get("MODEL_ID"): "env MODEL_ID", str(ASSETS): "the default, assets/"}.get(args.model)
        sys.exit(
            f"error: could not load a model from {args.model!r} ({origin or '--model'}):\n  {err}\n"
            "Pass --model (or set MODEL_ID) to a folder with config.json + model.safetensors, a .safetensors / .pt "
            "file or a Hub repo id (org/name); or train one with `python train/train.py --preset cpu --out-dir "
            "out/cpu` and run `python app.py --model out/cpu/best`."
        )
    serve.warm_up(model)
    logging.info(
        "serving %s: %s parameters, %s on %s (%d threads), up to %d generations per step",
        facts.description, f"{facts.parameters:,}", facts.precision, model.device, threads, args.max_batch,
    )  # fmt: skip
    scheduler = serve.Scheduler(model, args.max_batch)
    demo = build(scheduler, facts, args.update_seconds)
    # outermost first: every answer says nosniff, a malformed call is refused before it counts for its client
    middleware = [
        Middleware(guards.NoSniff),
        Middleware(guards.WellFormedCalls, blocks=demo),
        Middleware(guards.PerClientLimit, blocks=demo, limit=args.max_per_client),
    ]
    # monitoring off: Gradio's /monitoring would print its dashboard's secret URL to the log for any visitor
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True,
                app_kwargs={"middleware": middleware}, enable_monitoring=False, prevent_thread_lock=True)  # fmt: skip
    try:
        scheduler.run()  # decoding on the thread that loaded the model: torch runs slower from another
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()


if __name__ == "__main__":
    main()
