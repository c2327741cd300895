"""Server-Sent Events: framing events on the way out, reassembling them on the way in,
and carrying a backend's blocking event iterator onto the event loop.

A frame is `data: {json}\\n\\n`. JSON is kept ASCII (`json.dumps` default) so a frame
split anywhere by the network never splits a character.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import aclosing
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from sheaf.api.events import ErrorEvent, ResultEvent

T = TypeVar("T")

_FRAME_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def event_payload(event: BaseModel | dict[str, Any]) -> dict[str, Any]:
    if isinstance(event, ResultEvent):
        return event.to_wire()
    if isinstance(event, BaseModel):
        return event.model_dump(mode="json")
    return event


def encode_frame(data: str, event_id: int | None = None) -> str:
    """One frame of a one-line `data`, led by its `id:` when it has one (a job's replayable log)."""
    head = "" if event_id is None else f"id: {event_id}\n"
    return f"{head}data: {data}\n\n"


def encode_event(event: BaseModel | dict[str, Any], event_id: int | None = None) -> str:
    return encode_frame(json.dumps(event_payload(event)), event_id)


def error_event(exc: BaseException, code: str = "backend_error") -> ErrorEvent:
    return ErrorEvent(error=f"{type(exc).__name__}: {exc}", code=code)


class SSEDecoder:
    """Turns bytes, split however the network split them, into event payloads."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes | str) -> list[dict[str, Any]]:
        return [event for _, event in self.feed_with_ids(chunk)]

    def feed_with_ids(self, chunk: bytes | str) -> list[tuple[str | None, dict[str, Any]]]:
        """The events `chunk` completed, each with its frame's `id:` (None for a frame without one)."""
        self._buffer += chunk.encode() if isinstance(chunk, str) else chunk
        events = []
        while match := _FRAME_END.search(self._buffer):
            frame, self._buffer = self._buffer[: match.start()], self._buffer[match.end() :]
            text = frame.decode()
            event = parse_frame(text)
            if event is not None:
                events.append((frame_id(text), event))
        return events

    @property
    def pending(self) -> bool:
        """True while a partial frame waits for the rest of its bytes."""
        return bool(self._buffer.strip())


def parse_frame(frame: str) -> dict[str, Any] | None:
    """One frame's `data:` lines as JSON; None for a frame of comments only (heartbeats)."""
    data = []
    for line in frame.splitlines():
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if field == "data":
            data.append(value.removeprefix(" "))
    if not data:
        return None
    payload = json.loads("\n".join(data))
    if not isinstance(payload, dict) or "type" not in payload:
        raise ValueError(f"not a sheaf event: {frame[:200]!r}")
    return payload


def frame_id(frame: str) -> str | None:
    """A frame's `id:` field, if it has one."""
    for line in frame.splitlines():
        field, _, value = line.partition(":")
        if field == "id":
            return value.removeprefix(" ")
    return None


class FrameRelay:
    """Whole frames out of text chunks split anywhere by the network, to pass on as they are.

    Only the last data frame of a chunk is parsed (for its `type` and `done`): relaying a
    frame costs no JSON work beyond that, whatever its size (diffusion previews are large).
    """

    def __init__(self) -> None:
        self._pending = ""

    def feed(self, chunk: str) -> str:
        """The frames that `chunk` completed, as one string ("" when none)."""
        self._pending += chunk
        end = self._pending.rfind("\n\n") + 2
        if end < 2:
            return ""
        complete, self._pending = self._pending[:end], self._pending[end:]
        return complete

    @staticmethod
    def last_event(frames: str) -> dict[str, Any] | None:
        """The payload of the last data frame in `frames`, which `feed` returned; None for comments only."""
        start = frames.rfind("data: ", 0, -2)
        if start < 0:
            return None
        payload: dict[str, Any] = json.loads(frames[start + 6 : frames.index("\n\n", start)])
        return payload


HEARTBEAT = ": heartbeat\n\n"
"""An SSE comment line: keeps proxies from cutting a quiet stream; clients skip it."""

ACCEPTED = ": accepted\n\n"
"""The first bytes of a stream whose request passed every check (limits, validation, adapters,
Feast): from here on the answer is 200 and a failure is an `error` event. Clients skip it."""


class Idle:
    """What `Handover.items` yields when nothing came for `idle_s`."""


IDLE = Idle()


class Handover(Generic[T]):
    """Items handed from a thread to the event loop as they are made, then the end or a failure.

    `put`, `end` and `fail` may be called from any thread; `items()` reads them on the loop.
    Once the loop has closed nobody is listening, and what is handed over is dropped.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[bool, Any]] = asyncio.Queue()
        self.dropped = threading.Event()
        """Set once a hand-over found the loop closed."""

    def put(self, item: T) -> None:
        self._send(False, item)

    def end(self) -> None:
        self._send(True, _END)

    def fail(self, exc: BaseException) -> None:
        self._send(True, exc)

    def _send(self, done: bool, value: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (done, value))
        except RuntimeError:  # the loop closed under us
            self.dropped.set()

    async def items(self, *, idle_s: float | None = None, timeout_s: float | None = None) -> AsyncGenerator[T | Idle]:
        """Each item as it comes until the end; the failure raised. With `idle_s`, `IDLE` after each
        `idle_s` without an item; past `timeout_s`, `TimeoutError`."""
        async with aclosing(self.batches(idle_s=idle_s, timeout_s=timeout_s)) as batches:
            async for batch in batches:
                if isinstance(batch, Idle):
                    yield batch
                    continue
                for item in batch:
                    yield item

    async def batches(
        self, *, idle_s: float | None = None, timeout_s: float | None = None
    ) -> AsyncGenerator[list[T] | Idle]:
        """`items`, but all those handed over by the time the loop reads them as one list: a reader
        that falls behind (a busy process) catches up in one go, where item by item each would cost
        its own write to the client."""
        loop, queue = self._loop, self._queue
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while True:
            wait = idle_s if deadline is None else min(idle_s or math.inf, deadline - loop.time())
            try:
                # wait_for only ever cancels its own queue.get(), never the consumer's task.
                done, value = await asyncio.wait_for(queue.get(), wait)
            except TimeoutError:
                if deadline is not None and loop.time() >= deadline:
                    raise
                yield IDLE
                continue
            batch: list[T] = []
            while not done:
                batch.append(value)
                if queue.empty():
                    break
                done, value = queue.get_nowait()
            if batch:
                yield batch
            if not done:
                continue
            if value is _END:
                return
            raise value


_END = object()


async def iterate_in_thread(
    produce: Callable[[threading.Event], Iterator[T]], *, idle_s: float | None = None, timeout_s: float | None = None
) -> AsyncGenerator[T | Idle, None]:
    """Run a blocking iterator in its own thread and hand each item to the event loop as it comes.

    `produce` receives a cancel event. When the consumer stops early (client gone,
    CancelledError), the event is set and the iterator is closed in its thread. With
    `idle_s`, `IDLE` is yielded after each `idle_s` without an item; past `timeout_s`
    the iterator is stopped the same way and `TimeoutError` raised.
    """
    handover: Handover[T] = Handover()
    cancel = handover.dropped  # also set by the consumer when it stops

    def run() -> None:
        try:
            items = produce(cancel)
            try:
                for item in items:
                    handover.put(item)
                    if cancel.is_set():
                        break
            finally:
                close = getattr(items, "close", None)  # a generator's own cleanup runs in its thread
                if close is not None:
                    close()
        except BaseException as exc:  # handed to the consumer, which decides what it means
            handover.fail(exc)
        else:
            handover.end()

    threading.Thread(target=run, name="sheaf-stream", daemon=True).start()
    try:
        async with aclosing(handover.items(idle_s=idle_s, timeout_s=timeout_s)) as items:
            async for item in items:
                yield item
    finally:
        cancel.set()
