"""What both of whisper's ways to decode share: a request's decoded clip, its transcript, the
response made of them, and the request's decoding settings as faster-whisper's arguments."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from sheaf.api.audio import Segment, TranscriptionRequest, TranscriptionResponse
from sheaf.backends.audio import SAMPLE_RATE, Audio
from sheaf.backends.base import Cancelled


@dataclass
class Clip:
    """A request whose audio decoded: 16 kHz mono float32."""

    request: TranscriptionRequest
    audio: Audio
    decode_ms: float

    @property
    def duration(self) -> float:
        return len(self.audio) / SAMPLE_RATE


@dataclass
class Transcript:
    segments: list[Segment]
    language: str
    language_probability: float


def response(clip: Clip, transcript: Transcript, metadata: dict[str, Any]) -> TranscriptionResponse:
    request = clip.request
    return TranscriptionResponse(
        request_id=request.request_id,
        model_name=request.model_name,
        text="".join(segment.text for segment in transcript.segments).strip(),
        language=transcript.language,
        language_probability=transcript.language_probability,
        duration=clip.duration,
        segments=transcript.segments,
        metadata=metadata,
    )


def decoding_arguments(request: TranscriptionRequest, language: str | None) -> dict[str, Any]:
    """Every request field that shapes decoding, as faster-whisper's transcribe arguments."""
    return {
        "language": language,
        "task": request.task,
        "beam_size": request.beam_size,
        "temperature": request.temperature,  # one temperature: no fallback to others behind the caller's back
        "initial_prompt": request.initial_prompt,
        "word_timestamps": request.word_timestamps,
        "vad_filter": request.vad_filter,
    }


def stop_if(cancel: threading.Event, where: str) -> None:
    """Raise Cancelled once `cancel` is set; called where decoding can stop (between windows or pipeline calls)."""
    if cancel.is_set():
        raise Cancelled(f"transcription stopped {where}")
