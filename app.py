"""ShakespeareGPT's Gradio app: streams text from the model in the browser, as the API `/generate` (and
`/generate_with_probabilities`) and as an MCP server for agents."""

import argparse
import base64
import inspect
import json
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
from model.card import EXAMPLE_PROMPTS
from model.device import DTYPES
from model.sampling import RANDOM_SEED, SETTINGS, SamplingParams
from serve import policy, probability_view
from serve.flags import at_least_one, seconds
from serve.inference import QUANTIZE
from webapp import guards, openai_api, probability_html

ASSETS = Path(__file__).resolve().parent / "assets"
log = logging.getLogger("app")
QUEUE_SIZE = 32
# /generate_with_probabilities updates at most this often: each update re-sends every record so far, and
# Gradio walks them whole, which at the text's 50 ms takes CPU from decoding (bench/probability_view.py)
RECORDS_UPDATE_SECONDS = 0.2
START = {name: setting.start for name, setting in SETTINGS.items()}  # what a visitor or an API caller starts from
# the page's Stop is live only while a run is on: idle, there is nothing for it to stop
STOP_IDLE, STOP_RUNNING = dict(variant="secondary", interactive=False), dict(variant="stop", interactive=True)
RUNNING = "*Generating…*"  # the stats line while a run is on: the last run's figures are not this one's


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


# Each parameter's whole description, as the API page and MCP agents read it: Gradio takes them from the Args
# lines of the function's docstring and keeps only the first line of each, so described() writes each on one.
PARAMETERS = {
    "prompt": 'the text to continue, e.g. "ROMEO:" or a line of verse; not blank. Only the model\'s last context '
    "of tokens is read.",
    "max_new_tokens": "how many tokens to write, from 1 to the model's context (default 200, or the context if "
    "shorter); stops earlier at the end of a text.",
    "temperature": "randomness, from 0 to 2: 0 always takes the likeliest token, 0.8 is lively, above 1.2 wanders.",
    "top_k": "draw only from this many likeliest tokens, 0 to 200; 0 is off.",
    "top_p": "draw only from the likeliest tokens whose probability adds up to this, 0.05 to 1; 1 is off.",
    "seed": "-1 or None for a random seed, or 0 to 2**63-1: the same seed and settings give the same text.",
    "repetition_penalty": "1 to 2: above 1, a token already in the text the model sees (the prompt and what it "
    "wrote) is made less likely, as transformers' repetition_penalty does; 1 is off.",
}
RECORD = (
    '{"token": its text, "id": its id, "p": the model\'s probability of it (softmax of its logits at temperature 1, '
    'before temperature, top-k and top-p), "top": the 5 most probable tokens under that distribution, each '
    '{"token", "id", "p"}}.'
)


def described(summary: str):
    """Give a handler the docstring Gradio reads: the summary, then one Args line per parameter of PARAMETERS."""

    def describe(fn):
        names = [name for name in inspect.signature(fn).parameters if name in PARAMETERS]
        fn.__doc__ = summary + "\n\nArgs:\n" + "".join(f"    {name}: {PARAMETERS[name]}\n" for name in names)
        return fn

    return describe


