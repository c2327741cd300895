"""The LoRA adapter lock.

diffusers' `set_adapters` is process-global: whatever selection is active when a pipeline
step runs is the one that step uses. So a pipeline run (a predict group or a whole stream)
holds `AdapterLock` from applying its selection to its last step, and only one run holds it
at a time. An empty selection disables LoRA outright; it never inherits the last one.

Waiters are served first come, first served, except that a waiter whose selection is
already active may go ahead (no swap needed). The head of the queue can be passed over at
most `max_skips` times, so no selection starves.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sheaf import metrics

Selection = tuple[tuple[str, float], ...]
"""Adapter names with their weights, sorted by name; `()` means LoRA off."""

_CANCEL_POLL_S = 0.05  # how often a waiter checks its cancel event


class LockWaitCancelled(Exception):
    """The caller gave up (its client left) before its turn came."""


@dataclass(eq=False)
class _Ticket:
    selection: Selection
    skips: int = 0


class AdapterLock:
    def __init__(self, apply: Callable[[Selection], None], *, max_skips: int = 4, deployment: str = "") -> None:
        self._apply = apply
        self._deployment = deployment  # labels its metrics
        self._max_skips = max_skips
        self._condition = threading.Condition()
        self._queue: list[_Ticket] = []
        self._holder: _Ticket | None = None
        self.active: Selection | None = None
        """The selection in force; None until the first apply, or after one failed."""
        self.swaps = 0

    @contextmanager
    def hold(self, selection: Selection, cancel: threading.Event | None = None) -> Iterator[None]:
        """Wait for the turn, make `selection` the active one, and keep it until the block exits."""
        ticket = _Ticket(selection)
        queued = time.perf_counter()
        with self._condition:
            self._queue.append(ticket)
            self._hand_over()
            while self._holder is not ticket:
                if cancel is not None and cancel.is_set():
                    self._queue.remove(ticket)
                    raise LockWaitCancelled("cancelled while waiting for the adapter lock")
                self._condition.wait(_CANCEL_POLL_S if cancel is not None else None)
        metrics.ADAPTER_LOCK_WAIT.labels(self._deployment).observe(time.perf_counter() - queued)
        try:
            if selection != self.active:
                self.active = None  # unknown until apply has succeeded
                self._apply(selection)
                self.active = selection
                self.swaps += 1
                metrics.ADAPTER_SWAPS.labels(self._deployment).inc()
            yield
        finally:
            with self._condition:
                self._holder = None
                self._hand_over()

    @property
    def waiting(self) -> int:
        with self._condition:
            return len(self._queue)

    def _hand_over(self) -> None:
        """Give the lock to the next waiter, if it is free (the condition is held)."""
        if self._holder is not None or not self._queue:
            return
        head = self._queue[0]
        chosen = head
        if head.skips < self._max_skips:
            chosen = next((ticket for ticket in self._queue if ticket.selection == self.active), head)
        for passed in self._queue[: self._queue.index(chosen)]:
            passed.skips += 1
        self._queue.remove(chosen)
        self._holder = chosen
        self._condition.notify_all()
