"""Noticing that the client of a request has gone, so that work nobody waits for stops.

Neither uvicorn nor BentoML cancels a request's handler when its client disconnects; once
the body has been read, the ASGI `receive` only returns again with `http.disconnect`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
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
    """`work`'s result; cancelled, raising `ClientGone`, if the client leaves first.

    `work` runs in the caller's own task, which a watcher cancels when the client goes: one task
    per request rather than two, on the path every predict takes."""
    caller = asyncio.current_task()
    assert caller is not None, "called from a task"
    watching = True  # until `work` is over: a late watcher callback must not cancel what comes next
    gone = False

    def client_left(watcher: asyncio.Future[None]) -> None:
        nonlocal gone
        if watching and not watcher.cancelled():
            gone = True
            caller.cancel()

    watcher = asyncio.ensure_future(until_disconnected(request))
    watcher.add_done_callback(client_left)
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        caller.uncancel()  # ours, not the caller's to see
        raise ClientGone from None
    finally:
        watching = False
        watcher.cancel()
