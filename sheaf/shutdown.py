"""A bounded shutdown: on SIGTERM, requests still running after a grace period are ended.

uvicorn, as BentoML runs it, waits without limit for every open connection and request to
finish before it exits (BentoML passes no `timeout_graceful_shutdown`, and its process
manager waits 86400 s before a SIGKILL), so one long stream holds the whole server after a
SIGTERM. `Drain` keeps its own bound: during `grace_s` the running requests may finish and
new ones get 503; then the rest are cancelled, and each ends as well as it can:

- not answered yet: 503 with `Retry-After`;
- an SSE stream: a last `{"type": "error", "code": "shutting_down"}` event, then the end;
- anything else already started: its connection closes.

Cancelling the entry service's request closes its upstream connection, which cancels the
deployment's work for it in turn.

A route that ends without an answer (its client left mid-body, or missed a body deadline)
gets one here, a 499 that uvicorn drops: BentoML's `TimeoutMiddleware` would otherwise hold
the request, and so a shutdown, until `traffic.timeout` (minutes).
"""

import asyncio
import logging
import signal
import threading
from dataclasses import dataclass
from types import FrameType
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sheaf.asgi import send_json
from sheaf.streaming import encode_event

GRACE_S = 20.0
RETRY_AFTER_S = 1
SIGNALS = (signal.SIGTERM, signal.SIGINT)
SHUTTING_DOWN = "the server is shutting down"

logger = logging.getLogger("sheaf.shutdown")


@dataclass
class _Response:
    started: bool = False
    event_stream: bool = False
    complete: bool = False


class Drain:
    """ASGI middleware: requests get `grace_s` after SIGTERM (or SIGINT) to finish, then are cut off."""

    def __init__(self, app: ASGIApp, grace_s: float = GRACE_S) -> None:
        self.app = app
        self.grace_s = grace_s
        self.draining = False
        self.running: set[asyncio.Task[None]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            self._watch_signals()  # uvicorn has installed its own handlers by now: chain onto them
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.draining:
            await _unavailable(send)
            return
        response = _Response()

        async def tracked(message: Message) -> None:
            if message["type"] == "http.response.start":
                response.started = True
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                response.event_stream = content_type.startswith(b"text/event-stream")
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                response.complete = True
            await send(message)

        # Its own task, so that a cut-off cancels the request and not this frame, which answers for it.
        task = asyncio.ensure_future(self.app(scope, receive, tracked))
        self.running.add(task)
        try:
            await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():  # this request itself is cancelled: not a cut-off
                raise
            await _cut_off(response, send)
            return
        finally:
            self.running.discard(task)
        if not response.started:
            # The route ended without an answer: its client left (mid-body, say). BentoML's
            # TimeoutMiddleware waits for a first message until `traffic.timeout` all the same,
            # and a shutdown waits for it; uvicorn drops this answer to a client that has gone.
            await send_json(send, 499, {"detail": "the client left before the answer"})

    def _watch_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("not in the main thread: a shutdown will wait for every request")
            return
        loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            previous = signal.getsignal(sig)

            def handler(signum: int, frame: FrameType | None, previous: Any = previous) -> None:
                if callable(previous):
                    previous(signum, frame)
                loop.call_soon_threadsafe(self._drain)

            signal.signal(sig, handler)

    def _drain(self) -> None:
        if self.draining:
            return
        self.draining = True
        if self.running:
            logger.info("shutting down: %d requests have %g s to finish", len(self.running), self.grace_s)
        asyncio.get_running_loop().call_later(self.grace_s, self._cut_off_all)

    def _cut_off_all(self) -> None:
        if self.running:
            logger.warning("shutting down: cutting off %d requests after %g s", len(self.running), self.grace_s)
        for task in self.running:
            task.cancel(SHUTTING_DOWN)


async def _cut_off(response: _Response, send: Send) -> None:
    if not response.started:
        await _unavailable(send)
    elif response.event_stream and not response.complete:
        event = {"type": "error", "done": True, "error": SHUTTING_DOWN, "code": "shutting_down"}
        await send({"type": "http.response.body", "body": encode_event(event).encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    # else: a plain body half sent; uvicorn closes the connection.


async def _unavailable(send: Send) -> None:
    detail = {"detail": f"{SHUTTING_DOWN}; retry after {RETRY_AFTER_S} s"}
    await send_json(send, 503, detail, [(b"retry-after", str(RETRY_AFTER_S).encode()), (b"connection", b"close")])
