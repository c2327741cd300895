"""The fields every request and response carries, whatever the model type."""

from __future__ import annotations

import uuid
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field


def new_request_id() -> str:
    return str(uuid.uuid4())


def _null_first(schema: dict[str, Any]) -> None:
    """List `null` first in the schema of a field that is a list, a mapping or a model, or null.

    BentoML keeps only the first entry of a field's `anyOf` for its generated client, which
    then fails on a `null` where it expects a list or an object, sending or receiving. With
    `null` first, that client passes the value through as it is.
    """
    for field in schema.get("properties", {}).values():
        options = field.get("anyOf", [])
        if {"type": "null"} in options and (options[0].get("type") in ("array", "object") or "$ref" in options[0]):
            field["anyOf"] = [{"type": "null"}, *(option for option in options if option != {"type": "null"})]


class WireModel(BaseModel):
    """A model that goes over the wire: its schema suits BentoML's generated client."""

    model_config = ConfigDict(protected_namespaces=(), json_schema_extra=_null_first)


class BaseResponse(WireModel):
    """Every response has these fields; `metadata` holds timings, batch size, cache hits."""

    request_id: str
    model_type: str
    model_name: str
    metadata: dict[str, Any] = Field(default_factory=dict)


ResponseT = TypeVar("ResponseT", bound=BaseResponse)


class BaseRequest(WireModel, Generic[ResponseT]):
    """A request to one deployment, typed by the response it gets. Unknown fields are ignored."""

    # NaN and infinities go to the deployment as JSON's usual extension, as the caller sent them.
    model_config = ConfigDict(extra="ignore", ser_json_inf_nan="constants")

    response_model: ClassVar[type[BaseResponse]]

    request_id: str = Field(
        default_factory=new_request_id, description="Echoed back; the server makes one when absent."
    )
    model_type: str
    model_name: str = Field("", description="Free text: which model the caller meant.")
    timeout_s: float | None = Field(
        None, gt=0, description="Give up after this many seconds (504), at most the deployment's own timeout."
    )
