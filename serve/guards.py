"""Fair use of a Gradio app's queue: one client cannot fill it, and work nobody reads stops.

Gradio (6.x) has a global queue size but no per-client limit, and a `/call/` job whose result is never
fetched runs to its end. These two guards read the queue's state (`blocks._queue`), which Gradio does
not document: tests/test_app.py fails if a Gradio release changes it.
"""

from __future__ import annotations

import json
import os

# The routes that put a job into the queue: the page and gradio_client (queue/join), the plain HTTP API.
JOIN_ROUTES = ("/gradio_api/queue/join", "/gradio_api/call/")
UNREAD_LIMIT = 64  # updates a client may leave unread before its generation is taken as abandoned


def client_of(headers: dict[str, str], peer: str | None) -> str:
    """Who sent a request: on a Hugging Face Space (behind its proxy) the first X-Forwarded-For address,
    elsewhere the connection's own address (a header there could be forged to dodge the limit)."""
    forwarded = headers.get("x-forwarded-for", "")
    if os.environ.get("SPACE_ID") and forwarded:
        return forwarded.split(",")[0].strip()
    return peer or "unknown"


def _request_client(request) -> str:
    headers = {k.lower(): v for k, v in request.headers.items()}
    return client_of(headers, request.client.host if request.client else None)


def jobs_of(blocks, client: str) -> int:
    """How many jobs of client are waiting in blocks' queue or running."""
    queue = blocks._queue
    waiting = [event for events in queue.event_queue_per_concurrency_id.values() for event in events.queue]
    running = [event for job in queue.active_jobs if job for event in job]
    return sum(_request_client(event.request) == client for event in waiting + running if event.request)


class PerClientLimit:
    """ASGI middleware: a client with `limit` jobs waiting or running is refused another (HTTP 429, with
    a message saying why), so one client cannot fill the queue ahead of everyone else."""

    def __init__(self, app, blocks, limit: int) -> None:
        self.app, self.blocks, self.limit = app, blocks, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].startswith(JOIN_ROUTES):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            client = client_of(headers, (scope.get("client") or (None,))[0])
            if jobs_of(self.blocks, client) >= self.limit:
                await _refuse(send, f"you already have {self.limit} generations waiting or running; wait for one "
                                    "to finish (or stop one) before starting another")  # fmt: skip
                return
        await self.app(scope, receive, send)


async def _refuse(send, message: str) -> None:
    body = json.dumps({"detail": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 429, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def unread_updates(blocks, session_hash: str | None) -> int:
    """How many updates of this session are waiting for a reader: a client reading its stream keeps this
    near zero; a `/call/` job whose result nobody fetches lets it grow with every token."""
    messages = blocks._queue.pending_messages_per_session.get(session_hash) if session_hash else None
    return messages.qsize() if messages is not None else 0
