"""An OpenAI-compatible completions API on the app's own server and port: `POST /v1/completions` and
`GET /v1/models`, so the `openai` package, LangChain's `OpenAI` class and editors' plugins can call the app as they
call vLLM or llama.cpp's server. A call is checked by serve.check_request (the ranges of /generate), runs as a row
of the app's scheduler beside the page's and the API's, and counts toward its client's limit
(guards.PerClientLimit, from its arrival to its last byte) and the queue's size. This is a base model with no chat
template, so there is no /v1/chat/completions."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from starlette.concurrency import iterate_in_threadpool
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

import serve
from model import EOT_TOKEN
from model.sampling import SETTINGS, SamplingParams
from model.tokenizer import TextEncoding
from serve.completions import RunStats
from serve.probability_view import record

COMPLETIONS, MODELS = "/v1/completions", "/v1/models"
DEFAULT_MAX_TOKENS = 16  # OpenAI's
# OpenAI's defaults for what it defines (temperature 1, top_p 1) and top_k off: a caller gets what it would get
# from OpenAI, where the page starts from the app's livelier settings. Every other sampling setting is taken by
# its name in SamplingParams (repetition_penalty, as vLLM takes it), from what a visitor starts from.
OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
MAX_STOPS, MAX_LOGPROBS = 4, 5
FIELDS = {"model", "prompt", "max_tokens", "seed", "stream", "stop", "logprobs", "stream_options", "n", "echo",
          "best_of", "suffix", "user", "presence_penalty", "frequency_penalty", "logit_bias", *SETTINGS}  # fmt: skip


class CallError(Exception):
    """A call the client has to change: an HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> bytes:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": None}}).encode()


def error_response(err: CallError) -> Response:
    return Response(error_body(err.message, err.kind, err.param), err.status, media_type="application/json")


@dataclass(frozen=True)
class Call:
    """A checked /v1/completions call."""

    request: serve.Request
    stop: tuple[str, ...]
    stream: bool
    logprobs: int | None
    usage_in_stream: bool
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex[:24]}")


def _stops(value) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if value is None:
        return ()
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise CallError(400, f"stop must be a non-empty string or a list of up to {MAX_STOPS} of them", "stop")
    return tuple(stops)


def _prompt(value):
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]  # the batch form with one prompt
    if isinstance(value, list):
        raise CallError(400, "prompt must be one string (a list of several prompts is not served)", "prompt")
    return value


def _unsupported(body: dict) -> None:
    for name, allowed in (("n", 1), ("best_of", 1), ("echo", False), ("suffix", None)):
        if body.get(name, allowed) not in (allowed, None):
            raise CallError(400, f"{name}={json.dumps(body[name])} is not served; leave it out", name)
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise CallError(400, f"{name} is not served; leave it out or send 0", name)


def parse_call(body, model, tokenizer: TextEncoding) -> Call:
    """The call a /v1/completions body asks for, checked as /generate checks its values; CallError otherwise."""
    if not isinstance(body, dict):
        raise CallError(400, "the body must be a JSON object")
    if "prompt" not in body:
        raise CallError(400, "prompt is missing: the text to continue", "prompt")
    _unsupported(body)
    logprobs = body.get("logprobs")
    if logprobs is not None and (
        isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= MAX_LOGPROBS
    ):
        raise CallError(400, f"logprobs must be a whole number from 0 to {MAX_LOGPROBS}", "logprobs")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise CallError(400, "stream must be true or false", "stream")
    max_tokens = DEFAULT_MAX_TOKENS if body.get("max_tokens") is None else body["max_tokens"]  # null: OpenAI's 16
    settings = {name: body.get(name, OPENAI_DEFAULTS.get(name)) for name in (*SETTINGS, "seed")}
    try:
        params = SamplingParams(**settings, served=True)
        request = serve.check_request(model, _prompt(body["prompt"]), max_tokens, params, tokenizer)
    except serve.REFUSED as err:
        message = str(err).replace("max_new_tokens", "max_tokens")
        raise CallError(400, message, message.split()[0] if message.split()[0] in FIELDS else None) from None
    options = body.get("stream_options") or {}
    return Call(request, _stops(body.get("stop")), stream, logprobs, bool(options.get("include_usage")))


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at text's end could begin a stop sequence, so must wait for the next piece."""
    return max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)


@dataclass
class Piece:
    """A stretch of a completion's text, the records of its tokens, and why the completion ended (on the last)."""

    text: str
    records: list[dict]
    finish_reason: str | None
    stats: RunStats


