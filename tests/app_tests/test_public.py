"""The real app.py in a subprocess as a public Space meets a hostile visitor: a burst of parallel calls from one
client, malformed calls on every route that takes one, the monitoring page, sniffable answers, and server paths
in what the page is sent (webapp/guards.py and app.py's launch)."""

import asyncio
import contextlib
import json
import re
import tempfile
from types import SimpleNamespace

import httpx
import pytest
import torch
from app_server import ROOT, held_decoding, running_app
from launch import api_events, timed_generate

from model import GPT, GPTConfig
from webapp import guards

LIMIT = 8  # the app's default --max-per-client
STOPPED = "nobody reads its result"  # the app's log line for a /call/ job left unread


@pytest.fixture(scope="module")
def app(tiny_folder, wait_until):
    with running_app("--model", str(tiny_folder), "--quantize", "none", "--update-seconds", "0") as app:
        # The server answers before launch() prints its last start-up lines (the hint about share=True, then
        # the MCP server's address): the log lines after those are the requests' own.
        wait_until(lambda: "Streamable HTTP URL" in app.log.read_text(), 60)
        yield app


def generate_index(url) -> int:
    """/generate's fn_index, as the page and gradio_client name it on /queue/join."""
    config = httpx.get(f"{url}/config", timeout=30).json()
    return next(d["id"] for d in config["dependencies"] if d["api_name"] == "generate")


def example_index(url) -> int:
    """The fn_index of the examples' loader: a function that runs at once, not in the queue."""
    config = httpx.get(f"{url}/config", timeout=30).json()
    return next(d["id"] for d in config["dependencies"] if d["backend_fn"] and not d["queue"])


# -- one client's burst


@pytest.fixture(scope="module")
def burst_app(tmp_path_factory):
    """The app on a 256-token tiny model (room for long generations), on a Space (so X-Forwarded-For tells
    clients apart), each decoding step slowed to 50 ms; yields it and the file that holds its decoding."""
    folder = tmp_path_factory.mktemp("burst")
    GPT(GPTConfig.from_preset("tiny", block_size=256)).save_pretrained(folder / "model")
    env, hold = held_decoding(folder, step_seconds=0.05)
    env["SPACE_ID"] = "test/public"
    # an update per token; unread work stops after a second (30 by default)
    flags = ["--host", "127.0.0.1", "--quantize", "none", "--update-seconds", "0", "--unread-seconds", "1"]
    with running_app("--model", str(folder / "model"), *flags, env=env) as app:
        yield app, hold


def call(url: str, index: int, fn_index: int, burst: str) -> tuple[str, dict]:
    """The i-th call of a burst, on each of the three routes that queue a generation in turn."""
    values = ["ROMEO:", 256, 0.8, 50, 1.0, index]
    route = index % 3
    if route == 0:
        return f"{url}/gradio_api/call/generate", {"data": values}
    if route == 1:
        return f"{url}/gradio_api/call/v2/generate", {"prompt": "ROMEO:", "max_new_tokens": 256, "seed": index}
    return f"{url}/gradio_api/queue/join", {"data": values, "fn_index": fn_index, "session_hash": f"{burst}-{index}"}


async def burst(url: str, client: str, count: int) -> list[httpx.Response]:
    """count calls from one client at once, each on a connection of its own."""
    fn_index = generate_index(url)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    headers = {"X-Forwarded-For": client}
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=120) as http:
        calls = [call(url, i, fn_index, f"{client}-{count}") for i in range(count)]
        return await asyncio.gather(*(http.post(endpoint, json=body) for endpoint, body in calls))


