"""What one request of a batch comes to: a status and a JSON body, so that one request's error
never fails its batch-mates. `/batch` answers a list of them; a predict answers one as HTTP."""

from __future__ import annotations

from typing import Any

from typing_extensions import TypedDict  # pydantic (BentoML builds a schema of it) needs this one on 3.11

from sheaf.backends.base import Cancelled
from sheaf.exceptions import FeatureLookupError, InvalidRequest

OUTCOME_STATUS = "x-sheaf-status"
"""The header in which a deployment's `predict` gives its outcome's status (its HTTP status is 200:
anything else is the deployment failing), so that the entry service relays the body undecoded."""


class Outcome(TypedDict):
    """`{"status": 200, "body": response}` or `{"status": 4xx/5xx, "body": {"detail": ...}}`."""

    status: int
    body: dict[str, Any]


def success(body: dict[str, Any]) -> Outcome:
    return {"status": 200, "body": body}


def error_outcome(status: int, detail: Any) -> Outcome:
    return {"status": status, "body": {"detail": detail}}


def failure(exc: BaseException) -> Outcome:
    """The outcome of a request that raised `exc`: a refusal names its field, anything else is a 500."""
    if isinstance(exc, InvalidRequest | FeatureLookupError):
        return error_outcome(exc.status_code, list(exc.detail))
    if isinstance(exc, Cancelled):
        return error_outcome(504, f"stopped: its callers are gone or past their deadline: {exc}")
    return error_outcome(500, f"{type(exc).__name__}: {exc}")
