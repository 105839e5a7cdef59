"""A public Gradio app's guards against a hostile visitor: one client cannot fill the queue, a malformed call
is answered with a reason instead of a traceback, work nobody reads stops, and responses are not sniffed.

Gradio (6.x) has a global queue size but no per-client limit, accepts calls whose values do not fit the
function they name (the error surfaces later, as a traceback in the server's log), and runs a `/call/` job
whose result is never fetched to its end. These guards are ASGI middleware in front of the app (and one
check in the handler); they read the queue's state (`blocks._queue`) and the app's functions (`blocks.fns`),
which Gradio does not document: tests/app_tests/test_app.py and tests/app_tests/test_public.py fail if a Gradio release
changes them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable

log = logging.getLogger("app")

API = "/gradio_api"
# The routes that put a job into the queue: the page and gradio_client (queue/join), the plain HTTP API.
JOIN_ROUTES = (f"{API}/queue/join", f"{API}/call/")
# The routes that run a function at once, outside the queue: the page's small steps (an example's click).
DIRECT_ROUTES = (f"{API}/run/", f"{API}/api/")
UNREAD_LIMIT = 64  # updates a client may leave unread before its generation can be taken as abandoned
# ... and for how long none may have been read: the GET of a two-step `/call/` may come some seconds after its POST
UNREAD_SECONDS = 30.0
MAX_BODY_BYTES = 2**21  # a prompt at its limit (100,000 characters) fits, escaped or not
JSON_TYPES = {"integer": int, "number": (int, float), "string": str, "boolean": bool}
JSON_NAMES = {list: "a list", str: "a string", int: "an integer", bool: "true or false", type(None): "null"}


def client_of(headers: dict[str, str], peer: str | None) -> str:
    """Who sent a request: on a Hugging Face Space (behind its proxy) the first X-Forwarded-For address,
    elsewhere the connection's own address (a header there could be forged to dodge the limit)."""
    forwarded = headers.get("x-forwarded-for", "")
    if os.environ.get("SPACE_ID") and forwarded:
        return forwarded.split(",")[0].strip()
    return peer or "unknown"


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def live_jobs(blocks) -> set[str]:
    """The event ids of blocks' jobs waiting in its queue or running. Gradio moves an event from its waiting
    queue to a running slot without yielding in between, and frees the slot first thing when the job ends,
    is cancelled or fails, so a job is in exactly one of the two from its admission to its end."""
    queue = blocks._queue
    waiting = [event for events in queue.event_queue_per_concurrency_id.values() for event in events.queue]
    running = [event for job in queue.active_jobs if job for event in job]
    return {event._id for event in waiting + running}


