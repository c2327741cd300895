"""The `text_generation` contract."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from sheaf.api.base import BaseRequest, BaseResponse

MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256  # characters of one stop string


def example() -> dict[str, Any]:
    """A valid request, for the schema: Swagger's "Try it out" builds its body from the schema's
    example, or else from every property, which gives both `prompt` and `messages` (a 422)."""
    return {
        "model_type": "text_generation",
        "messages": [{"role": "user", "content": "Write one sentence about the sea."}],
        "max_new_tokens": 32,
    }


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class TextGenerationResponse(BaseResponse):
    model_type: Literal["text_generation"] = "text_generation"
    text: str
    finish_reason: Literal["stop", "length", "cancelled"]
    prompt_tokens: int
    completion_tokens: int


def _base_schema_extra() -> Any:
    """The schema hook every wire request has (BaseRequest's own), which ours must keep applying."""
    return BaseRequest.model_config.get("json_schema_extra")


def _with_example(schema: dict[str, Any]) -> None:
    base = _base_schema_extra()
    if callable(base):
        base(schema)
    elif isinstance(base, dict):
        schema.update(base)
    # `example`, singular: BentoML writes OpenAPI 3.0 and keeps only the schema keys that version has.
    schema["example"] = example()


class TextGenerationRequest(BaseRequest[TextGenerationResponse]):
    response_model = TextGenerationResponse
    model_config = ConfigDict(json_schema_extra=_with_example)

    model_type: Literal["text_generation"] = "text_generation"
    prompt: str | None = Field(None, description="Plain text to continue. Give this or `messages`.")
    # A list, not `list | None`: BentoML's generated client cannot send null for a list field.
    messages: list[ChatMessage] = Field(
        default_factory=list, description="Chat turns, rendered with the model's chat template. Give this or `prompt`."
    )
    max_new_tokens: int = Field(64, ge=1, le=32768)
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(
        None, ge=0, lt=2**63, description="Sampling seed; the same seed gives the same text. Null: a random one."
    )
    stop: list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]] = Field(
        default_factory=list,
        max_length=MAX_STOP_STRINGS,
        description=f"Generation ends before the first of these strings (at most {MAX_STOP_STRINGS}, "
        f"each of 1 to {MAX_STOP_LENGTH} characters).",
    )

    @field_validator("messages", mode="before")
    @classmethod
    def _null_is_no_messages(cls, value: object, info: ValidationInfo) -> object:
        if value is None:
            return []
        # Sent empty with no prompt: say so, rather than "give exactly one" (it was given, empty).
        if value == [] and "prompt" in info.data and info.data["prompt"] is None:
            raise ValueError("is empty: give at least one chat turn, or give `prompt` instead")
        return value

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TextGenerationRequest:
        if (self.prompt is None) == (not self.messages):
            raise ValueError("give exactly one of `prompt` and `messages`")
        return self