class Generation:
    """The app's one way to run a request: check it, stream its completion, stop it when nobody reads it. The
    API endpoints and the page's button are thin wrappers around stream()."""

    def __init__(self, scheduler: serve.Scheduler, tokenizer, blocks: Callable[[], gr.Blocks], update_seconds: float,
                 unread_seconds: float) -> None:  # fmt: skip
        self.scheduler, self.tokenizer, self.blocks = scheduler, tokenizer, blocks
        self.update_seconds, self.unread_seconds = update_seconds, unread_seconds

    def stream(self, visitor: gr.Request | None, prompt, max_new_tokens, params: SamplingParams,
               probabilities: bool = False, every: float = 0.0):  # fmt: skip
        """(text, stats) updates of the completion of prompt (checked here) with params, at most one per
        max(update_seconds, every) seconds; a request the caller has to change raises serve.RequestError."""
        if max_new_tokens is None:  # left to the app: its default, within the model's context
            max_new_tokens = policy.new_tokens(self.scheduler.model.config.block_size)
        request = serve.check_request(self.scheduler.model, prompt, max_new_tokens, params, self.tokenizer)
        if request.cropped:
            gr.Warning(serve.crop_note(request))
        session = visitor.session_hash if visitor is not None else None
        interval = max(self.update_seconds, every) if self.update_seconds else every
        completion = serve.stream_completion(self.scheduler, request, self.tokenizer, interval, probabilities)
        reader = guards.ReadWatch(lambda: guards.unread_updates(self.blocks(), session), self.unread_seconds)
        for text, stats in completion:
            if reader.abandoned():  # a /call/ nobody reads
                log.info("stopped a generation after %d tokens: nobody reads its result", stats.new_tokens)
                return
            yield text, stats

    def refused(self, err: ValueError) -> gr.Error:
        log.info("refused a request: %s", err)  # the caller's mistake: one log line, not a traceback
        return gr.Error(str(err), print_exception=False)

    @described(
        "Write Shakespeare-style text: continue the prompt with a GPT-2 trained on Tiny Shakespeare. Returns (and "
        "streams) the prompt followed by the continuation."
    )
    def generate(
        self,
        prompt: str,
        max_new_tokens: int | None = None,
        temperature: float = START["temperature"],
        top_k: int = START["top_k"],
        top_p: float = START["top_p"],
        seed: int | None = RANDOM_SEED,
        repetition_penalty: float = START["repetition_penalty"],  # new settings come last: callers are positional
        visitor: gr.Request = None,
    ) -> str:  # what each streamed update is: gr.api types the endpoint's outputs from this
        try:
            params = SamplingParams(temperature, top_k, top_p, seed, repetition_penalty, served=True)
            for text, _ in self.stream(visitor, prompt, max_new_tokens, params):
                yield text
        except serve.REFUSED as err:
            raise self.refused(err) from None

    @described(
        "Like generate, and also how sure the model was of each token it wrote. Returns (and streams) the prompt "
        "followed by the continuation, and a list with one record per generated token: " + RECORD
    )
    def generate_with_probabilities(
        self,
        prompt: str,
        max_new_tokens: int | None = None,
        temperature: float = START["temperature"],
        top_k: int = START["top_k"],
        top_p: float = START["top_p"],
        seed: int | None = RANDOM_SEED,
        repetition_penalty: float = START["repetition_penalty"],  # new settings come last: callers are positional
        visitor: gr.Request = None,
    ) -> tuple[str, list[dict]]:  # each streamed update: two outputs, the text and the records
        records = probability_view.Records(self.tokenizer)
        try:
            params = SamplingParams(temperature, top_k, top_p, seed, repetition_penalty, served=True)
            for text, stats in self.stream(visitor, prompt, max_new_tokens, params, True, RECORDS_UPDATE_SECONDS):
                records.update(stats.probabilities)
                yield text, list(records.records)  # a new list: Gradio diffs it with the last
        except serve.REFUSED as err:
            raise self.refused(err) from None

    # Gradio hands an agent an endpoint's value as str(value): a Python repr for text and records. This tool sends
    # them as one JSON object instead, under the name agents see; the tuple endpoint above stays for the HTTP API.
    @described(
        "Like generate, and also how sure the model was of each token it wrote. Returns a JSON object: "
        '{"text": the prompt followed by the continuation, "records": a list with one record per generated '
        "token}. Each record: " + RECORD
    )
    def generate_with_probabilities_json(
        self,
        prompt: str,
        max_new_tokens: int | None = None,
        temperature: float = START["temperature"],
        top_k: int = START["top_k"],
        top_p: float = START["top_p"],
        seed: int | None = RANDOM_SEED,
        repetition_penalty: float = START["repetition_penalty"],  # new settings come last: callers are positional
        visitor: gr.Request = None,
    ) -> str:
        for text, records in self.generate_with_probabilities(
            prompt, max_new_tokens, temperature, top_k, top_p, seed, repetition_penalty, visitor
        ):
            yield json.dumps({"text": text, "records": records})

    # the MCP tools take their names from the functions: this one is generate_with_probabilities, and the tuple
    # endpoint, renamed out of its way, is no MCP tool (Gradio lists a function whose _mcp_type is not "tool",
    # "resource" or "prompt" as none of them)
    generate_with_probabilities_json.__name__ = "generate_with_probabilities"
    generate_with_probabilities.__name__ = "generate_with_probabilities_http"
    generate_with_probabilities._mcp_type = "http only"

    def on_page(self, prompt, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, view: bool,
                visitor: gr.Request):  # fmt: skip
        """The page's Generate: the text, the run's figures and (when the view is on) the coloured tokens. A
        refused request shows its reason and leaves the last continuation where it is."""
        shown = probability_html.View(self.tokenizer)
        try:
            params = SamplingParams(temperature, top_k, top_p, seed, repetition_penalty, served=True)
            for text, stats in self.stream(visitor, prompt, max_new_tokens, params, view):
                yield text, stats.summary(), shown.update(stats.probabilities).html() if view else ""
        except serve.REFUSED as err:
            log.info("refused a request: %s", err)
            gr.Warning(str(err))
            yield gr.skip(), gr.skip(), gr.skip()


