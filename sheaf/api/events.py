"""Stream events: one JSON object per Server-Sent Event, ending with `result` or `error`."""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel

from sheaf.api.audio import Segment
from sheaf.api.base import BaseResponse

ResponseT = TypeVar("ResponseT", bound=BaseResponse)


class TokenEvent(BaseModel):
    """Text generation: a new piece of text, as soon as it is produced."""

    type: Literal["token"] = "token"
    text: str
    index: int
    done: Literal[False] = False


class ProgressEvent(BaseModel):
    """Diffusion: a denoising step has finished."""

    type: Literal["progress"] = "progress"
    step: int
    total_steps: int
    done: Literal[False] = False
    preview_b64: str | None = None
    """A small PNG of the image so far, every `preview_every` steps when asked."""


class SegmentEvent(BaseModel):
    """Transcription: a segment has decoded."""

    type: Literal["segment"] = "segment"
    segment: Segment
    done: Literal[False] = False


class ErrorEvent(BaseModel):
    """Last event of a stream whose backend failed after the stream began."""

    type: Literal["error"] = "error"
    done: Literal[True] = True
    error: str
    code: str | None = None


class ResultEvent(BaseModel, Generic[ResponseT]):
    """Last event of a successful stream. On the wire its fields are the response's, flat."""

    type: Literal["result"] = "result"
    done: Literal[True] = True
    response: ResponseT

    def to_wire(self) -> dict[str, Any]:
        return {"type": "result", "done": True, **self.response.model_dump(mode="json")}


class QueuedEvent(BaseModel):
    """A job: it waits, with `position` jobs ahead of it (0: it runs next)."""

    type: Literal["queued"] = "queued"
    position: int
    done: Literal[False] = False


class CancelledEvent(BaseModel):
    """Last event of a job that was cancelled."""

    type: Literal["cancelled"] = "cancelled"
    done: Literal[True] = True


StreamEvent = TokenEvent | ProgressEvent | SegmentEvent | ErrorEvent | ResultEvent[Any]
"""Every event type a stream may carry."""

PROGRESS_EVENTS: dict[str, type[BaseModel]] = {"token": TokenEvent, "progress": ProgressEvent, "segment": SegmentEvent}
"""The events before the terminal one, by their `type`."""

JobEvent = QueuedEvent | CancelledEvent | StreamEvent
"""Every event type a job's event log may carry."""


def parse_event(payload: dict[str, Any], response_model: type[ResponseT]) -> StreamEvent:
    """A wire event as its typed model; a `result` carries the deployment's typed response."""
    kind = payload.get("type")
    if kind == "result":
        fields = {k: v for k, v in payload.items() if k not in ("type", "done")}
        return ResultEvent[response_model](response=response_model.model_validate(fields))  # type: ignore[valid-type]
    if kind == "error":
        return ErrorEvent.model_validate(payload)
    if kind in PROGRESS_EVENTS:
        return PROGRESS_EVENTS[kind].model_validate(payload)  # type: ignore[return-value]
    raise ValueError(f"unknown event type {kind!r}")


def parse_job_event(payload: dict[str, Any], response_model: type[ResponseT]) -> JobEvent:
    """A job's wire event as its typed model: a stream's events, `queued` and `cancelled`."""
    kind = payload.get("type")
    if kind == "queued":
        return QueuedEvent.model_validate(payload)
    if kind == "cancelled":
        return CancelledEvent.model_validate(payload)
    return parse_event(payload, response_model)
