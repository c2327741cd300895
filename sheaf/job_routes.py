"""The entry service's job routes (`sheaf.jobs` runs them):

- `POST /{name}/jobs` (a typed BentoML API in `bentos/gateway.py`, answered by `submit`): 202,
  `{"job_id", "status": "queued", "position"}` and `Location`; 503 with `Retry-After` when
  the deployment's job queue is full;
- `GET /{name}/jobs/{id}`: where the job is (`JobInfo`); 404 for an id it does not know;
- `GET /{name}/jobs/{id}/events`: its event log as SSE, each event with its `id:`, from after
  `Last-Event-ID` (or `?after=N`), then live until its last event;
- `DELETE /{name}/jobs/{id}`: cancel it; the answer is where it is then.

GET and DELETE live in the small mounted app beside the probes (BentoML APIs are POST only).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import bentoml
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from sheaf import upstream
from sheaf.api.base import BaseRequest
from sheaf.config import DeploymentConfig, Jobs, config_dir, load_server_config
from sheaf.job_store import JobStore, RedisJobStore, SQLiteJobStore
from sheaf.jobs import JobBoard, JobQueueFull, JobRefused
from sheaf.streaming import HEARTBEAT, encode_event
from sheaf.weights import cache_dir

JOBS_FILE = "jobs.sqlite3"

logger = logging.getLogger("sheaf")


def job_board(served: list[bentoml.Service[Any]]) -> JobBoard:
    """The entry service's jobs, in the store `sheaf.yaml` names (`jobs:`); nothing opens until used."""
    settings = load_server_config(config_dir()).jobs
    board = JobBoard(_store(settings), settings.ttl_s)
    for deployment in served:
        config: DeploymentConfig = deployment.inner.deployment_config
        stream, check = functools.partial(upstream.stream, deployment), functools.partial(upstream.check, deployment)
        board.serve(config, stream, check)
    return board


def _store(settings: Jobs) -> JobStore:
    if settings.store == "redis":
        assert settings.url is not None  # the config requires it for this store
        return RedisJobStore(os.path.expandvars(settings.url))
    return SQLiteJobStore(Path(settings.path) if settings.path else cache_dir() / JOBS_FILE)


async def submit(board: JobBoard, name: str, request: BaseRequest[Any], ctx: bentoml.Context) -> Any:
    """`POST /{name}/jobs`: the job accepted (202), or the 503 of a full queue."""
    config = board.lanes[name].config
    retry = config.limits.retry_after_s
    try:
        accepted = await board.submit(name, request)
    except JobRefused as refused:  # the request itself: its 4xx (or the 503 of a model still loading)
        ctx.response.status_code = refused.outcome["status"]
        if refused.outcome["status"] == 503:
            ctx.response.metadata["retry-after"] = str(retry)
        return JSONResponse(refused.outcome["body"])
    except Exception as exc:  # a full queue, a deployment or store that cannot take it now
        ctx.response.status_code = 503
        ctx.response.metadata["retry-after"] = str(retry)
        if isinstance(exc, JobQueueFull):
            return JSONResponse({"detail": f"deployment {name}'s job queue is full: {exc}; retry after {retry} s"})
        logger.exception("jobs: %s could not take a job", name)
        detail = f"cannot take the job now ({type(exc).__name__}: {exc}); retry after {retry} s"
        return JSONResponse({"detail": detail})
    ctx.response.status_code = 202
    ctx.response.metadata["location"] = f"/{name}/jobs/{accepted.job_id}"
    return JSONResponse(accepted.model_dump(mode="json"))


def job_routes(board: JobBoard) -> list[Route]:
    def named(request: Request) -> tuple[str, str]:
        return request.url.path.split("/")[1], request.path_params["job_id"]

    def unknown(name: str, job_id: str) -> JSONResponse:
        return JSONResponse({"detail": f"deployment {name} has no job {job_id!r}"}, status_code=404)

    async def info(request: Request) -> Response:
        name, job_id = named(request)
        found = await board.info(name, job_id)
        return unknown(name, job_id) if found is None else JSONResponse(found.model_dump(mode="json"))

    async def cancel(request: Request) -> Response:
        name, job_id = named(request)
        found = await board.cancel(name, job_id)
        return unknown(name, job_id) if found is None else JSONResponse(found.model_dump(mode="json"))

    async def events(request: Request) -> Response:
        name, job_id = named(request)
        given = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
        if not given.isdigit():
            problem = [{"loc": ["header", "last-event-id"], "msg": "must be an event id (0 or more)", "type": "int"}]
            return JSONResponse({"detail": problem}, status_code=422)
        if await board.info(name, job_id) is None:
            return unknown(name, job_id)
        heartbeat_s = board.lanes[name].config.heartbeat_s
        return StreamingResponse(
            _frames(board, name, job_id, int(given), heartbeat_s),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    routes = []
    for name in board.lanes:
        routes += [
            Route(f"/{name}/jobs/{{job_id}}", info, methods=["GET"]),
            Route(f"/{name}/jobs/{{job_id}}", cancel, methods=["DELETE"]),
            Route(f"/{name}/jobs/{{job_id}}/events", events, methods=["GET"]),
        ]
    return routes


async def _frames(board: JobBoard, name: str, job_id: str, after: int, heartbeat_s: float) -> AsyncGenerator[str]:
    """The job's events as SSE frames with their ids; a heartbeat after `heartbeat_s` of quiet.
    Leaving stops only the reading: the job goes on."""
    quiet_since = time.monotonic()
    async for item in board.events(name, job_id, after):
        if item is None:
            if time.monotonic() - quiet_since >= heartbeat_s:
                quiet_since = time.monotonic()
                yield HEARTBEAT
            continue
        event_id, event = item
        quiet_since = time.monotonic()
        yield encode_event(event, event_id)
