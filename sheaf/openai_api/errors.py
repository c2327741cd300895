"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, mapped once from
sheaf's own (`{"detail": ...}` with the contract's statuses)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse

ModelT = TypeVar("ModelT", bound=BaseModel)
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error"}


class OpenAIError(Exception):
    """An error answered in OpenAI's shape, with the status OpenAI uses for it."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        kind = _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_parameter(param: str, message: str) -> OpenAIError:
    return OpenAIError(400, f"`{param}`: {message}", param=param, code="invalid_parameter")


def from_sheaf(
    status: int, body: Any, renames: Mapping[str, str], headers: Mapping[str, str] | None = None
) -> OpenAIError:
    """sheaf's error answer as OpenAI's: a 422 naming a field is a 400 naming the OpenAI parameter
    it came from (`renames`: sheaf's field to OpenAI's parameter); other statuses stay."""
    detail = body.get("detail", body) if isinstance(body, dict) else body
    if status == 422 and isinstance(detail, list) and detail:
        first = detail[0]
        param = _param(first.get("loc", []), renames)
        return OpenAIError(400, f"`{param}`: {first.get('msg', '')}", param=param, code="invalid_parameter")
    message = detail if isinstance(detail, str) else str(detail)
    code = {503: "server_busy", 504: "timeout", 413: "request_too_large"}.get(status)
    return OpenAIError(status, message, code=code, headers=headers)


def _param(loc: list[Any], renames: Mapping[str, str]) -> str:
    """`["body", "messages", 0, "content"]` as `messages[0].content`, under its OpenAI name."""
    parts = [part for part in loc if part != "body"]
    if not parts:
        return "body"
    text = renames.get(str(parts[0]), str(parts[0]))
    for part in parts[1:]:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def parsed(model: type[ModelT], fields: Any, renames: Mapping[str, str] | None = None) -> ModelT:
    """`fields` as an OpenAI request `model`; its first problem a 400 naming the parameter."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise from_validation(exc, renames) from None


def from_validation(exc: ValidationError, renames: Mapping[str, str] | None = None) -> OpenAIError:
    """The first problem pydantic found in an OpenAI request, as a 400 naming its parameter."""
    first = exc.errors(include_url=False, include_context=False, include_input=False)[0]
    param = _param(list(first["loc"]), renames or {})
    return OpenAIError(400, f"`{param}`: {first['msg']}", param=param, code="invalid_parameter")
