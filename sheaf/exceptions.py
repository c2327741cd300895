"""Every error sheaf raises, on the server and in the client, in one hierarchy::

SheafError
├── TransportError              the server could not be reached, or the connection broke
├── HTTPStatusError             the server answered 4xx or 5xx; .status_code, .detail, .retry_after
│   ├── ClientError             4xx: the request is wrong (422), names nothing there (404), or the server is full (429)
│   │   └── InvalidRequest      422: a field fails validation or the deployment cannot take it; .field, .message
│   ├── ServerError             5xx: the backend raised (500), a dependency failed (502), full (503), deadline (504)
│   └── FeatureLookupError      a `feature_ref` did not resolve; .field is "feature_ref", .message
│       ├── FeatureRefInvalid       422, and an InvalidRequest: no feature store, unknown view or feature, not a history
│       ├── FeatureEntityNotFound   404, and a ClientError: the online store has no value for the entity
│       └── FeatureStoreFailed      502, and a ServerError: the store raised or could not be reached
└── StreamError                 the stream ended with an `error` event, or without a result; .code

Backends raise `InvalidRequest(field, message)` and the feature resolver makes the `FeatureLookupError`
kinds from the ref; the server answers each with its `status_code` and `{"detail": exc.detail}`, a list like
FastAPI's validation errors. The client raises the same classes from those answers: a 422 as `InvalidRequest`,
and an answer whose detail puts the problem at `["body", "feature_ref"]` with a feature error `type` as that
`FeatureLookupError` kind, so `except ClientError` and `except FeatureLookupError` both catch an unknown entity.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sheaf.api.feature_ref import FeatureRef


class SheafError(Exception):
    """Base of every sheaf error."""


class TransportError(SheafError):
    """The request did not complete at the transport level (connect, read, broken stream)."""


class HTTPStatusError(SheafError):
    """The server answered with an error status; `detail` is its answer's `detail`."""

    status_code: int

    def __init__(
        self, status_code: int, detail: Any, retry_after: float | None = None, *, message: str | None = None
    ) -> None:
        super().__init__(message or f"{status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail
        self.retry_after = retry_after


class ClientError(HTTPStatusError):
    """4xx: fix the request (or, for 429, retry after `retry_after` seconds)."""


class ServerError(HTTPStatusError):
    """5xx: the server or its backend failed (for 503, retry after `retry_after` seconds)."""


def describe_detail(detail: Any) -> str:
    """An answer's `detail` on one line: a validation list becomes `field: message; ...`."""
    if isinstance(detail, list) and detail and all(isinstance(item, dict) and "msg" in item for item in detail):
        return "; ".join(_where(item.get("loc", [])) + str(item["msg"]) for item in detail)
    return detail if isinstance(detail, str) else json.dumps(detail, default=str)


def field_of(loc: Sequence[Any]) -> str:
    """The field a validation location names, `sub.field` (without the leading `body`); "" for the whole body."""
    return ".".join(str(part) for part in (loc[1:] if loc[:1] == ["body"] else loc))


def _where(loc: Sequence[Any]) -> str:
    field = field_of(loc)
    return f"{field}: " if field else ""


class InvalidRequest(ClientError):
    """422: the request fails validation, or the deployment cannot take it.

    A backend raises `InvalidRequest(field, message)`; the client passes the answer's own `detail` as well,
    and `field` and `message` are then its first problem's."""

    status_code = 422

    def __init__(self, field: str, message: str, *, detail: list[dict[str, Any]] | None = None) -> None:
        wire = detail or [{"loc": ["body", field], "msg": message, "type": "value_error"}]
        super().__init__(self.status_code, wire, message=describe_detail(wire))
        self.field = field
        self.message = message


class FeatureLookupError(HTTPStatusError):
    """A `feature_ref` could not be resolved; `status_code` is the HTTP status the server answers with.

    The resolver makes one from the ref it could not resolve (`ref`, `problem`), its message naming
    `view:feature for key=value`; the client makes one from the answer (`ref` None, `problem` the message)."""

    status_code = 502
    error_type = "feature_store_error"  # the `type` of its `detail`, by which the client knows the kind

    def __init__(self, ref: FeatureRef | None, problem: str) -> None:
        message = f"{_describe_ref(ref)}: {problem}" if ref is not None else problem
        detail = [{"loc": ["body", "feature_ref"], "msg": message, "type": self.error_type}]
        HTTPStatusError.__init__(self, self.status_code, detail, message=message)
        self.ref = ref
        self.problem = problem
        self.field = "feature_ref"
        self.message = message


class FeatureRefInvalid(FeatureLookupError, InvalidRequest):
    """Unknown view or feature, wrong entity key, or a value that is not a history (422)."""

    status_code = 422
    error_type = "value_error"


class FeatureEntityNotFound(FeatureLookupError, ClientError):
    """The online store holds nothing for this entity (404)."""

    status_code = 404
    error_type = "feature_not_found"


class FeatureStoreFailed(FeatureLookupError, ServerError):
    """The feature store raised or could not be reached (502)."""

    status_code = 502
    error_type = "feature_store_error"


def _describe_ref(ref: FeatureRef) -> str:
    return f"{ref.feature_view}:{ref.feature_name} for {ref.entity_key}={ref.entity_value}"


class StreamError(SheafError):
    """The stream ended in an `error` event, or ended without a final event."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code
