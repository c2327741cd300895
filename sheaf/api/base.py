"""The fields every request and response carries, whatever the model type."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

if TYPE_CHECKING:
    from sheaf.api.feature_ref import FeatureRef


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


OPENAPI_REFS = "#/components/schemas/"
_NULL = {"type": "null"}
_SUBSCHEMAS = ("items", "additionalProperties", "not")  # keywords holding one schema
_SUBSCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "patternProperties")


def _openapi_nullable(schema: dict[str, Any]) -> None:
    """Write each `anyOf` with a `null` option as OpenAPI 3.0 does: the other options and `nullable: true`.

    OpenAPI 3.0 (BentoML's `/docs.json`) has no null type, and BentoML keeps only an `anyOf`'s
    first option there, so null first showed `{"type": "null"}` alone on the Swagger page.
    """
    options = schema.get("anyOf")
    if isinstance(options, list) and _NULL in options:
        others = [option for option in options if option != _NULL]
        del schema["anyOf"]
        if len(others) == 1 and "$ref" not in others[0]:
            schema.update({**others[0], **schema})  # the field's own title, description and default win
        elif len(others) == 1:
            schema["allOf"] = others  # OpenAPI 3.0 ignores the siblings of a bare `$ref`, `nullable` too
        else:
            schema["anyOf"] = others
        schema["nullable"] = True
    for key in _SUBSCHEMAS:
        if isinstance(schema.get(key), dict):
            _openapi_nullable(schema[key])
    for key in _SUBSCHEMA_LISTS:
        for option in schema.get(key) or ():
            _openapi_nullable(option)
    for key in _SUBSCHEMA_MAPS:
        for sub in (schema.get(key) or {}).values():
            _openapi_nullable(sub)


class WireModel(BaseModel):
    """A model that goes over the wire: its schema suits BentoML's generated client and its Swagger page.

    Its JSON schema (`/schema.json`, which the generated client reads) lists `null` first; a
    schema for OpenAPI components (refs under `#/components/schemas/`, as BentoML's `/docs.json`
    asks for) says `nullable: true` beside the real type instead.
    """

    model_config = ConfigDict(protected_namespaces=(), json_schema_extra=_null_first)

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler, /) -> JsonSchemaValue:
        json_schema = handler(core_schema)
        # The ref template says who asks: pydantic's handler holds the generator it came with.
        ref_template = getattr(getattr(handler, "generate_json_schema", None), "ref_template", "")
        if str(ref_template).startswith(OPENAPI_REFS):
            _openapi_nullable(handler.resolve_ref_schema(json_schema))
        return json_schema


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

    def features_wanted(self) -> FeatureRef | None:
        """The feature store lookup this request asks for before its backend runs; None: none."""
        return None

    def with_features(self, values: list[float] | list[list[float]]) -> Self:
        """This request with the looked-up `values` in place of its reference."""
        raise NotImplementedError(f"{type(self).__name__} looks nothing up")
