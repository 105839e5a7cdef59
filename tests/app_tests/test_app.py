"""The real app.py in a subprocess, called through gradio_client and raw HTTP, as API users call it."""

import asyncio
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from app_server import ROOT, running_app
from gradio_client import Client
from gradio_client.exceptions import AppError
from launch import api_events, app_env, free_port, timed_generate

from model import EOT_TOKEN, GPT, CheckpointError, GPTConfig, generate, load_tokenizer, stream_text
from serve import load_for_inference, precision_of

PARAMETERS = ["prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "repetition_penalty"]
BLOCK_SIZE = 64  # the tiny preset's context


@pytest.fixture(scope="module")
def app(tiny_folder):
    # fp32 on both sides, so greedy text matches token for token; every token streamed, since the tiny
    # model writes faster than the app's 50 ms between updates
    flags = ["--dtype", "float32", "--quantize", "none", "--update-seconds", "0"]
    with running_app("--model", str(tiny_folder), *flags) as app:
        yield app


@pytest.fixture(scope="module")
def url(app):
    return app.url


@pytest.fixture(scope="module")
def client(url):
    return Client(url, verbose=False)


@pytest.fixture(scope="module")
def reference(tiny_folder):
    return GPT.from_pretrained(tiny_folder)


def expected(model, prompt, max_new_tokens, prompt_ids=None, **sampling):
    tokenizer = load_tokenizer()
    ids = generate(model, prompt_ids or tokenizer.encode(prompt), max_new_tokens, **sampling)
    return prompt + "".join(stream_text(ids, tokenizer))


def greedy(client, prompt="ROMEO:", max_new_tokens=12):
    return client.predict(prompt, max_new_tokens, 0, 0, 1.0, -1, api_name="/generate")


def raw_call(url, body: str) -> tuple[str, object]:
    """POST a hand-written JSON body (NaN and Infinity included) and return the last SSE event and its data."""
    *_, last = api_events(url, body)
    return last


def test_the_http_api_streams_what_gradio_client_returns(url, client, reference):
    """serve.launch.timed_generate (how the benchmarks time a visitor) reads the same text the client library
    gets, the first token before the end; an error event is raised, not timed."""
    first, total, text = timed_generate(url, ["ROMEO:", 30, 0, 0, 1.0, -1])
    assert text == client.predict("ROMEO:", 30, 0, 0, 1.0, -1, api_name="/generate")
    assert text == expected(reference, "ROMEO:", 30, temperature=0) and 0 < first < total
    with pytest.raises(RuntimeError, match="'error'"):
        timed_generate(url, ["   ", 30, 0, 0, 1.0, -1])


def test_three_public_endpoints_with_named_parameters(client):
    """/generate returns the text; /generate_with_probabilities takes the same parameters and returns the text
    and the records; /generate_with_probabilities_json (the MCP tool) both as one JSON text. Only the prompt is
    required (an agent may leave the rest to their defaults)."""
    api = client.view_api(return_format="dict", print_info=False)
    names = ["/generate", "/generate_with_probabilities", "/generate_with_probabilities_json"]
    assert list(api["named_endpoints"]) == names
    assert api["unnamed_endpoints"] == {}
    for name, returns in zip(names, (1, 2, 1), strict=True):
        parameters = api["named_endpoints"][name]["parameters"]
        assert [p["parameter_name"] for p in parameters] == PARAMETERS
        assert [p["parameter_has_default"] for p in parameters] == [False] + [True] * 6
        assert len(api["named_endpoints"][name]["returns"]) == returns


@pytest.mark.parametrize("prompt", ["ROMEO:", "To be or not<|endoftext|>"])
def test_greedy_output_is_prompt_plus_generate(client, reference, prompt):
    # "<|endoftext|>" typed in a prompt is text, encoded as such on both sides
    text = client.predict(prompt, 30, 0, 0, 1.0, -1, api_name="/generate")
    assert text == expected(reference, prompt, 30, temperature=0)
    assert len(text) > len(prompt)


def test_same_seed_same_text(client, reference):
    args = ("First Citizen:", 30, 1.0, 0, 1.0)
    first = client.predict(*args, 1234, api_name="/generate")
    assert client.predict(*args, 1234, api_name="/generate") == first
    assert first == expected(reference, "First Citizen:", 30, temperature=1.0, seed=1234)
    assert client.predict(*args, 1235, api_name="/generate") != first


def test_keyword_arguments_and_defaults(client, reference):
    text = client.predict(prompt="ROMEO:", temperature=0, max_new_tokens=10, api_name="/generate")
    assert text == expected(reference, "ROMEO:", 10, temperature=0)


def test_submit_streams_growing_text(client):
    job = client.submit("First Citizen:", 60, 0.8, 50, 1.0, 7, api_name="/generate")
    outputs = list(job)
    final = job.result()
    assert len(set(outputs)) >= 5, outputs
    assert all(b.startswith(a) for a, b in zip(outputs, outputs[1:], strict=False))
    assert outputs[0] == "First Citizen:" and outputs[-1] == final and len(final) > len(outputs[0])


BAD_INPUTS = [
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": " \n\t "}, "prompt is empty"),
    ({"prompt": 123}, "prompt must be text"),
    ({"prompt": None}, "prompt must be text"),
    ({"prompt": "a" * 100_001}, "at most 100,000"),
    ({"max_new_tokens": 0}, "max_new_tokens must be a whole number from 1 to 64"),
    ({"max_new_tokens": BLOCK_SIZE + 1}, "max_new_tokens must be a whole number from 1 to 64"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be a whole number"),
    ({"max_new_tokens": "ten"}, "max_new_tokens must be a whole number"),
    ({"temperature": -0.1}, r"temperature must be a number from 0 to 2 \(0 = greedy\)"),
    ({"temperature": 2.5}, "temperature must be a number from 0 to 2"),
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"top_k": -1}, r"top_k must be a whole number from 0 to 200 \(0 = off\)"),
    ({"top_k": 201}, "top_k must be a whole number from 0 to 200"),
    ({"top_k": 3.5}, "top_k must be a whole number"),
    ({"top_p": 0.0}, "top_p must be a number from 0.05 to 1"),
    ({"top_p": 1.5}, "top_p must be a number from 0.05 to 1"),
    ({"top_p": [0.5]}, "top_p must be a number"),
    ({"seed": -2}, r"seed must be blank, -1 \(random\) or a whole number"),
    ({"seed": 0.5}, "seed must be blank, -1"),
    ({"seed": "abc"}, "seed must be blank, -1"),
    ({"seed": True}, "seed must be blank, -1"),
    ({"seed": 10**400}, "seed must be blank, -1"),
]