class PerClientLimit:
    """ASGI middleware: a client with `limit` generations arriving, waiting or running is refused another
    (HTTP 429, with a message saying why), so one client cannot fill the queue ahead of everyone else.

    A request counts from the moment it arrives: the check and the count happen together on the event loop
    (no await between them), so parallel posts cannot all pass a check made before any of them reached the
    queue. It stays counted while Gradio admits it; once admitted, its job counts (by the event id in the
    answer) until the job leaves the queue's waiting list and running slots. A POST to one of `whole_calls`
    (routes that run their generation within the request, like the OpenAI-style API) counts until its answer's
    last byte; its refusal's body is `refusal(message)` (the route's own error shape)."""

    def __init__(self, app, blocks, limit: int, whole_calls: tuple[str, ...] = (), refusal=None) -> None:
        self.app, self.blocks, self.limit = app, blocks, limit
        self.whole_calls, self.refusal = whole_calls, refusal
        self.arriving: Counter[str] = Counter()  # requests of each client not yet answered
        self.admitted: dict[str, set[str]] = {}  # event ids of each client's jobs, pruned as they end

    def held(self, client: str) -> int:
        """How many generations client has arriving, waiting or running. Every client's ended jobs are
        forgotten on the way, so what is kept stays within what the queue holds, however many come."""
        live = live_jobs(self.blocks)
        for someone, jobs in list(self.admitted.items()):
            jobs &= live
            if not jobs:
                del self.admitted[someone]
        return self.arriving[client] + len(self.admitted.get(client, ()))

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        whole = bool(self.whole_calls) and path.startswith(self.whole_calls)
        if not (scope["type"] == "http" and scope["method"] == "POST" and (whole or path.startswith(JOIN_ROUTES))):
            await self.app(scope, receive, send)
            return
        client = client_of(_headers(scope), (scope.get("client") or (None,))[0])
        if self.held(client) >= self.limit:
            message = (f"you already have {self.limit} generations waiting or running; wait for one to finish (or "
                       "stop one) before starting another")  # fmt: skip
            await answer(send, 429, message, self.refusal(message) if whole and self.refusal else None)
            return
        self.arriving[client] += 1
        status, body = 0, []

        async def watch(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status == 200 and not whole:
                body.append(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            event_id = _event_id(b"".join(body)) if status == 200 else None
            if event_id:  # from arriving to admitted in one step: counted once all along
                self.admitted.setdefault(client, set()).add(event_id)
            self.arriving[client] -= 1
            if self.arriving[client] <= 0:
                del self.arriving[client]


def _event_id(body: bytes) -> str | None:
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    return answer.get("event_id") if isinstance(answer, dict) else None


class WellFormedCalls:
    """ASGI middleware: a call to one of the app's functions whose body does not fit that function (not a JSON
    object, a field of the wrong type, an unknown endpoint or fn_index, a wrong number of values, an unknown
    or missing named parameter, a value of the wrong type for a component Gradio converts) is answered 4xx
    with a one-line reason and logged in one line, before Gradio sees it; Gradio would otherwise accept some
    of these and fail later with a traceback in the log. A function that runs in the queue is refused on the
    direct routes, which would run it outside the queue and its limits.

    A function with preprocess=False (the app's /generate) checks its values itself, with messages of its
    own; only their number is checked here. The functions are blocks.fns: this app renders none per session."""

    def __init__(self, app, blocks) -> None:
        self.app, self.blocks = app, blocks
        self._parameters: dict[str, list[dict]] | None = None

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if not (scope["type"] == "http" and scope["method"] == "POST" and path.startswith(JOIN_ROUTES + DIRECT_ROUTES)):
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive, MAX_BODY_BYTES)
        if body is None:
            problem = (413, f"the request body is over {MAX_BODY_BYTES:,} bytes")
        else:
            problem = self.problem(path, _headers(scope).get("content-type", ""), body)
        if problem:
            status, reason = problem
            log.info("refused a malformed call to %s: %s", path[:80], reason)
            await answer(send, status, reason)
            return
        completed = self.completed(path, body)
        if completed is not body:  # the body grew: say so to whoever reads its length
            headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
            scope = {**scope, "headers": [*headers, (b"content-length", str(len(completed)).encode())]}
        await self.app(scope, _replay(completed, receive), send)

    def completed(self, path: str, body: bytes) -> bytes:
        """body (checked), with the defaults of the trailing parameters a call to a public endpoint leaves off
        appended: Gradio wants every value, and a call written before a setting was added must still run."""
        if not path.startswith(JOIN_ROUTES) or path.startswith(f"{API}/call/v2/"):
            return body  # a direct route, or values by name: nothing is left off by position
        call = json.loads(body)
        if path.startswith(f"{API}/queue/join"):
            fn = self._fn(call.get("fn_index"))
        else:
            fn = self._endpoint(_name_in(path, f"{API}/call/"))
        public = fn is not None and fn.api_visibility == "public"
        parameters = self._api().get(f"/{fn.api_name}", []) if public else []
        if len(parameters) != len(fn.inputs if public else ()) or len(call["data"]) >= len(parameters):
            return body
        call["data"] = [*call["data"], *(p["parameter_default"] for p in parameters[len(call["data"]) :])]
        return json.dumps(call).encode()

    def problem(self, path: str, content_type: str, body: bytes) -> tuple[int, str] | None:
        """(status, reason) when body does not fit the function path names, else None."""
        kind = content_type.split(";")[0].strip().lower()
        if kind and kind != "application/json" and not kind.endswith("+json"):
            return 415, "send the body as JSON (content-type: application/json)"
        try:
            call = json.loads(body)
        except ValueError as err:
            return 400, f"the body is not valid JSON ({err})"
        if not isinstance(call, dict):
            return 422, "the body must be a JSON object"
        if path.startswith(f"{API}/call/v2/"):
            return self._named_parameters(_name_in(path, f"{API}/call/v2/"), call)
        if path.startswith(f"{API}/call/"):
            fn = self._endpoint(_name_in(path, f"{API}/call/"))
            if fn is None:
                return 404, self._no_endpoint(_name_in(path, f"{API}/call/"))
            return _fields(call, SIMPLE_FIELDS) or self._values(fn, call["data"], api=True)
        if path.startswith(f"{API}/queue/join"):
            return _fields(call, PREDICT_FIELDS) or self._queued_call(call)
        return _fields(call, PREDICT_FIELDS) or self._direct_call(_name_in(path, DIRECT_ROUTES), call)

    def _fn(self, index):
        return self.blocks.fns.get(index) if isinstance(index, int) and not isinstance(index, bool) else None

    def _endpoint(self, name: str):
        """The public function named name (what /call/ runs), or None."""
        for fn in self.blocks.fns.values():
            if fn.api_name == name and fn.api_visibility == "public" and fn.fn is not None:
                return fn
        return None

    def _no_endpoint(self, name: str) -> str:
        names = ", ".join(f"/{fn.api_name}" for fn in self.blocks.fns.values() if fn.api_visibility == "public")
        return f"no API endpoint named {_quote(name)}; this app's: {names}"

    def _values(self, fn, data, api: bool = False) -> tuple[int, str] | None:
        inputs = [block for block in fn.inputs if not (api and getattr(block, "skip_api", False))]
        # a public endpoint's parameters with defaults may be left off the end: a call written before a
        # setting was added (it comes last) still runs
        required = self._required(fn) if fn.api_visibility == "public" else len(inputs)
        if len(data) != len(fn.inputs) and not required <= len(data) <= len(inputs):
            names = self._parameter_names(fn)
            listed = f" ({', '.join(names)})" if names and len(names) == len(inputs) else ""
            takes = f"{len(inputs)}" if required == len(inputs) else f"{required} to {len(inputs)}"
            return 422, f'{_label(fn)} takes {takes} values{listed} in "data", got {len(data)}'
        if not fn.preprocess or len(data) != len(fn.inputs):
            return None
        for position, (block, value) in enumerate(zip(fn.inputs, data, strict=True)):
            expected = _json_type(block)
            if value is not None and expected and not _is(value, JSON_TYPES[expected]):
                return 422, f"value {position} of {_label(fn)} must be {'an' if expected[0] == 'i' else 'a'} {expected}"
            samples = getattr(block, "samples", None)  # gr.Examples' dataset: the value picks one of its samples
            if (
                expected == "integer"
                and isinstance(samples, list)
                and value is not None
                and not 0 <= value < len(samples)
            ):
                return 422, f"value {position} of {_label(fn)} must be an example's index, from 0 to {len(samples) - 1}"
        return None

    def _queued_call(self, call: dict) -> tuple[int, str] | None:
        fn = self._fn(call.get("fn_index"))
        if "fn_index" not in call or call["fn_index"] is None:
            return 422, "fn_index is missing: the index of the function to run, as in /config's dependencies"
        if fn is None or not fn.queue:
            return 404, f"no function with fn_index {_quote(call['fn_index'])} runs in the queue"
        return self._values(fn, call["data"])

    def _direct_call(self, name: str, call: dict) -> tuple[int, str] | None:
        if call.get("fn_index") is not None:  # as Gradio picks the function: the index first, else the name
            fn = self._fn(call["fn_index"])
            if fn is None:
                return 404, f"no function with fn_index {_quote(call['fn_index'])}"
        else:
            fn = next((fn for fn in self.blocks.fns.values() if fn.api_name == name and fn.fn is not None), None)
            if fn is None:
                return 404, self._no_endpoint(name)
        if fn.queue:
            endpoint = f"{API}/call/{fn.api_name}" if fn.api_visibility == "public" else f"{API}/queue/join"
            return 404, f"{_label(fn)} runs in the queue: POST {endpoint}"
        return self._values(fn, call["data"])

    def _required(self, fn) -> int:
        """How many of a public endpoint's parameters have no default (the first ones)."""
        parameters = self._api().get(f"/{fn.api_name}", [])
        return sum(not p["parameter_has_default"] for p in parameters) if parameters else len(fn.inputs)

    def _parameter_names(self, fn) -> list[str]:
        return [p["parameter_name"] for p in self._api().get(f"/{fn.api_name}", [])]

    def _api(self) -> dict[str, list[dict]]:
        """Each public endpoint's parameters, as /call/v2/ matches named values to them."""
        if self._parameters is None:
            endpoints = self.blocks.get_api_info()["named_endpoints"]
            self._parameters = {name: info["parameters"] for name, info in endpoints.items()}
        return self._parameters

    def _named_parameters(self, name: str, call: dict) -> tuple[int, str] | None:
        parameters = self._api().get(f"/{name}")
        if parameters is None or self._endpoint(name) is None:
            return 404, self._no_endpoint(name)
        names = [p["parameter_name"] for p in parameters]
        unknown = [key for key in call if key not in names and key != "oauth_token"]
        if unknown:
            return 422, f"/{name} has no parameter {_quote(unknown[0])}; its parameters: {', '.join(names)}"
        missing = [key for key, p in zip(names, parameters, strict=True) if not p["parameter_has_default"]]
        missing = [key for key in missing if key not in call]
        if missing:
            return 422, f"/{name} needs a value for {', '.join(missing)}"
        return None


# The fields of Gradio's request bodies and their JSON types (None: any value). Fields Gradio does not know
# it ignores, and so do these checks.
SIMPLE_FIELDS = {"data": list, "session_hash": (str, type(None)), "oauth_token": (str, type(None))}
PREDICT_FIELDS = SIMPLE_FIELDS | {
    "event_id": (str, type(None)), "event_data": None, "fn_index": (int, type(None)), "trigger_id": (int, type(None)),
    "simple_format": bool, "batched": (bool, type(None)),
}  # fmt: skip


def _fields(call: dict, fields: dict) -> tuple[int, str] | None:
    if "data" not in call:
        return 422, 'the body needs "data": a list of the function\'s input values'
    for key, value in call.items():
        if fields.get(key) is not None and not _is(value, fields[key]):
            kinds = " or ".join(JSON_NAMES[kind] for kind in _tuple(fields[key]))
            return 422, f"{key} must be {kinds}"
    return None


def _is(value, types) -> bool:
    """isinstance as JSON means it: true and false are not numbers."""
    return isinstance(value, types) and not (isinstance(value, bool) and bool not in _tuple(types))


def _tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def _json_type(block) -> str | None:
    try:
        expected = block.api_info().get("type")
    except Exception:  # a component without a plain schema: Gradio's own checks apply
        return None
    return expected if isinstance(expected, str) and expected in JSON_TYPES else None


def _label(fn) -> str:
    return f"/{fn.api_name}" if fn.api_visibility == "public" else f"function {fn._id}"


def _name_in(path: str, prefixes) -> str:
    for prefix in _tuple(prefixes):
        if path.startswith(prefix):
            return path.removeprefix(prefix).strip("/")
    return path


def _quote(value) -> str:
    """A caller's value in a message: as JSON, cut short, so the reason stays one line of plain text."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


async def _read_body(receive, limit: int) -> bytes | None:
    """The request's whole body, or None when it is over limit bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive):
    """A receive that hands the app the body already read, then waits on the connection as before (so a
    client that leaves is still seen leaving)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class NoSniff:
    """ASGI middleware: every response says `X-Content-Type-Options: nosniff`, so a browser never runs a file
    served as text or an image as a script or a page. Framing stays allowed: a Space embeds the app."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_header(message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-content-type-options"]
                message = {**message, "headers": [*headers, (b"x-content-type-options", b"nosniff")]}
            await send(message)

        await self.app(scope, receive, with_header)


