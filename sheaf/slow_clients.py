"""Deadlines for a client's request: its headers, then its body, or the connection closes.

uvicorn, as BentoML runs it, waits for a request without limit: its only timer is the
keep-alive one, armed after a response and disarmed by any byte, so a client that sends
half its headers, or half its body, holds the connection (and, for a body, the request's
task) until BentoML's `traffic.timeout`, minutes later. BentoML passes uvicorn no protocol
option, so the narrowest fix is uvicorn's own HTTP protocol with two timers, installed as
its `auto` protocol before the worker's server starts (`install`, at import of the service
module):

- headers: from the connection's start, or a request's first byte, to the end of its headers;
- body: from the end of the headers to the end of the body, read or not by the route.

Past either, the client gets a 408 (when nothing was answered yet) and the connection closes.
"""

import asyncio
import json
import logging
from typing import Any, Literal

import uvicorn.config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0

logger = logging.getLogger("sheaf.slow_clients")
Phase = Literal["headers", "body"]


class DeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a deadline on each request's headers and body."""

    header_timeout_s = HEADER_TIMEOUT_S
    body_timeout_s = BODY_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._begun = False  # some of the request has arrived

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begun = True
        if self._deadline is None:  # a new connection's deadline runs from its start
            self._arm("headers")

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self.parser.should_upgrade() and self._should_upgrade():
            self._disarm()  # a WebSocket: its own protocol takes the connection over
        else:
            self._arm("body")

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._disarm()
        self._begun = False

    def _arm(self, phase: Phase) -> None:
        self._disarm()
        seconds = self.header_timeout_s if phase == "headers" else self.body_timeout_s
        self._deadline = self.loop.call_later(seconds, self._expired, phase)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self, phase: Phase) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        answering = self.cycle is not None and not self.cycle.response_complete
        if self.pipeline or (phase == "headers" and answering):
            # The wait is ours: uvicorn reads a pipelined request only once the one before is answered.
            self._arm(phase)
            return
        seconds = self.header_timeout_s if phase == "headers" else self.body_timeout_s
        logger.info("closing a connection from %s: request %s not complete within %g s", self.client, phase, seconds)
        cycle = self.cycle if phase == "body" else None  # the request whose body is late
        if self._begun and not (cycle is not None and cycle.response_started):
            self._send_408(f"request {phase} not complete within {seconds:g} s")
        if cycle is not None:  # its route sees a client that left
            cycle.disconnected = True
            cycle.message_event.set()
        self.transport.close()

    def _send_408(self, detail: str) -> None:
        content = json.dumps({"detail": detail}).encode()
        head = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
        self.transport.write(head + b"content-length: %d\r\n\r\n" % len(content) + content)


def install(header_timeout_s: float = HEADER_TIMEOUT_S, body_timeout_s: float = BODY_TIMEOUT_S) -> None:
    """Make `DeadlineProtocol`, with these deadlines, the protocol of every uvicorn server this process starts."""
    DeadlineProtocol.header_timeout_s = header_timeout_s
    DeadlineProtocol.body_timeout_s = body_timeout_s
    uvicorn.config.HTTP_PROTOCOLS["auto"] = f"{__name__}:{DeadlineProtocol.__name__}"
