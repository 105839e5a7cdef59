"""The app's requests: each way in (the page's Generate, the API endpoints, the MCP tools) builds its sampling
settings by name, checks the request and streams its completion through Generation.stream, which stops work
nobody reads. The handlers' docstrings are what the API page and MCP agents read. (No postponed annotations
here: gr.api reads the handlers' types at run time to type the endpoints' outputs.)"""

import inspect
import json
import logging
from collections.abc import Callable

import gradio as gr

import serve
from model.sampling import RANDOM_SEED, SETTINGS, SamplingParams
from serve import policy, probability_view

from . import guards, probability_html

log = logging.getLogger("app")
# /generate_with_probabilities updates at most this often: each update re-sends every record so far, and
# Gradio walks them whole, which at the text's 50 ms takes CPU from decoding (bench/probability_view.py)
RECORDS_UPDATE_SECONDS = 0.2
START = {name: setting.start for name, setting in SETTINGS.items()}  # what a visitor or an API caller starts from


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
