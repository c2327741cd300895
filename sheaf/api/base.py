"""The fields every request and response carries, whatever the model type."""

from __future__ import annotations

import uuid
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field


def new_request_id() -> str:
    return str(uuid.uuid4())


class BaseResponse(BaseModel):
    """Every response has these fields; `metadata` holds timings, batch size, cache hits."""

    model_config = ConfigDict(protected_namespaces=())

    request_id: str
    model_type: str
    model_name: str
    metadata: dict[str, Any] = Field(default_factory=dict)


ResponseT = TypeVar("ResponseT", bound=BaseResponse)


class BaseRequest(BaseModel, Generic[ResponseT]):
    """A request to one deployment, typed by the response it gets. Unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    response_model: ClassVar[type[BaseResponse]]

    request_id: str = Field(
        default_factory=new_request_id, description="Echoed back; the server makes one when absent."
    )
    model_type: str
    model_name: str = Field("", description="Free text: which model the caller meant.")
