"""The `text_generation` contract."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from sheaf.api.base import BaseRequest, BaseResponse


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class TextGenerationResponse(BaseResponse):
    model_type: Literal["text_generation"] = "text_generation"
    text: str
    finish_reason: Literal["stop", "length", "cancelled"]
    prompt_tokens: int
    completion_tokens: int


class TextGenerationRequest(BaseRequest[TextGenerationResponse]):
    response_model = TextGenerationResponse

    model_type: Literal["text_generation"] = "text_generation"
    prompt: str | None = Field(None, description="Plain text to continue. Give this or `messages`.")
    # A list, not `list | None`: BentoML's generated client cannot send null for a list field.
    messages: list[ChatMessage] = Field(
        default_factory=list, description="Chat turns, rendered with the model's chat template. Give this or `prompt`."
    )
    max_new_tokens: int = Field(64, ge=1, le=32768)
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, description="Sampling seed; the same seed gives the same text.")
    stop: list[str] = Field(default_factory=list, description="Generation ends before the first of these strings.")

    @field_validator("messages", mode="before")
    @classmethod
    def _null_is_no_messages(cls, value: object) -> object:
        return [] if value is None else value

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TextGenerationRequest:
        if (self.prompt is None) == (not self.messages):
            raise ValueError("give exactly one of `prompt` and `messages`")
        if any(s == "" for s in self.stop):
            raise ValueError("`stop` strings must not be empty")
        return self