def sampling_controls(block_size: int) -> list[gr.components.Component]:
    """The sliders (one per sampling setting, in SETTINGS' order, from what a visitor starts from and bounded by
    the served ranges) and the seed box, after the max-new-tokens slider: on_page's parameters after the prompt."""
    sliders = [
        gr.Slider(*setting.served, value=setting.start, step=1 if setting.whole else 0.05, info=setting.meaning,
                  label=name.replace("top_", "Top-").replace("_", " ").capitalize(), elem_id=name.replace("_", "-"))
        for name, setting in SETTINGS.items()
    ]  # fmt: skip
    return [
        gr.Slider(
            1, block_size, value=policy.new_tokens(block_size), step=1, label="Max new tokens", elem_id="max-new-tokens"
        ),
        *sliders,
        gr.Number(value=RANDOM_SEED, precision=0, label="Seed", info="blank or -1 = random", elem_id="seed"),
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
            curve = dict(label=facts.curve_label(), buttons=["fullscreen", "download"], elem_id="loss-curve")
            inline_image(Path(facts.loss_curve), **curve)  # labelled with the steps it draws: a fine-tune's only
            if facts.curve_note():
                gr.Markdown(facts.curve_note(), elem_id="loss-curve-note")


def build(
    scheduler: serve.Scheduler,
    facts: serve.ModelFacts,
    tokenizer,
    update_seconds: float = serve.UPDATE_SECONDS,
    unread_seconds: float = guards.UNREAD_SECONDS,
) -> gr.Blocks:
    generation = Generation(scheduler, tokenizer, lambda: demo, update_seconds, unread_seconds)
    # every way in shares one limit: each running call is one row of the scheduler's batch
    limits = dict(concurrency_id="generation", concurrency_limit=scheduler.max_batch)
    with gr.Blocks(title="ShakespeareGPT") as demo:
        gr.Markdown("# ShakespeareGPT\nA GPT-2 trained on Tiny Shakespeare. Give it a line and it writes on.")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(value=policy.FIRST_PROMPT, label="Prompt", lines=3, elem_id="prompt")
                with gr.Row():
                    generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop_button = gr.Button("Stop", elem_id="stop", **STOP_IDLE)
                    clear_button = gr.Button("Clear", elem_id="clear")
                output = gr.Textbox(
                    label="Prompt + continuation", lines=14, interactive=False, buttons=["copy"], elem_id="output"
                )
                view = gr.Checkbox(False, label="Show probabilities", elem_id="show-probabilities",
                                   info="each new token coloured by how likely the model found it; hover or tap "
                                   "a token for the 5 likeliest")  # fmt: skip
                probabilities = gr.HTML(visible=False, elem_id="probabilities")
                stats = gr.Markdown(elem_id="stats")
                examples = gr.Examples(
                    [[e] for e in EXAMPLE_PROMPTS],
                    inputs=[prompt],
                    cache_examples=False,
                    api_visibility="private",
                )
            with gr.Column(scale=2):
                settings = sampling_controls(scheduler.model.config.block_size)
                model_panel(facts)

        # Raw values reach the handlers, which check them themselves: the API sees exactly what callers sent.
        # the run's figures show when it ends (or is stopped): the page's sign that it is done
        run_stats = gr.State("")
        page = dict(fn=generation.on_page, inputs=[prompt, *settings, view], outputs=[output, run_stats, probabilities])
        page |= dict(api_visibility="private", preprocess=False, show_progress="minimal", **limits)
        # a run starts with Stop live and the stats line saying so, and ends (done, stopped or refused: a refusal
        # leaves the last run's text and so its figures) with Stop idle again
        starting = dict(fn=lambda: (gr.update(**STOP_RUNNING), RUNNING), outputs=[stop_button, stats])
        starting |= dict(api_visibility="private", queue=False, show_progress="hidden")
        run = generate_button.click(**starting).then(**page)
        example_run = examples.load_input_event.then(**starting).then(**page)
        ended = dict(fn=lambda summary: (summary, gr.update(**STOP_IDLE)), inputs=run_stats)
        for event in (run, example_run, stop_button.click(None, cancels=[run, example_run])):
            event.then(**ended, outputs=[stats, stop_button], api_visibility="private", queue=False)
        view.change(lambda on: gr.update(visible=on), view, probabilities, api_visibility="private", queue=False)
        clear_button.click(None, js="() => ['', '', '', '']", outputs=[prompt, output, stats, probabilities])
        gr.api(generation.generate, api_name="generate", **limits)
        gr.api(generation.generate_with_probabilities, api_name="generate_with_probabilities", **limits)
        gr.api(generation.generate_with_probabilities_json, api_name="generate_with_probabilities_json", **limits)
    return demo.queue(max_size=QUEUE_SIZE)


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
