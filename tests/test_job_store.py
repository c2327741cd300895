"""Both job stores keep the same record and log: ids in order from 1, replaced events, updates,
the unfinished ones, and finished jobs gone after their time to live."""

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from sheaf.job_store import Job, JobStore, RedisJobStore, SQLiteJobStore
from tests.redis_server import RedisServer

Scenario = Callable[[JobStore], Awaitable[None]]


@pytest.fixture(params=["sqlite", "redis"])
def run(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[Scenario], None]:
    def with_store(scenario: Scenario) -> None:
        async def go() -> None:
            if request.param == "sqlite":
                store: JobStore = SQLiteJobStore(tmp_path / "jobs.sqlite3")
            else:
                redis: RedisServer = request.getfixturevalue("redis_server")
                store = RedisJobStore(f"redis://{redis.address}/3")
            try:
                await scenario(store)
            finally:
                await store.close()

        asyncio.run(go())

    return with_store


def job(job_id: str = "textgen-1") -> Job:
    return Job(job_id=job_id, deployment="textgen", request={"prompt": "hi"}, last_event=1)


def test_a_log_numbers_its_events_from_one_and_reads_after_any(run: Callable[[Scenario], None]) -> None:
    async def scenario(store: JobStore) -> None:
        await store.create(job(), {"type": "queued", "position": 0, "done": False})
        await store.append("textgen-1", [(2, {"type": "token", "text": "a"}), (3, {"type": "token", "text": "b"})])
        assert [event_id for event_id, _ in await store.events_after("textgen-1", 0)] == [1, 2, 3]
        assert await store.events_after("textgen-1", 2) == [(3, {"type": "token", "text": "b"})]
        await store.replace("textgen-1", 2, {"type": "token", "text": "A"})
        assert (await store.events_after("textgen-1", 1))[0] == (2, {"type": "token", "text": "A"})
        assert await store.events_after("textgen-2", 0) == []

    run(scenario)


def test_updates_change_only_their_fields_and_unfinished_lists_the_rest(run: Callable[[Scenario], None]) -> None:
    async def scenario(store: JobStore) -> None:
        for job_id in ("textgen-1", "textgen-2"):
            await store.create(job(job_id), {"type": "queued", "position": 0, "done": False})
        await store.update("textgen-1", {"status": "running", "position": None})
        await store.update("textgen-2", {"status": "succeeded", "finished_at": time.time()}, ttl_s=60)
        running = await store.get("textgen-1")
        assert running is not None and running.status == "running" and running.request == {"prompt": "hi"}
        assert [j.job_id for j in await store.unfinished()] == ["textgen-1"]
        assert await store.get("textgen-3") is None

    run(scenario)


def test_a_finished_job_is_gone_after_its_time_to_live(run: Callable[[Scenario], None]) -> None:
    async def scenario(store: JobStore) -> None:
        await store.create(job(), {"type": "queued", "position": 0, "done": False})
        await store.update("textgen-1", {"status": "succeeded", "finished_at": time.time()}, ttl_s=1)
        await store.remove_expired(60)  # SQLite: not yet
        assert await store.get("textgen-1") is not None
        await asyncio.sleep(1.2)
        await store.remove_expired(1)  # SQLite removes it now; Redis has expired it itself
        assert await store.get("textgen-1") is None
        assert await store.events_after("textgen-1", 0) == []

    run(scenario)
