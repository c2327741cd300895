"""Jobs: what `POST /{name}/jobs` and `GET /{name}/jobs/{id}` answer."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobAccepted(BaseModel):
    """`POST /{name}/jobs`: 202, with the job's address in `Location`."""

    job_id: str
    status: JobStatus = "queued"
    position: int = Field(description="Jobs ahead of it in its deployment's queue (0: it runs next).")


class JobInfo(BaseModel):
    """`GET /{name}/jobs/{id}`: where the job is."""

    job_id: str
    deployment: str
    status: JobStatus
    position: int | None = Field(None, description="While queued: jobs ahead of it.")
    progress: dict[str, Any] | None = Field(None, description="While running: its last progress event.")
    result: dict[str, Any] | None = Field(None, description="Once succeeded: the `/predict` response.")
    error: dict[str, Any] | None = Field(None, description="Once failed: its `error` event.")
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    events: int = Field(0, description="Events in its log so far; the last one's SSE id.")
