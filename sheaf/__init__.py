"""sheaf: model services on BentoML. The public surface: contracts, clients and errors."""

from sheaf.api import (
    BaseRequest,
    BaseResponse,
    ChatMessage,
    DiffusionRequest,
    DiffusionResponse,
    ErrorEvent,
    ProgressEvent,
    ResultEvent,
    StreamEvent,
    TextGenerationRequest,
    TextGenerationResponse,
    TokenEvent,
)
from sheaf.client import AsyncSheafClient, SheafClient
from sheaf.exceptions import (
    ClientError,
    HTTPStatusError,
    InvalidRequest,
    ServerError,
    SheafError,
    StreamError,
    TransportError,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncSheafClient",
    "BaseRequest",
    "BaseResponse",
    "ChatMessage",
    "ClientError",
    "DiffusionRequest",
    "DiffusionResponse",
    "ErrorEvent",
    "HTTPStatusError",
    "InvalidRequest",
    "ProgressEvent",
    "ResultEvent",
    "ServerError",
    "SheafClient",
    "SheafError",
    "StreamError",
    "StreamEvent",
    "TextGenerationRequest",
    "TextGenerationResponse",
    "TokenEvent",
    "TransportError",
]
