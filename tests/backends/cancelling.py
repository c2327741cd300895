"""Cancelling a backend's `predict_batch` while it runs, the same way for every backend."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from sheaf.backends.base import Backend, Cancelled


def cancel_on_cue(
    backend: Backend[Any, Any],
    batch: list[Any],
    cue: threading.Event,
    calls: list[int],
    *,
    match: str = "stopped after",
    cancel: threading.Event | None = None,
    timeout: float = 60,
) -> tuple[int, float]:
    """Run `predict_batch` in a thread, set `cancel` once `cue` is set, and expect `Cancelled`;
    returns the model calls counted at the cancel and the seconds from the cancel to the return."""
    cancel = cancel or threading.Event()
    with ThreadPoolExecutor(1) as pool:
        outcome = pool.submit(backend.predict_batch, batch, cancel)
        assert cue.wait(timeout)
        cancel.set()
        at_cancel, cancelled_at = calls[0], time.perf_counter()
        with pytest.raises(Cancelled, match=match):
            outcome.result(timeout)
        return at_cancel, time.perf_counter() - cancelled_at