@pytest.mark.slow
@pytest.mark.parametrize("count", [20, 200])
def test_a_burst_from_one_client_gets_its_limit_and_another_client_is_served_at_once(burst_app, count, wait_until):
    """count parallel calls from one client, on all three routes: exactly --max-per-client are accepted (its
    decoding held, none can end and free a place) and the rest refused (429, saying why); the queue is not
    full for another client, whose first token comes within 2 s while the 8 run; once they end (stopped
    as unread), the first client is served again."""
    app, hold = burst_app
    flooder = f"10.{count % 256}.0.1"  # an address of its own in each test: no job of an earlier one counts
    stopped_before = app.log.read_text().count(STOPPED)
    hold.touch()
    try:
        answers = asyncio.run(burst(app.url, flooder, count))
        other = httpx.post(f"{app.url}/gradio_api/call/generate", json={"data": ["JULIET:", 4, 0, 0, 1.0, -1]},
                           headers={"X-Forwarded-For": "10.0.0.2"}, timeout=60)  # fmt: skip
    finally:
        hold.unlink()
    statuses = [answer.status_code for answer in answers]
    print(f"\n{count} parallel calls from one client: {statuses.count(200)} accepted, {statuses.count(429)} refused")
    assert statuses.count(200) == LIMIT and statuses.count(429) == count - LIMIT, statuses
    refusal = next(answer for answer in answers if answer.status_code == 429).json()["detail"]
    assert f"you already have {LIMIT} generations waiting or running" in refusal
    assert other.status_code == 200, other.text  # another client gets in while the burst's 8 wait

    stopped_at_first_token = []
    with httpx.Client(headers={"X-Forwarded-For": "10.0.0.3"}, timeout=120) as http:
        first, _, text = timed_generate(
            app.url, ["ROMEO:", 20, 0, 0, 1.0, -1], client=http,
            on_first_token=lambda: stopped_at_first_token.append(app.log.read_text().count(STOPPED) - stopped_before),
        )  # fmt: skip
    print(f"another client's first token: {first:.2f} s")
    assert first < 2.0 and text.startswith("ROMEO:")
    assert stopped_at_first_token == [0]  # the burst's jobs were all still running beside it

    assert wait_until(lambda: app.log.read_text().count(STOPPED) - stopped_before >= LIMIT, 120)
    again = httpx.post(f"{app.url}/gradio_api/call/generate", json={"data": ["ROMEO:", 4, 0, 0, 1.0, 1]},
                       headers={"X-Forwarded-For": flooder}, timeout=60)  # fmt: skip
    assert again.status_code == 200, again.text


def test_openai_style_calls_count_toward_the_clients_limit_and_are_refused_in_openais_shape(burst_app):
    """4 jobs queued through /call/ and 4 streaming /v1/completions calls (decoding held, so none ends): the
    client's 8; its next call is refused on either route, /v1's in OpenAI's shape (the openai package raises
    RateLimitError), while another client is still served."""
    openai = pytest.importorskip("openai")
    app, hold = burst_app
    headers = {"X-Forwarded-For": "10.77.0.1"}
    body = {"model": "any", "prompt": "ROMEO:", "max_tokens": 200, "stream": True}
    hold.touch()
    try:
        with httpx.Client(headers=headers, timeout=60) as http, contextlib.ExitStack() as streams:
            for index in range(4):
                queued = http.post(f"{app.url}/gradio_api/call/generate", json={"data": ["ROMEO:", 200, 0.8, 50, 1.0,
                                                                                          index]})  # fmt: skip
                assert queued.status_code == 200, queued.text
            for _ in range(4):
                stream = streams.enter_context(http.stream("POST", f"{app.url}/v1/completions", json=body))
                assert stream.status_code == 200
            refused = http.post(f"{app.url}/v1/completions", json=body | {"stream": False})
            queued = http.post(f"{app.url}/gradio_api/call/generate", json={"data": ["ROMEO:", 4, 0, 0, 1.0, 1]})
            client = openai.OpenAI(base_url=f"{app.url}/v1", api_key="unused", max_retries=0, default_headers=headers)
            with pytest.raises(openai.RateLimitError):
                client.completions.create(model="any", prompt="ROMEO:", max_tokens=4)
            hold.unlink()  # decoding goes on: another client's call is answered beside the client's 8
            other = httpx.post(f"{app.url}/v1/completions", json=body | {"stream": False, "max_tokens": 2},
                               headers={"X-Forwarded-For": "10.77.0.2"}, timeout=60)  # fmt: skip
            assert other.status_code == 200, other.text
    finally:
        hold.unlink(missing_ok=True)
    assert refused.status_code == 429 and queued.status_code == 429
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_exceeded" and f"you already have {LIMIT} generations" in error["message"]


