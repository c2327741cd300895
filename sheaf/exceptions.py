"""Every error sheaf raises, in one hierarchy::

SheafError
├── InvalidRequest        a backend refuses one request (served as 422)
├── TransportError        the client could not reach the server, or the connection broke
├── HTTPStatusError       the server answered 4xx or 5xx; `.status_code`, `.detail`
│   ├── ClientError       4xx: the request is wrong (422), unknown (404), or the server is full (429)
│   └── ServerError       5xx: the backend raised, or a dependency failed
└── StreamError           a stream ended in an `error` event, or without a final event
"""

from __future__ import annotations

from typing import Any


class SheafError(Exception):
    """Base of every sheaf error."""


class InvalidRequest(SheafError):
    """Raised by a backend for a request it cannot take; the server answers 422 with this message."""

    status_code = 422

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def detail(self) -> list[dict[str, Any]]:
        return [{"loc": ["body", self.field], "msg": self.message, "type": "value_error"}]


class TransportError(SheafError):
    """The request did not complete at the transport level (connect, read, broken stream)."""


class HTTPStatusError(SheafError):
    """The server answered with an error status."""

    def __init__(self, status_code: int, detail: Any, retry_after: float | None = None) -> None:
        super().__init__(f"{status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail
        self.retry_after = retry_after


class ClientError(HTTPStatusError):
    """4xx: fix the request (or, for 429, retry after `retry_after` seconds)."""


class ServerError(HTTPStatusError):
    """5xx: the server or its backend failed."""


class StreamError(SheafError):
    """The stream ended in an `error` event, or ended without a final event."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code