@pytest.mark.parametrize("change, message", BAD_INPUTS, ids=[f"{change}"[:30] for change, _ in BAD_INPUTS])
def test_bad_input_is_refused_with_a_message(client, change, message):
    before = greedy(client)
    arguments = dict(prompt="ROMEO:", max_new_tokens=12, temperature=0.8, top_k=50, top_p=1.0, seed=1) | change
    with pytest.raises(AppError, match=message):
        client.predict(*arguments.values(), api_name="/generate")
    assert greedy(client) == before


@pytest.mark.parametrize("name", PARAMETERS[1:])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_refused(client, url, name, value):
    before = greedy(client)
    arguments = dict(max_new_tokens="12", temperature="0.8", top_k="50", top_p="1.0", seed="1") | {name: value}
    event, data = raw_call(url, '{"data": ["ROMEO:", ' + ", ".join(arguments.values()) + "]}")
    assert event == "error" and data["error"].startswith(f"{name} must be"), data
    assert greedy(client) == before


def test_a_refused_request_logs_one_line_not_a_traceback(client, app):
    before = len(app.log.read_text().splitlines())
    for temperature in (5, 6, 7):
        with pytest.raises(AppError, match="temperature must be"):
            client.predict("ROMEO:", 4, temperature, 0, 1.0, 1, api_name="/generate")
    new = app.log.read_text().splitlines()[before:]
    refused = [line for line in new if line.startswith("refused a request: temperature must be")]
    assert len(refused) == 3 and "Traceback" not in "\n".join(new), new