@pytest.mark.slow
def test_a_two_step_call_read_seconds_after_its_post_gets_its_whole_text(tmp_path):
    """The GET of a two-step /call/ may come seconds after its POST: its 200 updates wait unread (more than
    guards.UNREAD_LIMIT) for less than --unread-seconds (30 by default), so it runs to its end and its text
    is the one read at once."""
    torch.manual_seed(0)
    GPT(GPTConfig.from_preset("tiny", block_size=256)).save_pretrained(tmp_path / "model")
    env, _ = held_decoding(tmp_path, step_seconds=0.01)  # 200 tokens in about 2 s
    flags = ["--quantize", "none", "--update-seconds", "0"]  # an update per token
    with running_app("--model", str(tmp_path / "model"), *flags, env=env) as app:
        inputs = ["ROMEO:", 200, 0.8, 50, 1.0, 1]
        *_, (event, at_once) = api_events(app.url, inputs)
        *_, (late_event, late) = api_events(app.url, inputs, read_after=3)
        assert event == late_event == "complete" and late == at_once
        assert STOPPED not in app.log.read_text()


def first_abandoned(checks: list[tuple[float, int]], seconds: float = 10.0) -> float | None:
    """When a ReadWatch first takes work as abandoned, given its checks as (time, updates unread then)."""
    now, count = 0.0, 0
    watch = guards.ReadWatch(lambda: count, seconds, clock=lambda: now)
    for now, count in checks:  # noqa: B007 (the watch reads both through its closures)
        if watch.abandoned():
            return now
    return None


def test_unread_work_is_abandoned_only_after_more_than_the_limit_and_seconds_without_a_read():
    limit = guards.UNREAD_LIMIT
    nobody = [(i / 10, i + 2) for i in range(400)]  # ten updates a second, none ever read
    assert first_abandoned(nobody) == 10.0  # past the limit at 6.3 s, unread since the start at 10 s
    assert first_abandoned(nobody, seconds=0) == (limit - 1) / 10  # 0: as soon as more than the limit wait
    read_once = [(t, n) if t < 5 else (t, n - 40) for t, n in nobody]  # read 40 at 5 s, then nothing
    assert first_abandoned(read_once) == 15.0
    late = [(t, n) if t < 9.5 else (t, 0) for t, n in nobody]  # its stream opened at 9.5 s, 97 waiting
    assert first_abandoned(late) is None
    steady = [(i / 10, limit + 6) for i in range(400)]  # a reader that keeps a backlog of 70 as it reads
    assert first_abandoned(steady) is None


class QueueOf:
    """What guards.live_jobs reads of a Gradio app: its queue's waiting lists and running slots (here: the
    event ids in `running`, none waiting)."""

    def __init__(self) -> None:
        self.running: set[str] = set()
        self._queue = SimpleNamespace(event_queue_per_concurrency_id={}, active_jobs=[])

    def sync(self) -> None:
        self._queue.active_jobs = [[SimpleNamespace(_id=event) for event in sorted(self.running)]]


def test_a_clients_place_is_freed_once_when_answers_come_back_between_its_posts():
    """PerClientLimit (limit 3) in front of an app whose answers the test releases one by one, each job still
    running after its answer: a place stays taken from the post's arrival to its job's end, whatever order
    the answers and the later posts come in."""
    blocks, released = QueueOf(), {}

    async def app(scope, receive, send) -> None:  # answers with its event id once the test releases it
        event = scope["path"].rsplit("/", 1)[-1]
        await released.setdefault(event, asyncio.Event()).wait()
        blocks.running.add(event)
        blocks.sync()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps({"event_id": event}).encode()})

    async def scenario() -> list:
        limit = guards.PerClientLimit(app, blocks, limit=3)
        statuses: dict[str, int] = {}

        async def post(event: str) -> None:
            scope = {"type": "http", "method": "POST", "path": f"/gradio_api/call/{event}", "headers": [],
                     "client": ("10.1.2.3", 5000)}  # fmt: skip

            async def send(message) -> None:
                statuses.setdefault(event, message.get("status"))

            await limit(scope, None, send)

        async def settle() -> None:
            for _ in range(5):
                await asyncio.sleep(0)

        seen = []
        tasks = [asyncio.create_task(post(event)) for event in ("a", "b")]
        await settle()
        released.setdefault("a", asyncio.Event()).set()  # a answered while b still arrives
        await settle()
        seen.append(limit.held("10.1.2.3"))  # a running, b arriving
        tasks.append(asyncio.create_task(post("c")))
        await settle()
        tasks.append(asyncio.create_task(post("d")))  # the fourth: refused, however the answers came
        await settle()
        seen.append(statuses.get("d"))
        for event in ("b", "c"):
            released.setdefault(event, asyncio.Event()).set()
        await settle()
        seen.append(limit.held("10.1.2.3"))  # all three answered and running
        tasks.append(asyncio.create_task(post("e")))
        await settle()
        seen.append(statuses.get("e"))
        blocks.running.discard("a")  # a's job ends: one place free
        blocks.sync()
        tasks.append(asyncio.create_task(post("f")))
        await settle()
        seen.append(statuses.get("f"))
        for event in "abcdef":  # let every accepted post be answered
            released.setdefault(event, asyncio.Event()).set()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        return seen

    assert asyncio.run(scenario()) == [2, 429, 3, 429, None]  # f accepted, so waiting for its answer


