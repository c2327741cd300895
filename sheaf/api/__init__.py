"""Typed request, response and stream-event contracts (see the wire contract)."""

from sheaf.api.audio import Segment, TranscriptionRequest, TranscriptionResponse, Word
from sheaf.api.base import BaseRequest, BaseResponse
from sheaf.api.diffusion import DiffusionRequest, DiffusionResponse
from sheaf.api.events import (
    CancelledEvent,
    ErrorEvent,
    JobEvent,
    ProgressEvent,
    QueuedEvent,
    ResultEvent,
    SegmentEvent,
    StreamEvent,
    TokenEvent,
    parse_event,
    parse_job_event,
)
from sheaf.api.feature_ref import FeatureRef
from sheaf.api.forecast import ForecastRequest, ForecastResponse
from sheaf.api.jobs import JobAccepted, JobInfo, JobStatus
from sheaf.api.textgen import ChatMessage, TextGenerationRequest, TextGenerationResponse

__all__ = [
    "BaseRequest",
    "BaseResponse",
    "CancelledEvent",
    "ChatMessage",
    "DiffusionRequest",
    "DiffusionResponse",
    "ErrorEvent",
    "FeatureRef",
    "ForecastRequest",
    "ForecastResponse",
    "JobAccepted",
    "JobEvent",
    "JobInfo",
    "JobStatus",
    "ProgressEvent",
    "QueuedEvent",
    "ResultEvent",
    "Segment",
    "SegmentEvent",
    "StreamEvent",
    "TextGenerationRequest",
    "TextGenerationResponse",
    "TokenEvent",
    "TranscriptionRequest",
    "TranscriptionResponse",
    "Word",
    "parse_event",
    "parse_job_event",
]
