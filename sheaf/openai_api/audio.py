"""`/v1/audio/transcriptions` and `/v1/audio/translations` on a whisper deployment: OpenAI's
multipart form as sheaf's `TranscriptionRequest`, and sheaf's answer in each `response_format`
(`json`, `text`, `srt`, `vtt`, `verbose_json`) or as OpenAI's `transcript.text.*` stream events."""

from __future__ import annotations

import base64
import zlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.datastructures import FormData, UploadFile

from sheaf.api import TranscriptionRequest
from sheaf.openai_api.errors import bad_parameter, parsed

RENAMES = {
    "initial_prompt": "prompt",
    "audio_b64": "file",
    "task": "model",
    "word_timestamps": "timestamp_granularities",
}
"""sheaf's field names in errors, as the OpenAI parameters they came from (a deployment that cannot
translate names `task`: the model is the parameter to change)."""

ResponseFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]


class AudioForm(BaseModel):
    """The form's fields besides `file`; lists come as `name[]`, as the `openai` package sends them."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    model: str
    language: str | None = None
    prompt: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=1.0)
    response_format: ResponseFormat = "json"
    timestamp_granularities: list[Literal["word", "segment"]] = Field(
        default_factory=list, alias="timestamp_granularities[]"
    )
    stream: bool = False

    @model_validator(mode="after")
    def _stream_is_text(self) -> AudioForm:
        if self.stream and self.response_format not in ("json", "text"):
            raise ValueError("`stream` sends text events: `response_format` must be `json` or `text` with it")
        return self

    @classmethod
    def parse(cls, form: FormData) -> AudioForm:
        fields: dict[str, Any] = {key: value for key, value in form.items() if isinstance(value, str)}
        for name in ("timestamp_granularities[]", "timestamp_granularities"):
            if name in form:
                fields["timestamp_granularities[]"] = form.getlist(name)
        return parsed(cls, fields, {"timestamp_granularities[]": "timestamp_granularities"})

    @property
    def words(self) -> bool:
        return "word" in self.timestamp_granularities


async def to_sheaf(form: FormData, fields: AudioForm, task: str, request_id: str) -> TranscriptionRequest:
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise bad_parameter("file", "is required: the audio file, as a multipart file part")
    audio = await upload.read()
    if not audio:
        raise bad_parameter("file", "is empty")
    sheaf_fields: dict[str, Any] = {
        "request_id": request_id,
        "audio_b64": base64.b64encode(audio).decode(),
        "task": task,
        "language": fields.language if task == "transcribe" else None,
        "initial_prompt": fields.prompt,
        "temperature": fields.temperature or 0.0,
        "word_timestamps": fields.words,
    }
    return parsed(TranscriptionRequest, sheaf_fields, RENAMES)


def formatted(answer: dict[str, Any], fields: AudioForm, task: str) -> tuple[str | dict[str, Any], str]:
    """sheaf's `TranscriptionResponse` in the asked `response_format`, and its media type."""
    usage = {"type": "duration", "seconds": answer["duration"]}
    segments = answer["segments"]
    match fields.response_format:
        case "json":
            return {"text": answer["text"], "usage": usage}, "application/json"
        case "text":
            return answer["text"] + "\n", "text/plain"
        case "srt":
            return _srt(segments), "text/plain"
        case "vtt":
            return _vtt(segments), "text/vtt"
    verbose: dict[str, Any] = {
        "task": task,
        "language": answer["language"],
        "duration": answer["duration"],
        "text": answer["text"],
        "usage": usage,
    }
    if not fields.timestamp_granularities or "segment" in fields.timestamp_granularities:
        verbose["segments"] = [_verbose_segment(segment, fields.temperature or 0.0) for segment in segments]
    if fields.words:
        verbose["words"] = [
            {"word": word["word"], "start": word["start"], "end": word["end"]}
            for segment in segments
            for word in segment.get("words") or ()
        ]
    return verbose, "application/json"


def _verbose_segment(segment: dict[str, Any], temperature: float) -> dict[str, Any]:
    """OpenAI's segment. `seek` is the start in 10 ms frames; the token ids are not kept (`[]`)."""
    text = segment["text"].encode()
    ratio = len(text) / len(zlib.compress(text)) if text else 0.0
    return {
        "id": segment["id"],
        "seek": round(segment["start"] * 100),
        "start": segment["start"],
        "end": segment["end"],
        "text": segment["text"],
        "tokens": [],
        "temperature": temperature,
        "avg_logprob": segment["avg_logprob"],
        "compression_ratio": ratio,
        "no_speech_prob": segment["no_speech_prob"],
    }


def _timestamp(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _srt(segments: list[dict[str, Any]]) -> str:
    cues = [
        f"{i}\n{_timestamp(s['start'], ',')} --> {_timestamp(s['end'], ',')}\n{s['text'].strip()}\n"
        for i, s in enumerate(segments, start=1)
    ]
    return "\n".join(cues)


def _vtt(segments: list[dict[str, Any]]) -> str:
    cues = [f"{_timestamp(s['start'], '.')} --> {_timestamp(s['end'], '.')}\n{s['text'].strip()}\n" for s in segments]
    return "\n".join(["WEBVTT\n", *cues])


def delta_event(segment: dict[str, Any]) -> dict[str, Any]:
    """A decoded segment as OpenAI's `transcript.text.delta`."""
    return {"type": "transcript.text.delta", "delta": segment["text"]}


def done_event(answer: dict[str, Any]) -> dict[str, Any]:
    """sheaf's `result` as OpenAI's `transcript.text.done`."""
    return {"type": "transcript.text.done", "text": answer["text"]}
