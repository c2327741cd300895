"""The adapter lock: one holder at a time, swaps only when needed, no inheritance, no starvation."""

import threading
import time

import pytest

from sheaf.lora import AdapterLock, LockWaitCancelled, Selection

A: Selection = (("a", 1.0),)
B: Selection = (("b", 1.0),)
NONE: Selection = ()


class Pipeline:
    """Stands in for diffusers' process-global adapter state."""

    def __init__(self) -> None:
        self.active: Selection | None = None
        self.applied: list[Selection] = []

    def apply(self, selection: Selection) -> None:
        self.applied.append(selection)
        self.active = selection


def queue_in_order(lock: AdapterLock, selections: list[Selection], order: list[Selection]) -> list[threading.Thread]:
    """Start one waiter per selection, each queued after the previous (the caller holds the lock)."""
    threads = []
    for selection in selections:

        def run(selection: Selection = selection) -> None:
            with lock.hold(selection):
                order.append(selection)

        queued = lock.waiting
        thread = threading.Thread(target=run)
        thread.start()
        while lock.waiting == queued:
            time.sleep(0.001)
        threads.append(thread)
    return threads


def test_one_holder_at_a_time_and_each_run_sees_its_own_selection() -> None:
    pipeline = Pipeline()
    lock = AdapterLock(pipeline.apply)
    inside = 0
    seen: list[tuple[Selection, Selection | None]] = []
    guard = threading.Lock()

    def run(selection: Selection) -> None:
        nonlocal inside
        for _ in range(20):
            with lock.hold(selection):
                with guard:
                    inside += 1
                    assert inside == 1
                time.sleep(0.0005)
                seen.append((selection, pipeline.active))
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=run, args=(s,)) for s in (A, B, NONE, A, B)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(seen) == 100
    assert all(selection == active for selection, active in seen)


def test_apply_runs_only_when_the_selection_changes_and_none_disables() -> None:
    pipeline = Pipeline()
    lock = AdapterLock(pipeline.apply)
    for selection in (A, A, NONE, NONE, B, A):
        with lock.hold(selection):
            pass
    assert pipeline.applied == [A, NONE, B, A]
    assert lock.swaps == 4


def test_a_waiter_for_the_active_selection_goes_first() -> None:
    pipeline = Pipeline()
    lock = AdapterLock(pipeline.apply)
    order: list[Selection] = []
    with lock.hold(A):
        threads = queue_in_order(lock, [B, A, B, A], order)
    for thread in threads:
        thread.join()
    assert order == [A, A, B, B]
    assert pipeline.applied == [A, B]


def test_the_head_of_the_queue_is_passed_over_at_most_max_skips_times() -> None:
    pipeline = Pipeline()
    lock = AdapterLock(pipeline.apply, max_skips=2)
    order: list[Selection] = []
    with lock.hold(A):
        threads = queue_in_order(lock, [B, A, A, A, A], order)
    for thread in threads:
        thread.join()
    assert order == [A, A, B, A, A]


def test_a_waiter_whose_client_left_gives_up_its_place() -> None:
    lock = AdapterLock(Pipeline().apply)
    cancel = threading.Event()
    outcome: list[str] = []

    def wait() -> None:
        try:
            with lock.hold(B, cancel):
                outcome.append("ran")
        except LockWaitCancelled:
            outcome.append("gave up")

    with lock.hold(A):
        thread = threading.Thread(target=wait)
        thread.start()
        while lock.waiting == 0:
            time.sleep(0.001)
        cancel.set()
        thread.join(2)
        assert outcome == ["gave up"]
        assert lock.waiting == 0
    with lock.hold(B):  # and the lock is free for others
        pass


def test_a_failed_apply_releases_the_lock_and_forces_the_next_apply() -> None:
    pipeline = Pipeline()
    calls = 0

    def flaky(selection: Selection) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("set_adapters failed")
        pipeline.apply(selection)

    lock = AdapterLock(flaky)
    with lock.hold(A):
        pass
    with pytest.raises(RuntimeError), lock.hold(B):
        pass
    assert lock.active is None
    with lock.hold(A):  # A again: the failed swap may have left anything active, so it is applied again
        pass
    assert pipeline.applied == [A, A]
