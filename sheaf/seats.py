"""A request's place in a model call shared with others: a stream's seat, or a predict's
that rides a running call (`StreamSeat`), and the call in the model that they join while it
runs (`RunningCall`). `sheaf.deployment` seats them; the backend's thread hands each seat its
events as they are made.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from sheaf.api.base import BaseRequest
from sheaf.api.events import StreamEvent
from sheaf.backends.base import Admitted, Arrival, Arrivals
from sheaf.outcomes import Outcome
from sheaf.streaming import Handover

EventBatch = list[StreamEvent | Admitted]
"""A stream's events handed over since its reader last looked: sent to its client in one write."""


class StreamSeat:
    """A stream's place in a shared model call: its request, its own cancel (set once it has
    gone), and its events, handed over from the model's thread as they are made."""

    def __init__(self, request: BaseRequest[Any], streaming: bool = True) -> None:
        self.request = request
        self.streaming = streaming  # False: a predict riding a running call, which needs its result only
        self.cancel = threading.Event()
        self.events: Handover[StreamEvent | Admitted] = Handover()
        self.batch_size = 1  # of the call it ran in
        self.queued: asyncio.Future[list[Outcome]] | None = None  # its place in the batcher's queue


class RunningCall:
    """The call in the model of a backend that `joins_running`: streams and predicts that
    arrive while it runs are offered to it, and join at a step boundary once it has room, in the
    order they came (so a long stream in the call never keeps them waiting for its end)."""

    def __init__(self, first_index: int) -> None:
        self.arrivals = Arrivals()
        self.joined: dict[int, StreamSeat] = {}
        self._next_index = first_index  # past every index of the batch it runs

    def join(self, seat: StreamSeat) -> bool:
        index = self._next_index
        self.joined[index] = seat  # before the offer: the model's thread may emit to it at once
        if not self.arrivals.offer(Arrival(index, seat.request, seat.cancel, seat.streaming)):
            del self.joined[index]
            return False
        self._next_index += 1
        return True
