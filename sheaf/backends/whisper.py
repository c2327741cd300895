"""Speech to text with faster-whisper (Whisper on CTranslate2): batched, streamed, cancellable.

Each request's audio is decoded on its own (`sheaf.backends.audio`), so one bad clip is that
request's 422 and never its batch-mates' failure.

Two ways to run a batch, chosen by the `batched` option:

- batched (the default: measured faster, see `BATCHED_BY_DEFAULT`): the pieces of all clips go a
  few at a time through faster-whisper's batched pipeline (`sheaf.backends.whisper_batched`).
- sequential: each clip goes through `WhisperModel.transcribe` in turn (Whisper's own sliding
  30 s windows, each conditioned on the previous window's text).

Streams follow the same mode. Batched, streams share batches as predicts do (`stream_batch`),
and a stream's segments are its predict's. Sequential, each stream decodes on its own, window by
window (Whisper's own sliding windows are what yields segments as they decode).

Cancelling: CTranslate2 cannot stop a call once begun, so work stops at the next boundary: the next
30 s window when sequential (stream or predict), the next pipeline call (a few pieces) when batched.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import ctranslate2
from faster_whisper import WhisperModel

from sheaf.api.audio import Segment, TranscriptionRequest, TranscriptionResponse
from sheaf.api.events import ResultEvent, SegmentEvent, StreamEvent
from sheaf.backends.audio import decode_request_audio
from sheaf.backends.base import ADMITTED, Admitted, Arrivals, BatchBackend, Cancelled, Emit, elapsed_ms, loaded
from sheaf.backends.segments import to_segment
from sheaf.backends.transcripts import Clip, Transcript, decoding_arguments, response, stop_if
from sheaf.backends.whisper_batched import PIECES_PER_CALL, BatchedTranscriber
from sheaf.config import DeploymentConfig
from sheaf.exceptions import InvalidRequest
from sheaf.options import WhisperOptions
from sheaf.weights import find_in_package, weights_location

logger = logging.getLogger("sheaf.backends.whisper")

BATCHED_BY_DEFAULT = True
"""Measured with the real tiny.en weights (int8, beam 5) on the 2-core CPU, batches of 3-4 s espeak
clips, 8 interleaved runs per figure, two sessions, median wall time: 4 clips 1.45 s batched vs
1.89 s sequential, 8 clips 2.8 s vs 3.75 s (about 23 % less time, 18 % less CPU). While other jobs
loaded the machine the gain shrank to about 10 %; with all 8 pieces in one call it was smaller."""


class WhisperBackend(BatchBackend[TranscriptionRequest, TranscriptionResponse, Clip]):
    options_model = WhisperOptions

    def __init__(self, config: DeploymentConfig) -> None:
        super().__init__(config)
        self._options: WhisperOptions = self.options()
        self._batched = BATCHED_BY_DEFAULT if self._options.batched is None else self._options.batched
        # Sequential decoding yields a clip's segments window by window, one clip at a time: its streams run alone.
        self.streams_alone = not self._batched
        self._model: WhisperModel | None = None
        self._transcriber: BatchedTranscriber | None = None

    @property
    def batched(self) -> bool:
        """Whether a batch goes through one BatchedInferencePipeline call (else clip after clip)."""
        return self._batched

    @property
    def model(self) -> WhisperModel:
        return loaded(self._model)

    @property
    def transcriber(self) -> BatchedTranscriber:
        """The batched way to decode, on the loaded model."""
        return loaded(self._transcriber)

    # -- loading -----------------------------------------------------------------------------

    def load(self) -> None:
        started = time.perf_counter()
        location = self._model_location()
        device = _device(self.config.device)
        options = self._options
        self._model = WhisperModel(
            location, device=device, compute_type=options.compute_type, cpu_threads=self.config.model_threads() or 0
        )
        self._transcriber = BatchedTranscriber(self._model, PIECES_PER_CALL[device], self._language)
        kind = "multilingual" if self._model.model.is_multilingual else "English-only"
        logger.info(
            "loaded %s (%s) from %s on %s (%s, %s) in %.1f s",
            self.config.name,
            kind,
            location,
            device,
            options.compute_type,
            "batched" if self._batched else "sequential",
            time.perf_counter() - started,
        )

    def _model_location(self) -> str:
        """A CTranslate2 model folder, or a hub id that faster-whisper downloads (or finds in its cache)."""
        source = self.config.model
        if (location := weights_location(source)) is not None:
            return location
        assert source.package is not None  # a ModelSource names exactly one source
        found = find_in_package(source.package, source.file or "model")
        if not (found / "model.bin").is_file():
            raise ValueError(f"{found}: not a CTranslate2 model folder (no model.bin) in package {source.package}")
        return str(found)

    # -- requests ----------------------------------------------------------------------------

    def predict(self, clips: Sequence[Clip], cancel: threading.Event) -> list[TranscriptionResponse | Exception]:
        started = time.perf_counter()
        try:
            if self._batched:
                results = self.transcriber.transcribe(clips, cancel)
            else:
                results = [self._transcribe_one(clip, cancel) for clip in clips]
        except Cancelled as exc:
            logger.info("predict batch of %d cancelled: %s", len(clips), exc)
            raise
        metadata = {"batch_size": len(clips), "inference_ms": elapsed_ms(started), "batched": self._batched}
        return [self._outcome(clip, result, metadata) for clip, result in zip(clips, results, strict=True)]

    def _outcome(
        self, clip: Clip, result: Transcript | Exception, metadata: dict[str, Any]
    ) -> TranscriptionResponse | Exception:
        if isinstance(result, Exception):
            return result
        return response(clip, result, {**metadata, "decode_ms": clip.decode_ms})

    def stream(self, request: TranscriptionRequest, cancel: threading.Event) -> Iterator[StreamEvent | Admitted]:
        """Batched: `stream_batch` for this clip alone; sequential: each 30 s window's segments as it decodes."""
        if self._batched:
            return super().stream(request, cancel)
        return self._stream_sequentially(request, cancel)

    def stream_batch(
        self,
        requests: Sequence[TranscriptionRequest],
        cancels: Sequence[threading.Event],
        emit: Emit,
        arrivals: Arrivals | None = None,  # never given: whisper does not join running calls
        streaming: Sequence[bool] | None = None,  # a predict's segments are cheap: every clip gets them
    ) -> None:
        """Batched: every clip of the batch through the batched pipeline, as predicts go, each clip's
        segments to its stream as they decode (`BatchedTranscriber.stream`). Sequential: the default
        (one result each, from `predict_batch`)."""
        if not self._batched:
            super().stream_batch(requests, cancels, emit)
            return
        clips, where = self.prepare_streams(requests, emit)
        listening = [cancels[index] for index in where]

        def send(row: int, event: StreamEvent | Exception) -> None:
            if not listening[row].is_set():
                emit(where[row], event)

        self.transcriber.stream(clips, listening, send)

    def _stream_sequentially(
        self, request: TranscriptionRequest, cancel: threading.Event
    ) -> Iterator[StreamEvent | Admitted]:
        clip = self.prepare(request)
        language = self._language(request)
        yield ADMITTED  # the first window takes seconds to decode: say at once that it is accepted
        started = time.perf_counter()
        # Features and (when asked) language detection happen here, before the first segment.
        segments, info = self.model.transcribe(clip.audio, **decoding_arguments(request, language))
        pending = iter(segments)  # lazy: each window decodes when the next segment is pulled
        streamed: list[Segment] = []
        cancelled = False
        try:
            while True:
                if cancel.is_set():  # checked before pulling: a cancelled stream decodes no further window
                    cancelled = True
                    break
                raw = next(pending, None)
                if raw is None:
                    break
                segment = to_segment(raw)
                streamed.append(segment)
                yield SegmentEvent(segment=segment)
        except GeneratorExit:  # the consumer closed us early
            cancelled = True
            raise
        finally:
            close = getattr(pending, "close", None)  # ends faster-whisper's generator in this thread
            if close is not None:
                close()
            if cancelled:
                logger.info("stream %s cancelled after %d segments", request.request_id, len(streamed))
        if cancelled:
            return
        metadata = {
            "batch_size": 1,
            "inference_ms": elapsed_ms(started),
            "batched": False,
            "decode_ms": clip.decode_ms,
        }
        transcript = Transcript(streamed, info.language, float(info.language_probability))
        yield ResultEvent(response=response(clip, transcript, metadata))

    def prepare(self, request: TranscriptionRequest) -> Clip:
        self._language(request)  # a bad language is refused before decoding any audio
        started = time.perf_counter()
        audio = decode_request_audio(request.audio_b64, self._options.max_audio_seconds)
        return Clip(request, audio, elapsed_ms(started))

    def _language(self, request: TranscriptionRequest) -> str | None:
        """The language to decode in (None: detect it); InvalidRequest when this model cannot take the request."""
        language = (request.language or "").strip().lower() or None  # a blank code asks for detection too
        if self.model.model.is_multilingual:
            if language is not None and language not in self.model.supported_languages:
                raise InvalidRequest("language", f"unknown language code {request.language!r}")
            return language
        # An English-only model has no language or task tokens: it cannot honour anything else.
        if language not in (None, "en"):
            raise InvalidRequest("language", f"this deployment's model is English-only; got {request.language!r}")
        if request.task == "translate":
            raise InvalidRequest("task", "this deployment's model is English-only and cannot translate")
        return "en"

    def _transcribe_one(self, clip: Clip, cancel: threading.Event) -> Transcript | Exception:
        request = clip.request
        stop_if(cancel, "before a clip")
        try:
            segments, info = self.model.transcribe(clip.audio, **decoding_arguments(request, self._language(request)))
            decoded: list[Segment] = []
            for raw in segments:  # lazy: each 30 s window decodes when its first segment is pulled
                decoded.append(to_segment(raw))
                stop_if(cancel, f"after {len(decoded)} segments of a clip")  # before pulling another window
            return Transcript(decoded, info.language, float(info.language_probability))
        except Cancelled:
            raise
        except Exception as exc:  # this clip's failure alone
            logger.exception("transcription failed for request %s", request.request_id)
            return exc


# -- helpers ----------------------------------------------------------------------------------


def _device(setting: Literal["cpu", "cuda", "auto"]) -> Literal["cpu", "cuda"]:
    if setting == "auto":
        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    return setting
