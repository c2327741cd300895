"""Adaptive batching: concurrent predicts and streams that reach one deployment process leave
as one model call.

It runs beside the model (`sheaf.deployment`), so that each replica batches what it receives.
A batch leaves as soon as one of the `slots` is free (one: the model runs one batch at a
time), with every request that arrived while they were all busy, up to `max_batch_size` items. So a
lone request waits for nothing, and under load the batches grow with the queue: the batch
size follows the load with no window to tune. A group of items (one `/batch` call) always
leaves whole, in one batch.

A request still queued after `max_queue_s` is refused (`QueueFull`); a request whose caller
gives up while it is queued leaves the queue and is never sent. Once every caller of a sent
batch has given up (deadline, client gone), the batch's `send` is cancelled, so that the
model work nobody waits for stops.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Item = TypeVar("Item")
Answer = TypeVar("Answer")


class QueueFull(Exception):
    """No slot freed up for the request within `max_queue_s`."""


@dataclass
class _Group(Generic[Item, Answer]):
    items: list[Item]
    sent: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    answers: asyncio.Future[list[Answer]] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    abandoned: bool = False
    """Its caller stopped waiting after it was sent."""
    batch: _Batch[Item, Answer] | None = None


@dataclass
class _Batch(Generic[Item, Answer]):
    groups: list[_Group[Item, Answer]]
    task: asyncio.Task[None] | None = None


class Batcher(Generic[Item, Answer]):
    def __init__(
        self,
        send: Callable[[list[Item]], Awaitable[list[Answer]]],
        *,
        max_batch_size: int,
        slots: int = 1,
        max_queue_s: float,
    ) -> None:
        """`send` answers a batch, one answer per item in order; it should not raise (an
        exception fails every group of its batch)."""
        self.send = send
        self.max_batch_size = max_batch_size
        self.slots = slots
        self.max_queue_s = max_queue_s
        self.busy = 0
        self.queue: deque[_Group[Item, Answer]] = deque()
        self.running: set[asyncio.Task[None]] = set()  # held, or the loop may collect a running batch

    @property
    def waiting(self) -> bool:
        """Whether any caller still waits in the queue."""
        return any(not group.sent.done() for group in self.queue)

    def submit(self, items: list[Item]) -> Awaitable[list[Answer]]:
        """The answers to `items`, sent in one batch, possibly with other callers' items, to await.

        They are queued before this returns, and may already have left in a batch: whoever looks
        next (a stream that would join the running call) sees them, not an empty queue."""
        if len(items) > self.max_batch_size:
            raise ValueError(f"{len(items)} items in one group, more than max_batch_size ({self.max_batch_size})")
        group: _Group[Item, Answer] = _Group(items)
        self.queue.append(group)
        self._dispatch()
        return self._answers(group)

    async def _answers(self, group: _Group[Item, Answer]) -> list[Answer]:
        try:
            if not group.sent.done():  # no slot free: wait for one
                await asyncio.wait_for(asyncio.shield(group.sent), self.max_queue_s)
        except TimeoutError:
            raise QueueFull(f"no batch slot for {self.max_queue_s:g} s") from None
        except asyncio.CancelledError:
            if group.sent.done() and not group.sent.cancelled():  # sent just as its caller left
                self._abandon(group)
            raise
        finally:
            if not group.sent.done():  # given up while queued (refused, or the caller was cancelled)
                group.sent.cancel()
        try:
            return await asyncio.shield(group.answers)
        except asyncio.CancelledError:
            self._abandon(group)
            raise

    def _abandon(self, group: _Group[Item, Answer]) -> None:
        """`group`'s caller has gone; the last caller of a batch to go takes its model work with it."""
        group.abandoned = True
        batch = group.batch
        if batch is not None and batch.task is not None and all(g.abandoned for g in batch.groups):
            batch.task.cancel()

    def _dispatch(self) -> None:
        while self.busy < self.slots and self.queue:
            batch: list[_Group[Item, Answer]] = []
            size = 0
            while self.queue and size + len(self.queue[0].items) <= self.max_batch_size:
                group = self.queue.popleft()
                if group.sent.done():  # its caller has gone
                    continue
                group.sent.set_result(None)
                batch.append(group)
                size += len(group.items)
            if not batch:
                continue
            self.busy += 1
            # `send` is called here, not in the task: whatever it does before its first await happens as
            # the batch leaves (a deployment marks its call running, for later requests to join).
            answering = self.send([item for group in batch for item in group.items])
            task = asyncio.get_running_loop().create_task(self._run(batch, answering))
            self.running.add(task)
            task.add_done_callback(self.running.discard)
            sent = _Batch(batch, task)
            for group in batch:
                group.batch = sent

    async def _run(self, batch: list[_Group[Item, Answer]], answering: Awaitable[list[Answer]]) -> None:
        try:
            items = [item for group in batch for item in group.items]
            answers = await answering
            if len(answers) != len(items):
                raise RuntimeError(f"{len(answers)} answers for {len(items)} items")
            start = 0
            for group in batch:
                group.answers.set_result(answers[start : start + len(group.items)])
                start += len(group.items)
        except Exception as exc:
            for group in batch:
                if not group.answers.done():
                    group.answers.set_exception(exc)
        finally:
            for group in batch:  # cancelled itself (the loop is closing): nobody is left waiting
                group.answers.cancel()
            self.busy -= 1
            self._dispatch()
