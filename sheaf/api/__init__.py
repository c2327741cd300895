"""Typed request, response and stream-event contracts (see the wire contract)."""

from sheaf.api.audio import Segment, TranscriptionRequest, TranscriptionResponse, Word
from sheaf.api.base import BaseRequest, BaseResponse
from sheaf.api.diffusion import DiffusionRequest, DiffusionResponse
from sheaf.api.events import (
    ErrorEvent,
    ProgressEvent,
    ResultEvent,
    SegmentEvent,
    StreamEvent,
    TokenEvent,
    parse_event,
)
from sheaf.api.feature_ref import FeatureRef
from sheaf.api.forecast import ForecastRequest, ForecastResponse
from sheaf.api.textgen import ChatMessage, TextGenerationRequest, TextGenerationResponse

__all__ = [
    "BaseRequest",
    "BaseResponse",
    "ChatMessage",
    "DiffusionRequest",
    "DiffusionResponse",
    "ErrorEvent",
    "FeatureRef",
    "ForecastRequest",
    "ForecastResponse",
    "ProgressEvent",
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
]
