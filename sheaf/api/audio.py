"""The `audio` contract: transcription and translation of an encoded audio file."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sheaf.api.base import BaseRequest, BaseResponse, WireModel

AUDIO_CONTAINERS = {
    "wav": "WAV",
    "flac": "FLAC",
    "mp3": "MP3",
    "ogg": "Ogg (Vorbis, Opus, FLAC)",
    "mov": "M4A/MP4",
    "matroska": "WebM/Matroska",
    "aac": "AAC (ADTS)",
    "aiff": "AIFF",
}
"""The containers `audio_b64` may be in: FFmpeg's demuxer names, with what people call them."""


class Word(WireModel):
    word: str
    start: float
    end: float
    probability: float


class Segment(WireModel):
    id: int
    start: float = Field(description="Seconds from the start of the audio.")
    end: float
    text: str
    avg_logprob: float
    no_speech_prob: float
    words: list[Word] | None = Field(None, description="Null unless `word_timestamps` was asked for.")


class TranscriptionResponse(BaseResponse):
    model_type: Literal["audio"] = "audio"
    text: str
    language: str
    language_probability: float
    duration: float = Field(description="Length of the audio in seconds.")
    segments: list[Segment]


class TranscriptionRequest(BaseRequest[TranscriptionResponse]):
    response_model = TranscriptionResponse

    model_type: Literal["audio"] = "audio"
    audio_b64: str = Field(description=f"An encoded audio file, base64: {', '.join(AUDIO_CONTAINERS.values())}.")
    language: str | None = Field(None, description="Language code such as `en`; null detects it.")
    task: Literal["transcribe", "translate"] = "transcribe"
    word_timestamps: bool = False
    temperature: float = Field(0.0, ge=0.0, le=1.0)
    initial_prompt: str | None = Field(None, description="Text that primes the first window (names, spelling).")
    vad_filter: bool = Field(False, description="Skip stretches without speech.")
    beam_size: int = Field(5, ge=1, le=16)
