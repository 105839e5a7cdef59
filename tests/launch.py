"""Run a Gradio app script (app.py) in a subprocess and wait until its API answers: for the tests,
the benchmarks and anyone scripting the app."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

START_TIMEOUT_S = 180  # a busy machine may take long to import torch and gradio
PORT_TRIES = 3
API_TIMEOUT = httpx.Timeout(600, connect=60)  # a long generation streams for minutes on a busy CPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_env(threads: int | None = None) -> dict[str, str]:
    """This environment without Space settings or analytics, and optionally a fixed number of torch threads."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    for name in ("SPACE_ID", "MODEL_ID", "GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT"):
        env.pop(name, None)
    env["GRADIO_ANALYTICS_ENABLED"] = "False"
    return env


class AppExited(RuntimeError):
    """The app exited before it answered."""


def wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float = START_TIMEOUT_S) -> float:
    """Seconds until url answers; raises with the app's output if it exits or the time runs out."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if process.poll() is not None:
            raise AppExited(f"the app exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/gradio_api/info", timeout=2) as response:
                if response.status == 200:
                    return time.perf_counter() - start
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"the app did not answer at {url} within {timeout:.0f} s:\n{log.read_text()}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass(frozen=True)
class RunningApp:
    url: str
    ready_seconds: float  # from start to the first answer
    log: Path  # its stdout and stderr


@contextlib.contextmanager
def running_app(script: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[RunningApp]:
    """Run `python script --port <free port> *args` on 127.0.0.1 and yield where it answers. Its output
    goes to a file, so a chatty server can never block on a full pipe. A port another process took
    between choosing and binding it is retried with a new one."""
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "app.log"
        for attempt in range(PORT_TRIES):
            port = free_port()
            command = [sys.executable, str(script), "--port", str(port), *args]
            with open(log, "w") as out:
                process = subprocess.Popen(command, cwd=script.parent, env=env or app_env(), stdout=out, stderr=out)
            url = f"http://127.0.0.1:{port}"
            try:
                ready = wait_until_up(url, process, log)
            except AppExited:
                stop(process)
                if "address already in use" in log.read_text().lower() and attempt < PORT_TRIES - 1:
                    continue
                raise
            except BaseException:
                stop(process)
                raise
            try:
                yield RunningApp(url, ready, log)
            finally:
                stop(process)
            return


def api_events(
    url: str, data: list | str, api_name: str = "generate", client: httpx.Client | None = None, read_after: float = 0
) -> Iterator[tuple[str, object]]:
    """Call the app's HTTP API as any program may (POST /gradio_api/call/<api_name>, then, read_after seconds
    later, read its server-sent events) and yield each (event, data) the moment it arrives: "generating" with
    the outputs so far, then "complete" or "error". data: the inputs as a list, or a JSON body written by hand
    (NaN, Infinity...). Pass one httpx.Client for many calls: a client per call loads its TLS certificates
    each time."""
    http = client or httpx.Client(timeout=API_TIMEOUT)
    endpoint = f"{url}/gradio_api/call/{api_name}"
    try:
        if isinstance(data, str):
            posted = http.post(endpoint, content=data, headers={"content-type": "application/json"}, timeout=60)
        else:
            posted = http.post(endpoint, json={"data": data}, timeout=60)
        time.sleep(read_after)
        with http.stream("GET", f"{endpoint}/{posted.raise_for_status().json()['event_id']}") as response:
            event = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    yield event, json.loads(line.removeprefix("data: "))
    finally:
        if client is None:
            http.close()


def timed_generate(
    url: str, inputs: list, client: httpx.Client | None = None, on_first_token: Callable[[], None] | None = None
) -> tuple[float, float, str]:
    """Call the app's /generate with inputs (the prompt first) through its HTTP API and return (seconds to
    the first text beyond the prompt, seconds to the end, the final text), as the bytes arrive."""
    prompt, start, first, text, event = inputs[0], time.perf_counter(), None, inputs[0], None
    for event, outputs in api_events(url, inputs, client=client):
        if event in ("generating", "complete"):
            text = outputs[0]
            if first is None and len(text) > len(prompt):
                first = time.perf_counter() - start
                if on_first_token is not None:
                    on_first_token()
    total = time.perf_counter() - start
    if event != "complete":
        raise RuntimeError(f"the app answered {event!r}: {text!r}")
    return total if first is None else first, total, text