# -- malformed calls

VALUES = ["ROMEO:", 12, 0.8, 50, 1.0, 1]
MALFORMED = [
    # (route, body or a function of the app's url giving it, status, words of the reason)
    ("call/generate", {"data": []}, 422, "takes 1 to 7 values"),
    ("call/generate", {"data": [*VALUES, 1.0, 7]}, 422, "got 8"),
    ("call/generate", {"data": "ROMEO:"}, 422, "data must be a list"),
    ("call/generate", {"prompt": "ROMEO:"}, 422, 'needs "data"'),
    ("call/generate", "ROMEO:", 400, "not valid JSON"),
    ("call/generate", [VALUES], 422, "a JSON object"),
    ("call/nothing", {"data": VALUES}, 404, "no API endpoint named"),
    ("call/v2/generate", {}, 422, "needs a value for prompt"),
    ("call/v2/generate", {"max_new_tokens": 12}, 422, "needs a value for prompt"),
    ("call/v2/generate", {"prompt": "ROMEO:", "bogus": 1}, 422, 'no parameter "bogus"'),
    ("call/v2/generate", {"prompt": "ROMEO:", "data": VALUES}, 422, 'no parameter "data"'),
    ("call/v2/nothing", {"prompt": "ROMEO:"}, 404, "no API endpoint named"),
    ("queue/join", lambda url: {"data": [], "fn_index": generate_index(url), "session_hash": "s"}, 422,
     "takes 1 to 7 values"),
    ("queue/join", {"data": VALUES, "fn_index": 999, "session_hash": "s"}, 404, "fn_index 999"),
    ("queue/join", {"data": VALUES, "fn_index": -1, "session_hash": "s"}, 404, "fn_index -1"),
    ("queue/join", {"data": VALUES, "fn_index": "generate", "session_hash": "s"}, 422, "fn_index must be"),
    ("queue/join", {"data": VALUES, "session_hash": "s"}, 422, "fn_index is missing"),
    ("queue/join", lambda url: {"data": [0], "fn_index": example_index(url), "session_hash": "s"}, 404,
     "runs in the queue"),
    ("queue/join", lambda url: {"data": VALUES, "fn_index": generate_index(url)}, 400, "Session hash"),
    ("run/generate", {"data": VALUES}, 404, "runs in the queue"),
    ("run/predict", lambda url: {"data": VALUES, "fn_index": generate_index(url), "session_hash": "s"}, 404,
     "runs in the queue"),
    ("run/predict", lambda url: {"data": ["ROMEO:"], "fn_index": example_index(url), "session_hash": "s"}, 422,
     "must be an integer"),
    ("run/predict", lambda url: {"data": [99], "fn_index": example_index(url), "session_hash": "s"}, 422,
     "an example's index"),
]  # fmt: skip
REPR = re.compile(r"object at 0x|<[\w.]+[ >]|\(of type|Traceback|\b\w+(Error|Exception)\b")


@pytest.mark.parametrize("route, body, status, reason", MALFORMED, ids=[f"{m[0]}-{i}" for i, m in enumerate(MALFORMED)])
def test_a_malformed_call_gets_a_4xx_with_a_one_line_reason_and_at_most_one_log_line(app, route, body, status, reason):
    before = len(app.log.read_text().splitlines())
    body = body(app.url) if callable(body) else body
    content = body if isinstance(body, str) else json.dumps(body)
    answer = httpx.post(f"{app.url}/gradio_api/{route}", content=content, timeout=60,
                        headers={"content-type": "application/json"})  # fmt: skip
    detail = answer.json()["detail"]
    new = app.log.read_text().splitlines()[before:]
    assert answer.status_code == status and isinstance(detail, str) and reason in detail, (answer.status_code, detail)
    assert "\n" not in detail and not REPR.search(detail), detail
    assert len(new) <= 1 and "Traceback" not in "\n".join(new), new


