"""Where jobs live: each job's record and its event log, in SQLite (the default: a file in the
cache folder, no server) or in Redis (which several entry-service replicas share).

A record is a flat mapping (`Job`); the log is the job's events in order, numbered from 1, which
are the SSE ids a client resumes from. A finished job is kept for `ttl_s`, then removed (SQLite:
by `remove_expired`, run now and then; Redis: by its own expiry).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from collections.abc import Awaitable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from sheaf.api.jobs import JobStatus
from sheaf.config import env_expanded

if TYPE_CHECKING:
    from redis.asyncio import Redis

T = TypeVar("T")

FINISHED = ("succeeded", "failed", "cancelled")


@dataclass
class Job:
    job_id: str
    deployment: str
    request: dict[str, Any]
    status: JobStatus = "queued"
    position: int | None = None  # jobs ahead of it, while queued
    owner: str = ""  # the entry-service process that runs it
    heartbeat_at: float = 0.0  # when its owner last said it is alive
    cancel_requested: bool = False
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    last_event: int = 0  # the id of its newest event

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


_FIELDS = [f.name for f in fields(Job)]


class JobStore(Protocol):
    async def create(self, job: Job, first_event: dict[str, Any]) -> None:
        """The job's record, and its log with `first_event` as event 1."""

    async def get(self, job_id: str) -> Job | None: ...
    async def update(self, job_id: str, changes: dict[str, Any], *, ttl_s: float | None = None) -> None:
        """Set some fields; `ttl_s` (a job that has finished) starts its time to live."""

    async def append(self, job_id: str, events: list[tuple[int, dict[str, Any]]]) -> None: ...
    async def replace(self, job_id: str, event_id: int, event: dict[str, Any]) -> None: ...
    async def events_after(self, job_id: str, after: int) -> list[tuple[int, dict[str, Any]]]: ...
    async def unfinished(self) -> list[Job]: ...
    async def remove_expired(self, ttl_s: float) -> None: ...
    async def close(self) -> None: ...