def pieces(scheduler: serve.Scheduler, call: Call, tokenizer: TextEncoding) -> Iterator[Piece]:
    """The continuation of call's prompt as it grows, ending at the first stop sequence (which is not sent),
    the end of a text, or max_tokens; with logprobs, each piece carries the records of the tokens it begins."""
    request = call.request
    updates = serve.stream_completion(scheduler, request, tokenizer, 0, probabilities=call.logprobs is not None)
    sent, text, stats = 0, "", None
    records: list[dict] = []  # every token's record so far, with "offset": where its text starts
    records_sent = 0
    try:
        for full, stats in updates:
            text = full[len(request.prompt) :]
            for choice in stats.probabilities[len(records) :]:
                offset = records[-1]["offset"] + len(records[-1]["token"]) if records else 0
                records.append(record(choice, tokenizer) | {"offset": offset})
            cuts = [i for i in (text.find(stop, max(0, sent - len(stop))) for stop in call.stop) if i >= 0]
            end = min(cuts) if cuts else len(text) - held_back(text, call.stop)
            if end > sent or cuts:
                begun = [r for r in records[records_sent:] if r["offset"] < end and r["id"] != EOT_TOKEN]
                yield Piece(text[sent:end], begun, "stop" if cuts else None, stats)
                sent, records_sent = end, records_sent + len(begun)
                if cuts:
                    return
        ended = stats.new_tokens < request.max_new_tokens  # on the end of a text, before max_tokens
        rest = [r for r in records[records_sent:] if r["id"] != EOT_TOKEN]
        yield Piece(text[sent:], rest, "stop" if ended else "length", stats)
    finally:
        updates.close()  # frees the row at the next step, whoever stops reading


def logprobs_of(records: list[dict], start: int, top: int) -> dict:
    """OpenAI's logprobs object for records: each token, its log-probability, the `top` likeliest alternatives
    (the model's distribution before temperature, top-k and top-p) and where its text starts (from `start`)."""
    return {
        "tokens": [r["token"] for r in records],
        "token_logprobs": [_log(r["p"]) for r in records],
        "top_logprobs": [{alt["token"]: _log(alt["p"]) for alt in r["top"][:top]} for r in records],
        "text_offset": [start + r["offset"] for r in records],
    }


def _log(p: float) -> float:
    return math.log(p) if p > 0 else -1e30  # JSON has no -inf


class CompletionsAPI:
    """The two routes, over the app's scheduler and tokenizer. `live_jobs()` counts the Gradio queue's jobs, so
    that this API and the queue share one size (`queue_size` beyond the batch)."""

    def __init__(self, scheduler: serve.Scheduler, tokenizer: TextEncoding, name: str, live_jobs: Callable[[], int],
                 queue_size: int) -> None:  # fmt: skip
        self.scheduler, self.tokenizer, self.name = scheduler, tokenizer, name
        self.live_jobs, self.capacity = live_jobs, scheduler.max_batch + queue_size
        self.in_flight = 0

    def routes(self) -> list[Route]:
        return [Route(COMPLETIONS, self.completions, methods=["POST"]), Route(MODELS, self.models, methods=["GET"])]

    async def models(self, _: HttpRequest) -> Response:
        model = {"id": self.name, "object": "model", "created": 0, "owned_by": "shakespeare-gpt"}
        return JSONResponse({"object": "list", "data": [model]})

    async def completions(self, http: HttpRequest) -> Response:
        try:
            try:
                body = json.loads(await http.body())
            except ValueError as err:
                raise CallError(400, f"the body is not valid JSON ({err})") from None
            call = parse_call(body, self.scheduler.model, self.tokenizer)
            if self.in_flight + self.live_jobs() >= self.capacity:
                raise CallError(503, "the queue is full; try again in a few seconds", kind="server_error")
        except CallError as err:
            return error_response(err)
        self.in_flight += 1
        done = False

        def finish() -> None:
            nonlocal done
            if not done:
                done, self.in_flight = True, self.in_flight - 1

        if call.stream:
            return StreamingResponse(self._events(call, finish), media_type="text/event-stream")
        try:
            parts = [piece async for piece in iterate_in_threadpool(pieces(self.scheduler, call, self.tokenizer))]
        except RuntimeError as err:  # the scheduler failed a step or is shutting down
            return error_response(CallError(500, str(err), kind="server_error"))
        finally:
            finish()
        last = parts[-1]
        choice = self._choice("".join(p.text for p in parts), [r for p in parts for r in p.records], call)
        return JSONResponse(self._object(call, choice | {"finish_reason": last.finish_reason}, last.stats))

    async def _events(self, call: Call, finish: Callable[[], None]):
        """Server-sent events: a chunk per piece, the last with its finish_reason (then usage, when asked for),
        then `data: [DONE]`."""
        try:
            async for piece in iterate_in_threadpool(pieces(self.scheduler, call, self.tokenizer)):
                choice = self._choice(piece.text, piece.records, call) | {"finish_reason": piece.finish_reason}
                yield _event(self._object(call, choice))
                if piece.finish_reason and call.usage_in_stream:
                    yield _event(self._object(call, None, piece.stats))
            yield "data: [DONE]\n\n"
        except RuntimeError as err:
            yield _event({"error": json.loads(error_body(str(err), "server_error"))["error"]})
        finally:
            finish()

    def _choice(self, text: str, records: list[dict], call: Call) -> dict:
        start = len(call.request.prompt)  # OpenAI's offsets count from the prompt's start
        logprobs = None if call.logprobs is None else logprobs_of(records, start, call.logprobs)
        return {"text": text, "index": 0, "logprobs": logprobs}

    def _object(self, call: Call, choice: dict | None, stats: RunStats | None = None) -> dict:
        answer = {
            "id": call.id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [] if choice is None else [choice],
        }
        if stats is not None:
            prompt_tokens = min(len(call.request.prompt_ids), call.request.context)
            answer["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": stats.new_tokens,
                               "total_tokens": prompt_tokens + stats.new_tokens}  # fmt: skip
        return answer


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"