def test_a_body_that_is_not_json_by_its_content_type_is_refused(app):
    answer = httpx.post(f"{app.url}/gradio_api/call/generate", content=json.dumps({"data": VALUES}), timeout=60,
                        headers={"content-type": "text/plain"})  # fmt: skip
    assert answer.status_code == 415 and "application/json" in answer.json()["detail"]


def test_well_formed_calls_still_run_on_every_route(app):
    """The checks refuse only what does not fit: each route still runs /generate, and the examples' loader."""
    fn_index = generate_index(app.url)
    for route, body in [
        ("call/generate", {"data": ["ROMEO:", 4, 0, 0, 1.0, 1]}),
        ("call/v2/generate", {"prompt": "ROMEO:", "max_new_tokens": 4, "temperature": 0}),
        ("queue/join", {"data": ["ROMEO:", 4, 0, 0, 1.0, 1], "fn_index": fn_index, "session_hash": "fine"}),
    ]:
        answer = httpx.post(f"{app.url}/gradio_api/{route}", json=body, timeout=60)
        assert answer.status_code == 200 and answer.json()["event_id"], answer.text
    body = {"data": [1], "fn_index": example_index(app.url), "session_hash": "fine"}
    loaded = httpx.post(f"{app.url}/gradio_api/run/predict", json=body, timeout=60)
    assert loaded.status_code == 200 and loaded.json()["data"][0]["value"] == "ROMEO:", loaded.text


# -- monitoring, headers, paths


def test_the_monitoring_page_is_off_and_logs_no_key(app):
    before = len(app.log.read_text().splitlines())
    answer = httpx.get(f"{app.url}/monitoring", timeout=30)
    summary = httpx.get(f"{app.url}/monitoring/summary", timeout=30)
    new = "\n".join(app.log.read_text().splitlines()[before:])
    assert answer.status_code == 403 and summary.status_code == 403
    assert "monitoring" not in new.lower() and "monitoring/" not in app.log.read_text(), new


def test_every_answer_says_nosniff_and_framing_is_allowed(app):
    answers = [
        httpx.get(app.url, timeout=30),
        httpx.get(f"{app.url}/config", timeout=30),
        httpx.get(f"{app.url}/gradio_api/info", timeout=30),
        httpx.post(f"{app.url}/gradio_api/call/generate", json={"data": ["ROMEO:", 4, 0, 0, 1.0, 1]}, timeout=30),
        httpx.post(f"{app.url}/gradio_api/call/generate", json={"data": []}, timeout=30),  # refused by a guard
        httpx.get(f"{app.url}/no/such/page", timeout=30),
    ]
    for answer in answers:
        assert answer.headers.get("x-content-type-options") == "nosniff", (answer.url, answer.headers)
        assert "x-frame-options" not in answer.headers, answer.url  # a Space shows the app in a frame
        assert "frame-ancestors" not in answer.headers.get("content-security-policy", ""), answer.url


def test_the_page_and_config_name_no_path_of_the_server(app, tiny_folder):
    """No absolute path of the server: the checkout, the model's folder, the temp dir and Gradio's cache in
    it (where the loss curve would be copied), in /config or the page (which embeds it)."""
    import gradio.utils

    paths = {str(ROOT), str(tiny_folder), tempfile.gettempdir() + "/", gradio.utils.get_upload_folder()}
    config = httpx.get(f"{app.url}/config", timeout=30)
    page = httpx.get(app.url, timeout=30)
    for text in (config.text, page.text):
        assert not [path for path in paths if path in text], [path for path in paths if path in text]
    images = [c["props"]["value"] for c in config.json()["components"] if c["type"] == "image"]
    assert images and all(image["url"].startswith("data:image/png;base64,") for image in images)


def test_no_traceback_in_the_log(app):
    """Last in this file: nothing above, malformed calls included, left a traceback in the log, even later."""
    assert "Traceback" not in app.log.read_text()
