"""Jobs: a stream that outlives its connection, with a durable event log a client can leave and
resume (`sheaf.job_store`).

The entry service runs each job as a stream of its deployment (so through the same batcher,
deadlines and LoRA lock as any stream) and writes every event to the job's log, numbered from
1. A deployment runs at most `max_batch_size` jobs at once, and keeps at most
`limits.max_queued_jobs` waiting (then 503); a waiting job's log gets a `queued` event each
time its position changes. Reading the log never starts or stops the job; `cancel` does: a
queued job never starts, a running one's stream is closed, which stops its model work.

The owner of a job (the process that took it) says it is alive every `HEARTBEAT_S`; a job
whose owner has been silent for `LEASE_S` (its server was killed) reads `failed`, as do the
jobs a server had when it shut down. Any replica that shares the store answers for any job;
a cancel of a job another replica runs is a flag its owner reads at its next heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from sheaf.api import BaseRequest
from sheaf.api.jobs import JobAccepted, JobInfo
from sheaf.config import DeploymentConfig
from sheaf.job_store import Job, JobStore
from sheaf.outcomes import Outcome
from sheaf.streaming import SSEDecoder

logger = logging.getLogger("sheaf")

HEARTBEAT_S = 1.0
LEASE_S = 5.0
FLUSH_S = 0.05  # the longest an event waits to be written (events that come together go in one write)
POLL_S = 0.5  # a reader's look at the store for what another replica wrote
PROGRESS = ("progress", "token", "segment")

OpenStream = Callable[[BaseRequest[Any]], AsyncGenerator[str, None]]
"""A deployment's `/stream` for a request, as text chunks of SSE."""
Check = Callable[[BaseRequest[Any]], Awaitable[Outcome]]
"""A deployment's `check` of a request: what it would refuse it for, or 200."""


class JobQueueFull(Exception):
    """The deployment has `max_queued_jobs` waiting."""


