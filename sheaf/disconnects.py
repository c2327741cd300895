"""Noticing that the client of a request has gone, so that work nobody waits for stops.

Neither uvicorn nor BentoML cancels a request's handler when its client disconnects; once
the body has been read, the ASGI `receive` only returns again with `http.disconnect`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import TypeVar

from starlette.requests import Request

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def until_disconnected(request: Request) -> None:
    """Return once the client of `request` (whose body has been read) has disconnected."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result; cancelled, raising `ClientGone`, if the client leaves first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(until_disconnected(request))
    try:
        done, _ = await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task not in done:
        raise ClientGone
    return task.result()


@asynccontextmanager
async def cancel_on_disconnect(request: Request) -> AsyncIterator[threading.Event]:
    """An event, for model work in a thread, that is set if the client leaves meanwhile."""
    cancel = threading.Event()
    watcher = asyncio.ensure_future(until_disconnected(request))
    watcher.add_done_callback(lambda done: None if done.cancelled() else cancel.set())
    try:
        yield cancel
    finally:
        watcher.cancel()