async def answer(send, status: int, message: str, body: bytes | None = None) -> None:
    """A JSON error answer: body, else {"detail": message}, as Gradio's own refusals are shaped."""
    body = body or json.dumps({"detail": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def unread_updates(blocks, session_hash: str | None) -> int:
    """How many updates of this session are waiting for a reader: a client reading its stream keeps this
    near zero; a `/call/` job whose result nobody fetches lets it grow with every token."""
    messages = blocks._queue.pending_messages_per_session.get(session_hash) if session_hash else None
    return messages.qsize() if messages is not None else 0


class ReadWatch:
    """Whether anybody reads one generation's updates, asked once per update it sends. It is abandoned once
    more than UNREAD_LIMIT updates wait and none has been read for `seconds`: a `/call/` whose result nobody
    fetches stops, while a client that opens its stream late (the GET of a two-step `/call/`, a slow link,
    a busy machine) still gets the whole text. A count that did not grow since the last check, with one
    update sent in between, means the client read at least one."""

    def __init__(self, unread: Callable[[], int], seconds: float = UNREAD_SECONDS, clock=time.monotonic) -> None:
        self.unread, self.seconds, self.clock = unread, seconds, clock
        self.last_count, self.last_read = 0, clock()

    def abandoned(self) -> bool:
        count, now = self.unread(), self.clock()
        if count <= self.last_count:
            self.last_read = now
        self.last_count = count
        return count > UNREAD_LIMIT and now - self.last_read >= self.seconds
