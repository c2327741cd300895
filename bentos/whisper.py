"""Transcription: faster-whisper, segments streamed as they decode."""

from sheaf.api import TranscriptionRequest
from sheaf.options import WhisperOptions
from sheaf.service import deployment_service

Whisper = deployment_service(
    "whisper",  # configs/whisper.yaml
    request_model=TranscriptionRequest,
    backend="sheaf.backends.whisper:WhisperBackend",
    options=WhisperOptions,
)