class JobRefused(Exception):
    """The deployment refuses the request itself (its outcome says why): nothing was queued."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome["body"])
        self.outcome = outcome


@dataclass
class _Lane:
    config: DeploymentConfig
    open_stream: OpenStream
    check: Check
    waiting: deque[str] = field(default_factory=deque)
    storing: set[str] = field(default_factory=set)  # waiting, and not in the store yet
    requests: dict[str, BaseRequest[Any]] = field(default_factory=dict)
    running: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    renumbering: asyncio.Lock = field(default_factory=asyncio.Lock)  # one pass at a time: no place told twice


class JobBoard:
    def __init__(self, store: JobStore, ttl_s: float) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lanes: dict[str, _Lane] = {}
        self._changed: dict[str, asyncio.Event] = {}  # per job held here: set whenever its log grows
        self._last: dict[str, int] = {}  # per job held here: the id of its newest event
        self._writing: dict[str, asyncio.Lock] = {}  # per job held here: one append at a time
        self._keeper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Future[None]] = set()  # held, or the loop may collect them
        self._stopping = False

    def serve(self, config: DeploymentConfig, open_stream: OpenStream, check: Check) -> None:
        self.lanes[config.name] = _Lane(config, open_stream, check)

    async def start(self) -> None:
        """Fail what a server that died left behind, and keep this one's jobs alive from now on."""
        for job in await self.store.unfinished():
            if self._is_orphan(job):
                await self._fail(job, f"its server stopped while it was {job.status}")
        self._keeper = asyncio.ensure_future(self._keep())

    async def stop(self) -> None:
        """At shutdown: every job this server holds ends `failed`, saying why."""
        self._stopping = True
        if self._keeper is not None:
            self._keeper.cancel()
        for lane in self.lanes.values():
            for task in lane.running.values():
                task.cancel()
            await asyncio.gather(*lane.running.values(), return_exceptions=True)
            for job_id in list(lane.waiting):
                job = await self.store.get(job_id)
                if job is not None and not job.finished:
                    await self._fail(job, "the server shut down before it ran")
        await self.store.close()

    # ------------------------------------------------------------------ the routes' calls

    async def submit(self, name: str, request: BaseRequest[Any]) -> JobAccepted:
        lane = self.lanes[name]
        if len(lane.waiting) >= lane.config.limits.max_queued_jobs:
            raise JobQueueFull(f"{len(lane.waiting)} jobs are waiting (limits.max_queued_jobs)")
        refusal = await lane.check(request)  # the 4xx a predict would get, before anything queues
        if refusal["status"] != 200:
            raise JobRefused(refusal)
        if len(lane.waiting) >= lane.config.limits.max_queued_jobs:  # others came while it was checked
            raise JobQueueFull(f"{len(lane.waiting)} jobs are waiting (limits.max_queued_jobs)")
        job = Job(
            job_id=f"{name}-{uuid.uuid4().hex}",
            deployment=name,
            request=request.model_dump(mode="json"),
            position=len(lane.waiting),
            owner=self.owner,
            heartbeat_at=time.time(),
            last_event=1,
        )
        # Its place is taken now, before the store is written: it cannot start until it is there.
        lane.waiting.append(job.job_id)
        lane.storing.add(job.job_id)
        try:
            await self.store.create(job, {"type": "queued", "position": job.position, "done": False})
        except BaseException:
            lane.waiting.remove(job.job_id)
            raise
        finally:
            lane.storing.discard(job.job_id)
        self._last[job.job_id] = job.last_event
        lane.requests[job.job_id] = request
        self._start_next(lane)
        return JobAccepted(job_id=job.job_id, position=job.position or 0)

    async def info(self, name: str, job_id: str) -> JobInfo | None:
        job = await self._job(name, job_id)
        if job is None:
            return None
        answer = JobInfo(
            job_id=job.job_id,
            deployment=job.deployment,
            status=job.status,
            position=job.position if job.status == "queued" else None,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            events=job.last_event,
        )
        if job.status == "running" or job.finished:
            last = [event for _, event in await self.store.events_after(job_id, max(0, job.last_event - 50))]
            if job.status == "running":
                answer.progress = next((e for e in reversed(last) if e["type"] in PROGRESS), None)
            elif job.status == "succeeded" and last:  # none: Redis evicted its log (volatile-lru)
                answer.result = {k: v for k, v in last[-1].items() if k not in ("type", "done")}
            elif job.status == "failed" and last and last[-1]["type"] == "error":
                answer.error = last[-1]
        return answer

    async def events(self, name: str, job_id: str, after: int = 0) -> AsyncIterator[tuple[int, dict[str, Any]] | None]:
        """The job's events after the one numbered `after`, then the live ones, until its last;
        None now and then while nothing comes (for a heartbeat)."""
        while True:
            found = await self.store.events_after(job_id, after)
            for event_id, event in found:
                yield event_id, event
                after = event_id
                if event.get("done"):
                    return
            if found:
                continue
            job = await self._job(name, job_id)
            if job is None:
                return
            if job.finished:  # its last events, written since the look above; none: read, or evicted
                if job.last_event <= after or not await self.store.events_after(job_id, after):
                    return
                continue
            changed = self._changed.get(job_id)
            if changed is None:  # held by another replica: look again in a while
                await asyncio.sleep(POLL_S)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), POLL_S)
                changed.clear()
            yield None

    async def cancel(self, name: str, job_id: str) -> JobInfo | None:
        job = await self._job(name, job_id)
        if job is None:
            return None
        lane = self.lanes[name]
        if job.finished:
            pass
        elif job_id in lane.waiting:
            lane.waiting.remove(job_id)
            lane.requests.pop(job_id, None)
            await self._finish(job, "cancelled", {"type": "cancelled", "done": True})
            await self._renumber(lane)
        elif job_id in lane.running:
            task = lane.running[job_id]
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        else:  # another replica holds it: it acts at its next heartbeat
            await self.store.update(job_id, {"cancel_requested": True})
            deadline = time.monotonic() + 2 * HEARTBEAT_S + 1
            while (held := await self.store.get(job_id)) is not None and not held.finished:
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
        return await self.info(name, job_id)

    # ------------------------------------------------------------------ running

    def _start_next(self, lane: _Lane) -> None:
        started = False
        while lane.waiting and len(lane.running) < lane.config.batching.max_batch_size:
            if lane.waiting[0] in lane.storing:  # its submit starts it once it is stored
                break
            job_id = lane.waiting.popleft()
            request = lane.requests.pop(job_id)
            lane.running[job_id] = task = asyncio.ensure_future(self._run(lane, job_id, request))
            task.add_done_callback(functools.partial(self._ended, lane, job_id))
            started = True
        if started and lane.waiting:
            self._hold(asyncio.ensure_future(self._renumber(lane)))

    def _hold(self, task: asyncio.Future[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _ended(self, lane: _Lane, job_id: str, _: object) -> None:
        lane.running.pop(job_id, None)
        if not self._stopping:
            self._start_next(lane)

    async def _renumber(self, lane: _Lane) -> None:
        """Tell every waiting job its new place."""
        async with lane.renumbering:
            for job_id in list(lane.waiting):
                job = await self.store.get(job_id)
                if job is None or job.status != "queued" or job_id not in lane.waiting:
                    continue
                position = lane.waiting.index(job_id)
                if position < (job.position if job.position is not None else position + 1):  # it only moves up
                    await self.store.update(job_id, {"position": position})
                    await self._append(job_id, [{"type": "queued", "position": position, "done": False}])

    async def _run(self, lane: _Lane, job_id: str, request: BaseRequest[Any]) -> None:
        job = await self.store.get(job_id)
        if job is None or job.finished:
            return
        await self.store.update(job_id, {"status": "running", "started_at": time.time(), "position": None})
        log = _Log(self, job_id)
        budget = lane.config.timeout_for(request.timeout_s)
        try:
            async with asyncio.timeout(budget), aclosing(lane.open_stream(request)) as chunks:
                final = await log.copy(chunks)
        except TimeoutError:
            detail = f"no result within the deadline of {budget:g} s"
            final = {"type": "error", "done": True, "error": detail, "code": "deadline_exceeded"}
        except asyncio.CancelledError:
            final = LOST if self._stopping else {"type": "cancelled", "done": True}
        except Exception as exc:  # the deployment refused it, or could not be reached
            final = {"type": "error", "done": True, "error": f"{type(exc).__name__}: {exc}", "code": "upstream_error"}
            if body := getattr(exc, "body", None):
                final["status"], final["body"] = getattr(exc, "status", 502), body
        finally:
            await log.flush()
        status = {"result": "succeeded", "cancelled": "cancelled"}.get(final["type"], "failed")
        await self._finish(job, status, final)

    # ------------------------------------------------------------------ the log and the record

    async def _append(self, job_id: str, events: list[dict[str, Any]]) -> list[int]:
        """Write `events` at the end of the job's log; their ids."""
        async with self._writing.setdefault(job_id, asyncio.Lock()):
            last = self._last.get(job_id)
            if last is None:  # not held here: a job failed for its silent owner
                job = await self.store.get(job_id)
                last = job.last_event if job else 0
            ids = list(range(last + 1, last + len(events) + 1))
            await self.store.append(job_id, list(zip(ids, events, strict=True)))
            self._last[job_id] = ids[-1]
            await self.store.update(job_id, {"last_event": ids[-1]})
        self._changed.setdefault(job_id, asyncio.Event()).set()
        return ids

    async def _finish(self, job: Job, status: str, final: dict[str, Any]) -> None:
        await self._append(job.job_id, [final])
        await self.store.update(job.job_id, {"status": status, "finished_at": time.time()}, ttl_s=self.ttl_s)
        self._last.pop(job.job_id, None)
        self._writing.pop(job.job_id, None)
        changed = self._changed.pop(job.job_id, None)
        if changed is not None:
            changed.set()
        logger.info("%s job %s %s", job.deployment, job.job_id, status)

    async def _fail(self, job: Job, why: str) -> None:
        await self._finish(job, "failed", {"type": "error", "done": True, "error": why, "code": "job_lost"})

    async def _job(self, name: str, job_id: str) -> Job | None:
        """The job, if it is one of `name`'s; one whose owner has gone silent is failed first."""
        job = await self.store.get(job_id)
        if job is None or job.deployment != name:
            return None
        if not job.finished and self._is_orphan(job):
            await self._fail(job, f"its server stopped answering while it was {job.status}")
            job = await self.store.get(job_id)
        return job

    def _is_orphan(self, job: Job) -> bool:
        return job.owner != self.owner and time.time() - job.heartbeat_at > LEASE_S

    async def _keep(self) -> None:
        """Every HEARTBEAT_S: say this server's jobs are alive, act on cancels asked elsewhere,
        and remove finished jobs past their time to live."""
        swept = 0.0
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                now = time.time()
                for lane in self.lanes.values():
                    for job_id in [*lane.waiting, *lane.running]:
                        await self.store.update(job_id, {"heartbeat_at": now})
                        job = await self.store.get(job_id)
                        if job is not None and job.cancel_requested:
                            await self.cancel(lane.config.name, job_id)
                if now - swept > 60:
                    await self.store.remove_expired(self.ttl_s)
                    swept = now
            except Exception:  # the store is down: try again at the next beat
                logger.exception("jobs: keeping this server's jobs alive failed")


LOST = {"type": "error", "done": True, "error": "the server shut down while it ran", "code": "job_lost"}


class _Log:
    """A running job's events on their way to its log: those that come together go in one write
    (at most FLUSH_S late), and a progress event's preview is kept only until the next one's."""

    def __init__(self, board: JobBoard, job_id: str) -> None:
        self.board, self.job_id = board, job_id
        self.pending: list[dict[str, Any]] = []
        self.flushed_at = time.monotonic()
        self.preview: tuple[int, dict[str, Any]] | None = None  # the written event that holds the preview

    async def copy(self, chunks: AsyncIterator[str]) -> dict[str, Any]:
        """Log the stream's events until its last, which it returns."""
        decoder = SSEDecoder()
        async for chunk in chunks:
            for event in decoder.feed(chunk):
                if event.get("done"):
                    return event
                self.pending.append(event)
            if self.pending and time.monotonic() - self.flushed_at >= FLUSH_S:
                await self.flush()
        return {"type": "error", "done": True, "error": "the stream ended without a result", "code": "upstream_error"}

    async def flush(self) -> None:
        if not self.pending:
            return
        events, self.pending = self.pending, []
        ids = await self.board._append(self.job_id, events)
        self.flushed_at = time.monotonic()
        previews = [(event_id, event) for event_id, event in zip(ids, events, strict=True) if event.get("preview_b64")]
        if previews:
            for event_id, event in ([self.preview] if self.preview else []) + previews[:-1]:
                without = {key: value for key, value in event.items() if key != "preview_b64"}
                await self.board.store.replace(self.job_id, event_id, without)
            self.preview = previews[-1]