def test_too_few_arguments_are_refused_with_a_4xx(client, url):
    """A call with no values is refused at once, saying how many /generate takes."""
    answer = httpx.post(f"{url}/gradio_api/call/generate", json={"data": []}, timeout=30)
    assert answer.status_code == 422 and "takes 1 to 7 values" in answer.json()["detail"]
    assert greedy(client).startswith("ROMEO:")


def test_a_raw_call_written_before_the_last_setting_was_added_still_runs(url, reference):
    """A plain-HTTP call with six values (as before repetition_penalty came last) runs with its default, 1: the
    app fills in what a call leaves off the end, which Gradio alone would refuse with a traceback."""
    six = raw_call(url, json.dumps({"data": ["ROMEO:", 12, 0, 0, 1.0, -1]}))
    seven = raw_call(url, json.dumps({"data": ["ROMEO:", 12, 0, 0, 1.0, -1, 1.0]}))
    assert six == seven == ("complete", [expected(reference, "ROMEO:", 12, temperature=0)])
    prompt_only = raw_call(url, json.dumps({"data": ["ROMEO:"]}))
    assert prompt_only[0] == "complete" and prompt_only[1][0].startswith("ROMEO:")


def test_long_prompt_keeps_its_last_block_size_tokens_and_says_so(client, reference):
    prompt = "ROMEO:\nWhat light through yonder window breaks? " * 10
    prompt_ids = load_tokenizer().encode(prompt)
    assert len(prompt_ids) > BLOCK_SIZE

    async def run():
        job = client.submit(prompt, 20, 0, 0, 1.0, -1, api_name="/generate")
        logs = [update.log async for update in job if getattr(update, "log", None)]
        return job.result(), logs

    text, logs = asyncio.run(run())
    assert text == expected(reference, prompt, 20, prompt_ids=prompt_ids[-BLOCK_SIZE:], temperature=0)
    assert any(level == "warning" and f"only its last {BLOCK_SIZE} tokens" in log for log, level in logs), logs


def test_six_concurrent_clients_all_answered(url, reference):
    def ask(seed):
        return Client(url, verbose=False).predict("ROMEO:", 24, 0.8, 50, 1.0, seed, api_name="/generate")

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(ask, range(6)))
    for seed, answer in enumerate(answers):
        assert answer == expected(reference, "ROMEO:", 24, temperature=0.8, top_k=50, seed=seed)