class SQLiteJobStore:
    """One file, one connection (opened at first use), used from threads one at a time (each call is short)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._opened: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    @property
    def _db(self) -> sqlite3.Connection:
        """The connection; call with the lock held."""
        if self._opened is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # durable across a crash of the process
            db.execute("CREATE TABLE IF NOT EXISTS jobs (job_id TEXT PRIMARY KEY, record TEXT NOT NULL)")
            db.execute(
                "CREATE TABLE IF NOT EXISTS events (job_id TEXT, event_id INTEGER, event TEXT NOT NULL,"
                " PRIMARY KEY (job_id, event_id))"
            )
            self._opened = db
        return self._opened

    async def _run(self, sql: str, *args: Any, many: list[tuple[Any, ...]] | None = None) -> list[Any]:
        def run() -> list[Any]:
            with self._lock:
                if many is not None:
                    with self._db:  # one transaction
                        self._db.executemany(sql, many)
                    return []
                return self._db.execute(sql, args).fetchall()

        return await asyncio.to_thread(run)

    async def create(self, job: Job, first_event: dict[str, Any]) -> None:
        def run() -> None:
            with self._lock, self._db:
                self._db.execute("INSERT INTO jobs VALUES (?, ?)", (job.job_id, json.dumps(asdict(job))))
                self._db.execute("INSERT INTO events VALUES (?, 1, ?)", (job.job_id, json.dumps(first_event)))

        await asyncio.to_thread(run)

    async def get(self, job_id: str) -> Job | None:
        rows = await self._run("SELECT record FROM jobs WHERE job_id = ?", job_id)
        return Job(**json.loads(rows[0][0])) if rows else None

    async def update(self, job_id: str, changes: dict[str, Any], *, ttl_s: float | None = None) -> None:
        def run() -> None:
            with self._lock, self._db:
                rows = self._db.execute("SELECT record FROM jobs WHERE job_id = ?", (job_id,)).fetchall()
                if rows:
                    record = {**json.loads(rows[0][0]), **changes}
                    self._db.execute("UPDATE jobs SET record = ? WHERE job_id = ?", (json.dumps(record), job_id))

        await asyncio.to_thread(run)

    async def append(self, job_id: str, events: list[tuple[int, dict[str, Any]]]) -> None:
        rows = [(job_id, event_id, json.dumps(event)) for event_id, event in events]
        await self._run("INSERT OR REPLACE INTO events VALUES (?, ?, ?)", many=rows)

    async def replace(self, job_id: str, event_id: int, event: dict[str, Any]) -> None:
        await self._run(
            "UPDATE events SET event = ? WHERE job_id = ? AND event_id = ?", json.dumps(event), job_id, event_id
        )

    async def events_after(self, job_id: str, after: int) -> list[tuple[int, dict[str, Any]]]:
        rows = await self._run(
            "SELECT event_id, event FROM events WHERE job_id = ? AND event_id > ? ORDER BY event_id", job_id, after
        )
        return [(event_id, json.loads(event)) for event_id, event in rows]

    async def unfinished(self) -> list[Job]:
        rows = await self._run("SELECT record FROM jobs")
        jobs = [Job(**json.loads(record)) for (record,) in rows]
        return [job for job in jobs if not job.finished]

    async def remove_expired(self, ttl_s: float) -> None:
        def run() -> None:
            with self._lock, self._db:
                before = time.time() - ttl_s
                rows = self._db.execute("SELECT job_id, record FROM jobs").fetchall()
                gone = [(job_id,) for job_id, record in rows if (json.loads(record)["finished_at"] or before) < before]
                self._db.executemany("DELETE FROM events WHERE job_id = ?", gone)
                self._db.executemany("DELETE FROM jobs WHERE job_id = ?", gone)

        await asyncio.to_thread(run)

    async def close(self) -> None:
        with self._lock:
            if self._opened is not None:
                self._opened.close()
                self._opened = None


class RedisJobStore:
    """`sheaf:job:{id}` (the record, a hash of JSON values) and `sheaf:job:{id}:events` (a list,
    event N at index N-1); `sheaf:jobs:unfinished` is the set of ids not yet finished."""

    UNFINISHED = "sheaf:jobs:unfinished"

    def __init__(self, url: str) -> None:
        self.url = url
        self._opened: Redis | None = None

    @property
    def _redis(self) -> Redis:
        """The client, made at first use: every pod imports the entry service's module, and only
        the entry service's own pod is given the variable its URL names."""
        if self._opened is None:
            from redis.asyncio import Redis

            self._opened = Redis.from_url(
                env_expanded("jobs.url", self.url), socket_timeout=5, socket_connect_timeout=5
            )
        return self._opened

    @staticmethod
    def _key(job_id: str) -> str:
        return f"sheaf:job:{job_id}"

    async def create(self, job: Job, first_event: dict[str, Any]) -> None:
        record = {name: json.dumps(value) for name, value in asdict(job).items()}
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(self._key(job.job_id), mapping=record)
            pipe.rpush(f"{self._key(job.job_id)}:events", json.dumps(first_event))
            pipe.sadd(self.UNFINISHED, job.job_id)
            await pipe.execute()

    async def get(self, job_id: str) -> Job | None:
        record = await _answer(self._redis.hgetall(self._key(job_id)))
        if not record:
            return None
        values = {key.decode(): json.loads(value) for key, value in record.items()}
        return Job(**{name: values[name] for name in _FIELDS if name in values})

    async def update(self, job_id: str, changes: dict[str, Any], *, ttl_s: float | None = None) -> None:
        key = self._key(job_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={name: json.dumps(value) for name, value in changes.items()})
            if ttl_s is not None:
                pipe.srem(self.UNFINISHED, job_id)
                pipe.expire(key, max(1, int(ttl_s)))
                pipe.expire(f"{key}:events", max(1, int(ttl_s)))
            await pipe.execute()

    async def append(self, job_id: str, events: list[tuple[int, dict[str, Any]]]) -> None:
        if events:  # ids are given in order from the list's length + 1: one writer per job
            await _answer(self._redis.rpush(f"{self._key(job_id)}:events", *(json.dumps(event) for _, event in events)))

    async def replace(self, job_id: str, event_id: int, event: dict[str, Any]) -> None:
        await _answer(self._redis.lset(f"{self._key(job_id)}:events", event_id - 1, json.dumps(event)))

    async def events_after(self, job_id: str, after: int) -> list[tuple[int, dict[str, Any]]]:
        found = await _answer(self._redis.lrange(f"{self._key(job_id)}:events", after, -1))
        return [(after + i + 1, json.loads(event)) for i, event in enumerate(found)]

    async def unfinished(self) -> list[Job]:
        ids = await _answer(self._redis.smembers(self.UNFINISHED))
        jobs = [await self.get(job_id.decode()) for job_id in ids]
        return [job for job in jobs if job is not None and not job.finished]

    async def remove_expired(self, ttl_s: float) -> None:
        return None  # Redis expires finished jobs itself

    async def close(self) -> None:
        if self._opened is not None:
            await self._opened.aclose()
            self._opened = None


async def _answer(call: Awaitable[T] | T) -> T:
    """redis-py types each command as sync or async; the asyncio client's are async."""
    return await cast(Awaitable[T], call)
