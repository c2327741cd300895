"""`/v1/chat/completions` and `/v1/completions` on a text generation deployment: OpenAI's request
as sheaf's `TextGenerationRequest`, sheaf's answer and stream events as OpenAI's objects and chunks
(the shapes of the `openai` package's `ChatCompletion`, `ChatCompletionChunk` and `Completion`)."""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sheaf.api import TextGenerationRequest
from sheaf.openai_api.errors import bad_parameter, parsed

RENAMES = {"max_new_tokens": "max_tokens"}
"""sheaf's field names in errors, as the OpenAI parameters they came from."""


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def as_sheaf(self) -> dict[str, str]:
        """sheaf's chat turn: `developer` is a system turn, and the text parts joined."""
        parts = self.content if isinstance(self.content, list) else [ContentPart(type="text", text=self.content or "")]
        if any(part.type != "text" for part in parts):
            raise ValueError("only text content parts are supported")
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": "".join(part.text or "" for part in parts)}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool | None = False


class _Generation(BaseModel):
    """The parameters both routes take. Null is the parameter's default, as OpenAI reads it."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @classmethod
    def parse(cls, body: Any) -> Self:
        return parsed(cls, body)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n not in (None, 1):
            raise ValueError("only n=1 is supported: send one request per choice (they are batched)")
        return n

    def sheaf_fields(self) -> dict[str, Any]:
        # OpenAI samples at temperature 1 unless told otherwise; 0 is greedy, as in sheaf.
        fields: dict[str, Any] = {
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "seed": self.seed,
            "stop": [self.stop] if isinstance(self.stop, str) else (self.stop or []),
        }
        if self.max_tokens is not None:
            fields["max_new_tokens"] = self.max_tokens
        return fields

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = None
    logprobs: bool | None = None
    response_format: dict[str, Any] | None = None

    def to_sheaf(self, request_id: str) -> TextGenerationRequest:
        if self.tools:
            raise bad_parameter("tools", "tool calls are not supported by this server")
        if self.logprobs:
            raise bad_parameter("logprobs", "log probabilities are not supported by this server")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise bad_parameter("response_format", "only `text` is supported")
        messages = []
        for i, message in enumerate(self.messages):
            try:
                messages.append(message.as_sheaf())
            except ValueError as exc:
                raise bad_parameter(f"messages[{i}].content", str(exc)) from None
        fields = self.sheaf_fields()
        if self.max_completion_tokens is not None:  # the newer name wins
            fields["max_new_tokens"] = self.max_completion_tokens
        return _sheaf_request({**fields, "messages": messages, "request_id": request_id})


class CompletionRequest(_Generation):
    prompt: str | list[str]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    def to_sheaf(self, request_id: str) -> TextGenerationRequest:
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise bad_parameter("prompt", "give one prompt per request (requests sent together are batched)")
            prompt = prompt[0]
        for param, unsupported in (("echo", self.echo), ("suffix", self.suffix), ("logprobs", self.logprobs)):
            if unsupported:
                raise bad_parameter(param, "is not supported by this server")
        if self.best_of not in (None, 1):
            raise bad_parameter("best_of", "only best_of=1 is supported")
        return _sheaf_request({**self.sheaf_fields(), "prompt": prompt, "request_id": request_id})


def _sheaf_request(fields: dict[str, Any]) -> TextGenerationRequest:
    return parsed(TextGenerationRequest, fields, RENAMES)


def _usage(answer: dict[str, Any]) -> dict[str, int]:
    prompt, completion = answer["prompt_tokens"], answer["completion_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish_reason(answer: dict[str, Any]) -> str:
    return "length" if answer["finish_reason"] == "length" else "stop"


class Replies:
    """One request's OpenAI objects: the whole answer, or its stream's chunks, for `chat`
    (`chat.completion`) or plain completions (`text_completion`)."""

    def __init__(self, chat: bool, completion_id: str, model: str, created: int, include_usage: bool = False) -> None:
        self.chat = chat
        self.head = {"id": completion_id, "created": created, "model": model}
        self.include_usage = include_usage
        """A stream asked for usage: every chunk has `usage` (null), and a last one holds it."""

    def whole(self, answer: dict[str, Any]) -> dict[str, Any]:
        """The answer to a request without `stream`, from sheaf's `TextGenerationResponse`."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": _finish_reason(answer), "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": answer["text"], "refusal": None}
        else:
            choice["text"] = answer["text"]
        kind = "chat.completion" if self.chat else "text_completion"
        extension = {"request_id": answer["request_id"], **answer.get("metadata", {})}
        return {**self.head, "object": kind, "choices": [choice], "usage": _usage(answer), "sheaf": extension}

    def chunk(self, text: str | None, finish_reason: str | None = None, *, role: bool = False) -> dict[str, Any]:
        """A stream chunk with `text` (None: none), and the reason it ended on the last one."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            choice["delta"] = {**delta, **({"content": text} if text is not None else {})}
        else:
            choice["text"] = text or ""
        return {**self.head, "object": self._chunk_kind, "choices": [choice], **self._null_usage}

    @property
    def _chunk_kind(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    @property
    def _null_usage(self) -> dict[str, None]:
        return {"usage": None} if self.include_usage else {}

    def first(self) -> dict[str, Any] | None:
        """The chunk before any text: a chat stream says its role first."""
        return self.chunk("", role=True) if self.chat else None

    def last(self, answer: dict[str, Any]) -> list[dict[str, Any]]:
        """The chunks from sheaf's `result` event: the finish reason, then the usage when asked."""
        chunks = [self.chunk(None, _finish_reason(answer))]
        if self.include_usage:
            chunks.append({**self.head, "object": self._chunk_kind, "choices": [], "usage": _usage(answer)})
        return chunks
