"""ShakespeareGPT's Gradio app: streams text from the model in the browser, as the API `/generate` (and
`/generate_with_probabilities`), as an MCP server for agents and as an OpenAI-style completions API. This file
parses the flags, loads the model and launches what webapp/ builds."""

import argparse
import logging
import os
import sys
from pathlib import Path

from starlette.middleware import Middleware

import serve
from model import CheckpointError, load_tokenizer
from model.device import DTYPES
from serve.flags import at_least_one, seconds
from serve.inference import QUANTIZE
from webapp import guards, openai_api, probability_html
from webapp.page import QUEUE_SIZE, build

ASSETS = Path(__file__).resolve().parent / "assets"
log = logging.getLogger("app")


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
    parser.add_argument("--update-seconds", type=seconds, default=serve.UPDATE_SECONDS, help="stream updates at "
                        "most this often (the first token is shown at once); 0 = every token")  # fmt: skip
    parser.add_argument("--unread-seconds", type=seconds, default=guards.UNREAD_SECONDS,
                        help=f"stop a generation once more than {guards.UNREAD_LIMIT} of its updates wait and "
                        "none has been read for this long (a /call/ whose result nobody fetches)")  # fmt: skip
    parser.add_argument(
        "--dtype", choices=["auto", *DTYPES], default="auto",
        help="weight dtype; auto: bf16 (or fp16) on CUDA, fp32 activations on the CPU",
    )  # fmt: skip
    parser.add_argument(
        "--quantize", choices=["auto", *QUANTIZE], default="auto",
        help="auto: int8 weights on the CPU (2.6x fp32 decoding on GPT-2 124M, same held-out loss), none on CUDA",
    )  # fmt: skip
    parser.add_argument("--no-mcp", dest="mcp", action="store_false",
                        help="do not serve the app as an MCP server for LLM agents (at /gradio_api/mcp/)")  # fmt: skip
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="on the CPU, do not compile the decoding step in the background (the app serves "
                        "eagerly until the step is compiled; it compiles once idle for a few seconds)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's start-up checks, one line each
    try:
        threads = serve.use_cpu_threads()  # the first read of the machine's capabilities (and their override)
    except ValueError as err:
        sys.exit(f"error: {err}")
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
    logging.info("precision: %s", serve.why_precision(model.device, args.dtype, args.quantize))
    compiled = serve.CompiledDecoding(model) if args.compile and model.device.type == "cpu" else None
    scheduler = serve.Scheduler(model, args.max_batch, compiled)
    tokenizer = load_tokenizer(facts.location)  # the model folder's own tokenizer files, else the packaged ones
    demo = build(scheduler, facts, tokenizer, args.update_seconds, args.unread_seconds)
    # the OpenAI-style routes: the same scheduler, and one queue size with Gradio's queue
    completions = openai_api.CompletionsAPI(
        scheduler, tokenizer, facts.name, lambda: len(guards.live_jobs(demo)), QUEUE_SIZE
    )
    # outermost first: every answer says nosniff, a malformed call is refused before it counts for its client
    middleware = [
        Middleware(guards.NoSniff),
        Middleware(guards.WellFormedCalls, blocks=demo),
        Middleware(guards.PerClientLimit, blocks=demo, limit=args.max_per_client, whole_calls=(openai_api.COMPLETIONS,),
                   refusal=lambda message: openai_api.error_body(message, "rate_limit_exceeded")),
    ]  # fmt: skip
    # monitoring off: Gradio's /monitoring would print its dashboard's secret URL to the log for any visitor
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=True,
                app_kwargs={"middleware": middleware, "routes": completions.routes()}, enable_monitoring=False,
                prevent_thread_lock=True,
                mcp_server=args.mcp, css=probability_html.CSS)  # fmt: skip
    try:
        scheduler.run()  # decoding on the thread that loaded the model: torch runs slower from another
    except KeyboardInterrupt:
        pass
    finally:
        demo.close()


if __name__ == "__main__":
    main()