def test_model_panel_shows_source_parameters_losses_and_curve(url, tiny_folder, reference):
    config = httpx.get(f"{url}/config", timeout=30).json()
    values = {c["type"]: [] for c in config["components"]}
    for component in config["components"]:
        values[component["type"]].append(component.get("props", {}).get("value"))
    panel = next(v for v in values["markdown"] if v and "parameters" in v)
    for fact in (f"local folder {tiny_folder.name}", f"{reference.num_parameters():,}", "1.2345", "4.5678", "float32"):
        assert fact in panel
    assert str(tiny_folder.parent) not in panel  # no server path on the page
    assert any(v and v.get("url") for v in values["image"])
    sliders = {c["props"]["label"]: c["props"] for c in config["components"] if c["type"] == "slider"}
    assert sliders["Max new tokens"]["maximum"] == BLOCK_SIZE and sliders["Max new tokens"]["value"] == BLOCK_SIZE


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["missing", "corrupt"])
def test_unloadable_model_stops_start_up_with_a_message(tmp_path, kind):
    source = tmp_path / "nothing-here"
    if kind == "corrupt":
        source = tmp_path / "corrupt"
        source.mkdir()
        (source / "model.safetensors").write_bytes(b"not a safetensors file")
    command = [sys.executable, "app.py", "--model", str(source), "--port", str(free_port())]
    result = subprocess.run(command, cwd=ROOT, env=app_env(), capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert f"could not load a model from '{source}'" in result.stderr
    assert "--model" in result.stderr and "Traceback" not in result.stderr + result.stdout


@pytest.mark.slow
def test_a_machine_override_it_cannot_read_stops_start_up_with_a_message(tiny_folder):
    command = [sys.executable, "app.py", "--model", str(tiny_folder), "--port", str(free_port())]
    env = app_env() | {"SHAKESPEARE_MACHINE": "bf16=sometimes"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0 and "Traceback" not in result.stderr + result.stdout
    assert "error: SHAKESPEARE_MACHINE: cannot read 'bf16=sometimes'" in result.stderr


@pytest.mark.slow
def test_defaults_follow_the_environment(monkeypatch):
    import app

    for name in ("SPACE_ID", "MODEL_ID", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT"):
        monkeypatch.delenv(name, raising=False)
    args = app.parse_args([])
    assert (args.model, args.host, args.port, args.share) == (str(ROOT / "assets"), "127.0.0.1", 7860, False)
    monkeypatch.setenv("SPACE_ID", "me/shakespeare-gpt")
    monkeypatch.setenv("GRADIO_SERVER_PORT", "9000")
    monkeypatch.setenv("MODEL_ID", "me/model")
    args = app.parse_args([])
    assert (args.model, args.host, args.port) == ("me/model", "0.0.0.0", 9000)
    args = app.parse_args(["--model", "other", "--host", "::1", "--port", "1234"])
    assert (args.model, args.host, args.port) == ("other", "::1", 1234)


def test_flags_reach_load_for_inference(monkeypatch):
    import app

    calls = []

    def refuse(source, **options):
        calls.append((source, options))
        raise CheckpointError("no weights here")

    monkeypatch.setattr(app.serve, "load_for_inference", refuse)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # main() would otherwise set this process's torch threads
    with pytest.raises(SystemExit) as exit:
        app.main(["--model", "somewhere", "--dtype", "bfloat16", "--quantize", "int8"])
    assert calls == [("somewhere", dict(device="auto", dtype="bfloat16", quantize="int8"))]
    with pytest.raises(SystemExit):
        app.main(["--model", "somewhere", "--device", "cpu"])
    assert calls[-1] == ("somewhere", dict(device="cpu", dtype="auto", quantize="auto"))
    assert "could not load a model from 'somewhere'" in exit.value.code and "no weights here" in exit.value.code


def alone_and_beside_three_others(client: Client, subject: tuple) -> tuple[str, str]:
    """The text of the /generate call `subject` alone, then run at once with 3 others of other lengths and
    settings (a long prompt among them)."""
    alone = client.predict(*subject, api_name="/generate")
    others = [("ROMEO:", 50, 1.2, 0, 1.0, 1), ("JULIET: " * 30, 40, 0.0, 0, 1.0, 2), ("A", 64, 0.7, 5, 0.8, 3)]
    with ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(client.predict, *request, api_name="/generate") for request in [*others, subject]]
        return alone, [job.result() for job in jobs][-1]


@pytest.mark.slow
def test_default_precision_on_the_cpu_is_int8_and_serves_its_own_greedy_text(tiny_folder):
    """The default CPU path (int8) serves generate()'s greedy text; with --max-batch 4 a seeded request
    gives the same text alone and while 3 others of other lengths and settings run beside it."""
    served = load_for_inference(tiny_folder, device="cpu")
    with running_app("--model", str(tiny_folder), "--max-batch", "4", "--update-seconds", "0") as default_app:
        default_url = default_app.url
        client = Client(default_url, verbose=False)
        assert greedy(client, max_new_tokens=30) == expected(served, "ROMEO:", 30, temperature=0)
        panel = httpx.get(f"{default_url}/config", timeout=30).text
        subject = ("To be or not", 60, 0.9, 40, 0.95, 1234)
        alone, together = alone_and_beside_three_others(client, subject)
        text, records = client.predict(*subject, api_name="/generate_with_probabilities")
        log = default_app.log.read_text()
    assert precision_of(served) == "float32+int8" and "float32+int8" in panel
    assert together == alone == expected(served, subject[0], 60, temperature=0.9, top_k=40, top_p=0.95, seed=1234)
    assert "up to 4 generations per step" in log
    assert text == alone
    check_records(records, served, subject[0], text, 0.02)  # the int8 model's own plain forward pass


@pytest.mark.slow
def test_the_app_answers_at_once_and_switches_to_the_compiled_step_between_requests(tiny_folder, wait_until):
    """By default (the CPU) the app answers before the decoding step is compiled, serving eagerly, and
    switches when it is ready; then a seeded request gives the same text alone and beside 3 others."""
    with running_app("--model", str(tiny_folder), "--max-batch", "4", compile=True) as compiled_app:
        client = Client(compiled_app.url, verbose=False)
        assert client.predict("ROMEO:", 8, 0.0, api_name="/generate").startswith("ROMEO:")
        log = compiled_app.log.read_text
        assert "compiled decoding ready" not in log()  # answering already: the compiler runs beside it
        assert wait_until(lambda: "decoding steps now run compiled" in log(), seconds=240), log()
        subject = ("To be or not", 40, 0.9, 40, 0.95, 1234)
        alone, together = alone_and_beside_three_others(client, subject)
        assert "compiled decoding unavailable" not in log()
    assert together == alone and len(alone) > len(subject[0])


# each flag, the values it refuses, and what it must be instead
FLAG_RULES = [
    (("--max-batch", "--max-per-client"), ("0", "-2", "1.5", "many"), "a whole number >= 1"),
    (("--update-seconds", "--unread-seconds"), ("-0.5", "nan", "inf", "soon"), "a number of seconds >= 0"),
]
BAD_FLAG_VALUES = [(flag, value, must) for flags, values, must in FLAG_RULES for flag in flags for value in values]


@pytest.mark.parametrize("flag, value, must_be", BAD_FLAG_VALUES)
def test_a_bad_flag_value_is_refused_by_name(flag, value, must_be, capsys):
    import app

    with pytest.raises(SystemExit):
        app.parse_args([flag, value])
    assert f"argument {flag}: must be {must_be}, got {value!r}" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--update-seconds", "--unread-seconds"])
def test_zero_seconds_are_accepted(flag):
    import app

    assert getattr(app.parse_args([flag, "0"]), flag[2:].replace("-", "_")) == 0.0


@pytest.mark.slow
def test_one_client_cannot_fill_the_queue_and_unread_work_stops(tmp_path, wait_until):
    """A client with --max-per-client jobs waiting or running is refused more (HTTP 429, saying why); a
    /call/ job whose result nobody fetches stops early instead of running to its end; then the client
    is served again. Decoding is held while the six calls are made, so none of the first three can end (and
    free a place) before the last is answered, however fast or busy the machine."""
    from app_server import held_decoding

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", block_size=256))  # room for long generations
    model.save_pretrained(tmp_path / "model")
    env, hold = held_decoding(tmp_path, step_seconds=0.02)  # 256 tokens in 5 s or more: a job outlasts 1 s unread
    # an update per token; unread work stops after a second (30 by default)
    flags = ["--max-per-client", "3", "--quantize", "none", "--update-seconds", "0", "--unread-seconds", "1"]
    with running_app("--model", str(tmp_path / "model"), *flags, env=env) as app:
        endpoint = f"{app.url}/gradio_api/call/generate"
        calls = [{"data": ["ROMEO:", 256, 0.8, 50, 1.0, i]} for i in range(6)]
        hold.touch()
        try:
            answers = [httpx.post(endpoint, json=body, timeout=30) for body in calls]
        finally:
            hold.unlink()
        assert [a.status_code for a in answers] == [200, 200, 200, 429, 429, 429]
        assert "you already have 3 generations waiting or running" in answers[-1].json()["detail"]
        assert wait_until(lambda: app.log.read_text().count("nobody reads its result") >= 3, 60)
        stopped = [line for line in app.log.read_text().splitlines() if "nobody reads its result" in line]
        assert len(stopped) == 3 and all(int(line.split()[4]) < 256 for line in stopped), stopped
        # served again: a job leaves the queue just after its generation logs that it stopped, so ask until
        # there is room (a short job each time it is granted, within the limit of 3)
        short = {"data": ["ROMEO:", 4, 0, 0, 1.0, 1]}
        assert wait_until(lambda: httpx.post(endpoint, json=short, timeout=30).status_code == 200, 30)
        assert greedy(Client(app.url, verbose=False), max_new_tokens=100).startswith("ROMEO:")


# -- /generate_with_probabilities and the MCP server


def check_records(records: list[dict], model, prompt: str, text: str, tolerance: float) -> None:
    """The records spell the text's continuation, and each one's p and top are the distribution its token was
    drawn from by a plain forward pass over the prompt and the generated ids (softmax at temperature 1, no
    cache)."""
    tokenizer = load_tokenizer()
    prompt_ids, new_ids = tokenizer.encode(prompt), [r["id"] for r in records]
    assert prompt + tokenizer.decode(new_ids) == text
    with torch.no_grad():
        logits, _ = model(torch.tensor([prompt_ids + new_ids]))
    expected = logits[0, len(prompt_ids) - 1 : -1].float().softmax(-1)
    for record, row in zip(records, expected, strict=True):
        assert record["token"] == tokenizer.decode([record["id"]])
        assert abs(record["p"] - float(row[record["id"]])) <= tolerance
        assert len(record["top"]) == 5 and all(set(alt) == {"token", "id", "p"} for alt in record["top"])
        assert all(abs(alt["p"] - float(row[alt["id"]])) <= tolerance for alt in record["top"])
        assert [alt["p"] for alt in record["top"]] == sorted((alt["p"] for alt in record["top"]), reverse=True)
        assert abs(record["top"][0]["p"] - float(row.max())) <= tolerance


@pytest.mark.parametrize("sampling", [(0, 0, 1.0, -1), (1.4, 20, 0.9, 7)], ids=["greedy", "filtered"])
def test_probabilities_endpoint_matches_a_plain_forward_pass(client, reference, sampling):
    """Its text is /generate's; each record's p and top are the fp32 model's own distribution (before
    temperature, top-k, top-p), as a plain forward pass over the same tokens gives it."""
    text, records = client.predict("ROMEO:", 20, *sampling, api_name="/generate_with_probabilities")
    if sampling[-1] != -1:
        assert text == client.predict("ROMEO:", 20, *sampling, api_name="/generate")
    check_records(records, reference, "ROMEO:", text, 1e-5)


def test_a_call_with_only_a_prompt_takes_the_apps_defaults(client):
    """An agent may send the prompt alone: the rest are the page's defaults, max_new_tokens within the context
    (200, or the tiny model's 64). The seed is random, so a run may end sooner, on <|endoftext|>."""
    text, records = client.predict("ROMEO:", api_name="/generate_with_probabilities")
    ended_early = len(records) < BLOCK_SIZE and records[-1]["id"] == EOT_TOKEN
    assert text.startswith("ROMEO:") and (len(records) == BLOCK_SIZE or ended_early)
    assert client.predict("ROMEO:", api_name="/generate").startswith("ROMEO:")


def test_probabilities_endpoint_refuses_what_generate_refuses(client):
    with pytest.raises(AppError, match="prompt is empty"):
        client.predict("  ", 20, 0, 0, 1.0, -1, api_name="/generate_with_probabilities")


def test_an_mcp_client_gets_whole_descriptions_text_json_and_refusals(url, reference):
    """Over the app's streamable HTTP MCP endpoint: the two tools are listed, each parameter with its whole
    description; generate returns the text, generate_with_probabilities JSON (the text and the records), and a
    refused call an error that says why."""
    from mcp import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    from webapp.generation import PARAMETERS as DESCRIPTIONS

    greedy_call = {"prompt": "ROMEO:", "max_new_tokens": 20, "temperature": 0, "top_k": 0}

    async def session_calls():
        async with streamable_http_client(f"{url}/gradio_api/mcp/") as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                tools = {tool.name: tool for tool in (await session.list_tools()).tools}
                calls = [
                    await session.call_tool("generate", greedy_call),
                    await session.call_tool("generate_with_probabilities", greedy_call),
                    await session.call_tool("generate_with_probabilities", {"prompt": "  "}),
                ]
                return tools, calls

    tools, (text, with_probabilities, refused) = asyncio.run(session_calls())
    assert set(tools) == {"generate", "generate_with_probabilities"}
    for tool in tools.values():
        assert "Shakespeare" in tool.description or "Like generate" in tool.description
        properties = tool.inputSchema["properties"]
        assert set(PARAMETERS) <= set(properties) and tool.inputSchema.get("required") == ["prompt"]
        for name in PARAMETERS:  # whole: the full sentence, the end of a wrapped description included
            assert properties[name]["description"] == DESCRIPTIONS[name]
    assert "1.2 wanders" in tools["generate"].inputSchema["properties"]["temperature"]["description"]
    assert not text.isError and text.content[0].text == expected(reference, "ROMEO:", 20, temperature=0)
    answer = json.loads(with_probabilities.content[0].text)  # JSON an agent can parse, not a Python repr
    assert answer["text"] == text.content[0].text
    check_records(answer["records"], reference, "ROMEO:", answer["text"], 1e-5)
    assert refused.isError and "prompt is empty" in refused.content[0].text


# -- the OpenAI-style completions API (/v1), through the official openai package


@pytest.fixture(scope="module")
def openai_client(url):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)  # any key: the client needs one


def test_an_openai_completion_is_the_continuation_generate_writes(openai_client, client, reference):
    answer = openai_client.completions.create(model="any", prompt="ROMEO:", max_tokens=12, temperature=0)
    (choice,) = answer.choices
    assert "ROMEO:" + choice.text == expected(reference, "ROMEO:", 12, temperature=0) == greedy(client)
    assert choice.finish_reason == "length" and answer.object == "text_completion"
    prompt_tokens = len(load_tokenizer().encode("ROMEO:"))
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (prompt_tokens, 12)
    assert answer.usage.total_tokens == prompt_tokens + 12
    default = openai_client.completions.create(model="any", prompt="ROMEO:", temperature=0)
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens, left out or null
    null = openai_client.completions.create(
        model="any", prompt="ROMEO:", temperature=0, extra_body={"max_tokens": None}
    )
    assert null.usage.completion_tokens == 16 and null.choices[0].text == default.choices[0].text


def test_a_seeded_openai_call_gives_generates_text_plain_and_streamed(openai_client, client):
    settings = dict(max_tokens=30, temperature=0.9, top_p=0.95, seed=7, extra_body={"top_k": 40})
    plain = openai_client.completions.create(model="any", prompt="JULIET:", **settings).choices[0].text
    assert "JULIET:" + plain == client.predict("JULIET:", 30, 0.9, 40, 0.95, 7, api_name="/generate")
    chunks = list(openai_client.completions.create(model="any", prompt="JULIET:", stream=True, **settings))
    assert "".join(chunk.choices[0].text for chunk in chunks) == plain
    assert [chunk.choices[0].finish_reason for chunk in chunks][-1] == "length"
    assert all(chunk.choices[0].finish_reason is None for chunk in chunks[:-1]) and len(chunks) > 2


def test_a_repetition_penalty_is_the_last_setting_of_generate_and_reaches_the_openai_route(
    client, openai_client, reference
):
    """repetition_penalty comes last (gradio_client calls are positional): through /generate, /v1/completions
    (by name) and the library alike, greedy text with a penalty of 1.5 is generate()'s with it."""
    with_penalty = expected(reference, "ROMEO:", 40, temperature=0, repetition_penalty=1.5)
    assert with_penalty != expected(reference, "ROMEO:", 40, temperature=0)
    assert client.predict("ROMEO:", 40, 0, 0, 1.0, -1, 1.5, api_name="/generate") == with_penalty
    answer = openai_client.completions.create(model="any", prompt="ROMEO:", max_tokens=40, temperature=0,
                                              extra_body={"repetition_penalty": 1.5})  # fmt: skip
    assert "ROMEO:" + answer.choices[0].text == with_penalty
    with pytest.raises(AppError, match="repetition_penalty must be a number from 1 to 2"):
        client.predict("ROMEO:", 4, 0, 0, 1.0, -1, 3, api_name="/generate")


def test_a_stream_ends_with_done_and_its_usage_when_asked(url):
    body = {"model": "any", "prompt": "ROMEO:", "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5


def test_a_stop_sequence_ends_the_text_before_it_plain_and_streamed(openai_client, reference):
    full = expected(reference, "ROMEO:", 30, temperature=0).removeprefix("ROMEO:")
    stop = full[9:12]  # three characters inside the greedy continuation
    cut = full[: full.index(stop)]
    for stream in (False, True):
        answer = openai_client.completions.create(
            model="any", prompt="ROMEO:", max_tokens=30, temperature=0, stop=["zzzz", stop], stream=stream
        )
        chunks = list(answer) if stream else [answer]
        assert "".join(chunk.choices[0].text for chunk in chunks) == cut
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs_are_the_models_own_with_the_top_alternatives(openai_client, reference):
    answer = openai_client.completions.create(model="any", prompt="ROMEO:", max_tokens=8, temperature=0, logprobs=3)
    choice = answer.choices[0]
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens) == choice.text and len(logprobs.tokens) == 8
    assert logprobs.text_offset[0] == len("ROMEO:") and all(len(top) == 3 for top in logprobs.top_logprobs)
    ids = load_tokenizer().encode("ROMEO:" + choice.text)
    with torch.no_grad():
        expected_logprobs = reference(torch.tensor([ids]))[0][0].log_softmax(-1)
    first = expected_logprobs[len(load_tokenizer().encode("ROMEO:")) - 1]
    assert abs(logprobs.token_logprobs[0] - float(first.max())) < 1e-4  # greedy: the likeliest token
    assert max(logprobs.top_logprobs[0].values()) == pytest.approx(logprobs.token_logprobs[0], abs=1e-6)


@pytest.mark.parametrize(
    "change, param, message",
    [
        (dict(temperature=5), "temperature", "temperature must be"),
        (dict(prompt="   "), "prompt", "prompt is empty"),
        (dict(max_tokens=0), "max_tokens", "max_tokens must be"),
        (dict(extra_body={"top_k": 1000}), "top_k", "top_k must be"),
        (dict(stop=["a", "b", "c", "d", "e"]), "stop", "up to 4"),
        (dict(n=2), "n", "not served"),
    ],
)
def test_a_bad_openai_request_gets_a_400_in_openais_shape(openai_client, change, param, message):
    import openai

    with pytest.raises(openai.BadRequestError) as refused:
        openai_client.completions.create(**({"model": "any", "prompt": "ROMEO:"} | change))
    assert refused.value.status_code == 400
    error = refused.value.body
    assert message in error["message"] and error["param"] == param and error["type"] == "invalid_request_error"


def test_a_body_that_is_not_json_gets_a_400_in_openais_shape(url):
    answer = httpx.post(f"{url}/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert answer.status_code == 400 and "not valid JSON" in answer.json()["error"]["message"]


def test_the_models_route_names_the_model_and_no_server_path(url, tiny_folder):
    answer = httpx.get(f"{url}/v1/models")
    assert answer.status_code == 200
    (model,) = answer.json()["data"]
    assert model["id"] == tiny_folder.name and model["object"] == "model"
    assert str(tiny_folder.parent) not in answer.text
