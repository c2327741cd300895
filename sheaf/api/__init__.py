"""Typed request, response and stream-event contracts (see the wire contract)."""

from sheaf.api.base import BaseRequest, BaseResponse
from sheaf.api.events import ErrorEvent, ResultEvent, StreamEvent, TokenEvent, parse_event
from sheaf.api.textgen import ChatMessage, TextGenerationRequest, TextGenerationResponse

__all__ = [
    "BaseRequest",
    "BaseResponse",
    "ChatMessage",
    "ErrorEvent",
    "ResultEvent",
    "StreamEvent",
    "TextGenerationRequest",
    "TextGenerationResponse",
    "TokenEvent",
    "parse_event",
]
