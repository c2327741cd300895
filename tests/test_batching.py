"""The gateway's adaptive batcher, on a real event loop with a `send` that records its batches."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from sheaf.batching import Batcher, QueueFull

T = TypeVar("T")


class Deployment:
    """A `send` that records each batch and answers it once `release` is set."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release = asyncio.Event()
        self.in_flight = 0
        self.most_in_flight = 0

    async def send(self, items: list[str]) -> list[str]:
        self.batches.append(items)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.release.wait()
            if "boom" in items:
                raise RuntimeError("the deployment broke")
            return [item.upper() for item in items]
        finally:
            self.in_flight -= 1

    def batcher(self, *, max_batch_size: int = 8, slots: int = 1, max_queue_s: float = 60) -> Batcher[str, str]:
        return Batcher(self.send, max_batch_size=max_batch_size, slots=slots, max_queue_s=max_queue_s)


def run(test: Callable[[Deployment], Awaitable[T]]) -> T:
    async def main() -> T:
        return await test(Deployment())

    return asyncio.run(main())


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def occupy(batcher: Batcher[str, str]) -> asyncio.Future[list[str]]:
    """Submit `a`, which takes the only slot until the deployment is released."""
    first = asyncio.ensure_future(batcher.submit(["a"]))
    await settle()
    return first


def test_a_lone_request_leaves_at_once_in_a_batch_of_its_own() -> None:
    async def test(deployment: Deployment) -> None:
        batcher = deployment.batcher()
        deployment.release.set()
        assert await asyncio.wait_for(batcher.submit(["a"]), 1) == ["A"]
        assert deployment.batches == [["a"]]

    run(test)


def test_requests_that_come_while_the_slot_is_busy_leave_together_in_order_and_groups_stay_whole() -> None:
    async def test(deployment: Deployment) -> None:
        batcher = deployment.batcher(max_batch_size=4)
        first = await occupy(batcher)
        later = [asyncio.ensure_future(batcher.submit(group)) for group in (["b"], ["c", "d"], ["e", "f", "g"])]
        await settle()
        assert deployment.batches == [["a"]]  # the rest wait for the slot
        deployment.release.set()
        answers = await asyncio.gather(first, *later)
        assert answers == [["A"], ["B"], ["C", "D"], ["E", "F", "G"]]
        # b and c+d fill 3 of 4 places; e+f+g does not fit and leaves whole in the next batch.
        assert deployment.batches == [["a"], ["b", "c", "d"], ["e", "f", "g"]]
        assert deployment.most_in_flight == 1

    run(test)


def test_each_slot_carries_one_batch_at_a_time() -> None:
    async def test(deployment: Deployment) -> None:
        batcher = deployment.batcher(slots=2)
        waiting = [asyncio.ensure_future(batcher.submit([item])) for item in "abcde"]
        await settle()
        assert deployment.batches == [["a"], ["b"]]  # a slot each; the rest wait for one to free up
        deployment.release.set()
        assert await asyncio.gather(*waiting) == [[item.upper()] for item in "abcde"]
        assert deployment.batches == [["a"], ["b"], ["c", "d", "e"]]
        assert deployment.most_in_flight == 2

    run(test)


def test_a_caller_that_gives_up_while_queued_is_never_sent() -> None:
    async def test(deployment: Deployment) -> None:
        batcher = deployment.batcher()
        first = await occupy(batcher)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(batcher.submit(["gone"]), 0.05)
        kept = asyncio.ensure_future(batcher.submit(["b"]))
        deployment.release.set()
        assert [await first, await kept] == [["A"], ["B"]]
        assert deployment.batches == [["a"], ["b"]]

    run(test)


def test_a_request_queued_past_max_queue_s_is_refused_and_never_sent() -> None:
    async def test(deployment: Deployment) -> None:
        batcher = deployment.batcher(max_queue_s=0.05)
        first = await occupy(batcher)
        with pytest.raises(QueueFull, match=r"no batch slot for 0\.05 s"):
            await batcher.submit(["late"])
        deployment.release.set()
        assert await first == ["A"]
        await settle()
        assert deployment.batches == [["a"]]

    run(test)


def test_a_failed_batch_fails_its_own_callers_only() -> None:
    async def test(deployment: Deployment) -> None:
        batcher = deployment.batcher(max_batch_size=2)
        first = await occupy(batcher)
        doomed = [asyncio.ensure_future(batcher.submit([item])) for item in ("boom", "b")]
        spared = asyncio.ensure_future(batcher.submit(["c"]))
        deployment.release.set()
        assert await first == ["A"]
        for caller in doomed:
            with pytest.raises(RuntimeError, match="the deployment broke"):
                await caller
        assert await spared == ["C"]

    run(test)


def test_an_answer_list_of_the_wrong_length_is_an_error_not_a_silent_shift() -> None:
    async def short(items: list[str]) -> list[str]:
        return items[:-1]

    async def test(deployment: Deployment) -> None:
        batcher = Batcher(short, max_batch_size=8, slots=1, max_queue_s=60)
        with pytest.raises(RuntimeError, match="2 answers for 3 items"):
            await batcher.submit(["a", "b", "c"])

    run(test)


def test_a_group_larger_than_a_batch_is_refused() -> None:
    async def test(deployment: Deployment) -> None:
        batcher = deployment.batcher(max_batch_size=2)
        with pytest.raises(ValueError, match="more than max_batch_size"):
            await batcher.submit(["a", "b", "c"])

    run(test)


def test_a_sent_batch_is_cancelled_once_every_caller_has_gone_and_not_before() -> None:
    async def test(deployment: Deployment) -> None:
        batcher = deployment.batcher()
        first = await occupy(batcher)
        callers = [asyncio.ensure_future(batcher.submit([item])) for item in ("b", "c")]
        await settle()
        first.cancel()  # the only caller of batch `a`: its `send` is cancelled and the slot frees up
        await settle()
        assert deployment.batches == [["a"], ["b", "c"]]
        assert deployment.in_flight == 1
        (task,) = batcher.running
        callers[0].cancel()
        await settle()
        assert not task.done()  # c still waits for it
        callers[1].cancel()
        await settle()
        assert task.cancelled()
        assert deployment.in_flight == 0  # `send` itself was cancelled
        assert batcher.busy == 0

    run(test)
