"""Speech to text with faster-whisper (Whisper on CTranslate2): batched, streamed, cancellable.

Each request's audio is decoded on its own (`sheaf.backends.audio`), so one bad clip is that
request's 422 and never its batch-mates' failure.

Two ways to run a batch, chosen by the `batched` option:

- batched (the default: measured faster, see `BATCHED_BY_DEFAULT`): every clip is cut into
  pieces of at most 30 s (its speech under `vad_filter`, else consecutive stretches cut at a
  pause), the pieces of all clips that share decoding settings go a few at a time through
  `BatchedInferencePipeline` on one shared timeline, and each segment is mapped back to its clip
  (the cutting, the timeline and the mapping back are in `sheaf.backends.segments`).
- sequential: each clip goes through `WhisperModel.transcribe` in turn (Whisper's own sliding
  30 s windows, each conditioned on the previous window's text).

Streams follow the same mode. Batched, streams share batches as predicts do (`stream_batch`):
each clip's segments go to its stream as each pipeline call decodes them, so a stream's
segments are its predict's. Sequential, each stream decodes on its own, window by window
(Whisper's own sliding windows are what yields segments as they decode).

Cancelling: CTranslate2 cannot stop a call once begun, so work stops at the next boundary: the next
30 s window when sequential (stream or predict), the next pipeline call (a few pieces) when batched.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import ctranslate2
from faster_whisper import BatchedInferencePipeline, WhisperModel

from sheaf.api.audio import Segment, TranscriptionRequest, TranscriptionResponse
from sheaf.api.events import ResultEvent, SegmentEvent, StreamEvent
from sheaf.backends.audio import SAMPLE_RATE, Audio, decode_request_audio
from sheaf.backends.base import (
    ADMITTED,
    Admitted,
    Arrivals,
    BatchBackend,
    Cancelled,
    Emit,
    EveryEvent,
    elapsed_ms,
    loaded,
)
from sheaf.backends.segments import Piece, cut_into_pieces, lay_out, renumbered, segments_by_piece, to_segment
from sheaf.config import DeploymentConfig
from sheaf.exceptions import InvalidRequest
from sheaf.options import WhisperOptions
from sheaf.weights import find_in_package, weights_location

logger = logging.getLogger("sheaf.backends.whisper")

# Pieces encoded and decoded together in one pipeline call. On the 2-core CPU 4 was fastest: 2 gave the
# decoder less to share, and at 8 the encoder's time per piece grew (0.22 s alone, 0.27 s in a batch of 8).
# 16 on a GPU is the batch size of faster-whisper's README example; it was not measured here.
PIECES_PER_CALL = {"cpu": 4, "cuda": 16}

BATCHED_BY_DEFAULT = True
"""Measured with the real tiny.en weights (int8, beam 5) on the 2-core CPU, batches of 3-4 s espeak
clips, 8 interleaved runs per figure, two sessions, median wall time: 4 clips 1.45 s batched vs
1.89 s sequential, 8 clips 2.8 s vs 3.75 s (about 23 % less time, 18 % less CPU). While other jobs
loaded the machine the gain shrank to about 10 %; with all 8 pieces in one call it was smaller."""


@dataclass
class _Clip:
    """A request whose audio decoded: 16 kHz mono float32."""

    request: TranscriptionRequest
    audio: Audio
    decode_ms: float

    @property
    def duration(self) -> float:
        return len(self.audio) / SAMPLE_RATE


@dataclass
class _Transcript:
    segments: list[Segment]
    language: str
    language_probability: float


class WhisperBackend(BatchBackend[TranscriptionRequest, TranscriptionResponse, _Clip]):
    options_model = WhisperOptions

    def __init__(self, config: DeploymentConfig) -> None:
        super().__init__(config)
        self._options: WhisperOptions = self.options()
        self._batched = BATCHED_BY_DEFAULT if self._options.batched is None else self._options.batched
        # Sequential decoding yields a clip's segments window by window, one clip at a time: its streams run alone.
        self.streams_alone = not self._batched
        self._model: WhisperModel | None = None
        self._pieces_per_call = PIECES_PER_CALL["cpu"]

    @property
    def batched(self) -> bool:
        """Whether a batch goes through one BatchedInferencePipeline call (else clip after clip)."""
        return self._batched

    @property
    def model(self) -> WhisperModel:
        return loaded(self._model)

    # -- loading -----------------------------------------------------------------------------

    def load(self) -> None:
        started = time.perf_counter()
        location = self._model_location()
        device = _device(self.config.device)
        options = self._options
        self._pieces_per_call = PIECES_PER_CALL[device]
        self._model = WhisperModel(
            location, device=device, compute_type=options.compute_type, cpu_threads=self.config.model_threads() or 0
        )
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

    def predict(self, clips: Sequence[_Clip], cancel: threading.Event) -> list[TranscriptionResponse | Exception]:
        started = time.perf_counter()
        try:
            if self._batched:
                results = self._transcribe_batched(clips, cancel)
            else:
                results = [self._transcribe_one(clip, cancel) for clip in clips]
        except Cancelled as exc:
            logger.info("predict batch of %d cancelled: %s", len(clips), exc)
            raise
        metadata = {"batch_size": len(clips), "inference_ms": elapsed_ms(started), "batched": self._batched}
        return [self._outcome(clip, result, metadata) for clip, result in zip(clips, results, strict=True)]

    def _outcome(
        self, clip: _Clip, result: _Transcript | Exception, metadata: dict[str, Any]
    ) -> TranscriptionResponse | Exception:
        if isinstance(result, Exception):
            return result
        return _response(clip, result, {**metadata, "decode_ms": clip.decode_ms})

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
        """Batched: the pieces of every clip in the batch through the pipeline a few at a time, as
        predicts go; each clip's segments go to its stream as each call decodes them, and its result
        once its last piece is decoded. Pieces of a clip whose stream has left are not decoded.
        Sequential: the default (one result each, from `predict_batch`)."""
        if not self._batched:
            super().stream_batch(requests, cancels, emit)
            return
        clips, where = self.prepare_streams(requests, emit)
        listening = [cancels[index] for index in where]

        def send(row: int, event: StreamEvent | Exception) -> None:
            if not listening[row].is_set():
                emit(where[row], event)

        started = time.perf_counter()
        try:
            languages, failures, groups = self._grouped(clips, EveryEvent(listening))
        except Cancelled:
            logger.info("stream batch of %d cancelled before decoding", len(clips))
            return
        for row, exc in failures.items():
            send(row, exc)
        for members in groups.values():
            run = _GroupStream(clips, members, languages, send, started)
            try:
                for decoded in self._decoded_calls(
                    run.language, clips[members[0]].request, run.pieces, lambda p: not listening[p.clip].is_set()
                ):
                    run.decoded(decoded)
            except Exception as exc:  # the model call failed for every clip of the group still open
                logger.exception("batched transcription failed for %d clips", len(members))
                run.fail(exc)
            for row, segments in run.unfinished().items():  # its client left before its last piece
                logger.info("stream %s cancelled after %d segments", clips[row].request.request_id, segments)

    def _stream_sequentially(
        self, request: TranscriptionRequest, cancel: threading.Event
    ) -> Iterator[StreamEvent | Admitted]:
        clip = self.prepare(request)
        language = self._language(request)
        yield ADMITTED  # the first window takes seconds to decode: say at once that it is accepted
        started = time.perf_counter()
        # Features and (when asked) language detection happen here, before the first segment.
        segments, info = self.model.transcribe(clip.audio, **_decoding_arguments(request, language))
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
        transcript = _Transcript(streamed, info.language, float(info.language_probability))
        yield ResultEvent(response=_response(clip, transcript, metadata))

    def prepare(self, request: TranscriptionRequest) -> _Clip:
        self._language(request)  # a bad language is refused before decoding any audio
        started = time.perf_counter()
        audio = decode_request_audio(request.audio_b64, self._options.max_audio_seconds)
        return _Clip(request, audio, elapsed_ms(started))

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

    def _transcribe_one(self, clip: _Clip, cancel: threading.Event) -> _Transcript | Exception:
        request = clip.request
        _stop_if(cancel, "before a clip")
        try:
            segments, info = self.model.transcribe(clip.audio, **_decoding_arguments(request, self._language(request)))
            decoded: list[Segment] = []
            for raw in segments:  # lazy: each 30 s window decodes when its first segment is pulled
                decoded.append(to_segment(raw))
                _stop_if(cancel, f"after {len(decoded)} segments of a clip")  # before pulling another window
            return _Transcript(decoded, info.language, float(info.language_probability))
        except Cancelled:
            raise
        except Exception as exc:  # this clip's failure alone
            logger.exception("transcription failed for request %s", request.request_id)
            return exc

    # -- batched -----------------------------------------------------------------------------

    def _transcribe_batched(self, clips: Sequence[_Clip], cancel: threading.Event) -> list[_Transcript | Exception]:
        """One pipeline call per group of clips that decode with the same settings."""
        languages, failures, groups = self._grouped(clips, cancel)
        segments: dict[int, list[Segment] | Exception] = dict(failures)
        for members in groups.values():
            try:
                language = languages[members[0]][0]
                segments.update(self._decode_group(language, [clips[i] for i in members], members, cancel))
            except Cancelled:
                raise
            except Exception as exc:  # the model call failed for every clip in it
                logger.exception("batched transcription failed for %d clips", len(members))
                segments.update(dict.fromkeys(members, exc))
        return [
            found if isinstance(found, Exception) else _Transcript(found, *languages[index])
            for index, found in sorted(segments.items())
        ]

    def _grouped(
        self, clips: Sequence[_Clip], cancel: threading.Event
    ) -> tuple[dict[int, tuple[str, float]], dict[int, Exception], dict[tuple[Any, ...], list[int]]]:
        """Each clip's language, the clips that failed to find one (their own failure), and the clips
        grouped by their decoding settings."""
        languages: dict[int, tuple[str, float]] = {}
        failures: dict[int, Exception] = {}
        groups: dict[tuple[Any, ...], list[int]] = {}
        for index, clip in enumerate(clips):
            _stop_if(cancel, "before language detection")
            try:
                languages[index] = self._resolved_language(clip)
            except Exception as exc:  # this clip's failure alone
                logger.exception("language detection failed for request %s", clip.request.request_id)
                failures[index] = exc
                continue
            groups.setdefault(_group_key(clip.request, languages[index][0]), []).append(index)
        return languages, failures, groups

    def _resolved_language(self, clip: _Clip) -> tuple[str, float]:
        """The request's language, or the one detected on this clip alone (the pipeline would detect one
        language for the whole batch)."""
        language = self._language(clip.request)
        if language is not None:
            return language, 1.0
        detected, probability, _ = self.model.detect_language(audio=clip.audio, vad_filter=clip.request.vad_filter)
        return detected, float(probability)

    def _decode_group(
        self, language: str, clips: Sequence[_Clip], indices: Sequence[int], cancel: threading.Event
    ) -> dict[int, list[Segment]]:
        """Every piece of these clips, a few at a time (memory stays bounded whatever the clips' length)."""
        found: dict[int, list[Segment]] = {index: [] for index in indices}
        for decoded in self._decoded_calls(language, clips[0].request, _pieces(clips, indices), cancel=cancel):
            for piece, segments in decoded:
                found[piece.clip].extend(segments)
        return {index: renumbered(segments) for index, segments in found.items()}

    def _decoded_calls(
        self,
        language: str,
        request: TranscriptionRequest,
        pieces: Sequence[Piece],
        wanted: Callable[[Piece], bool] = lambda _: True,
        cancel: threading.Event | None = None,
    ) -> Iterator[list[tuple[Piece, list[Segment]]]]:
        """The pieces (of clips that decode like `request`) a few per pipeline call, each call's
        segments as it returns; pieces no longer `wanted` when their call comes are left out."""
        remaining = list(pieces)
        done = 0
        while remaining := [piece for piece in remaining if wanted(piece)]:
            # A pipeline call cannot be stopped once begun (CTranslate2 decodes its pieces in one go): check between.
            if cancel is not None:
                _stop_if(cancel, f"after {done} of {len(pieces)} pieces")
            call, remaining = remaining[: self._pieces_per_call], remaining[self._pieces_per_call :]
            yield self._decode_pieces(language, request, call)
            done += len(call)

    def _decode_pieces(
        self, language: str, request: TranscriptionRequest, pieces: Sequence[Piece]
    ) -> list[tuple[Piece, list[Segment]]]:
        """One BatchedInferencePipeline call for these pieces; each piece's segments in its clip's time."""
        timeline = lay_out(pieces)
        pipeline = BatchedInferencePipeline(self.model)  # it keeps state between pieces: one per call
        raw_segments, _ = pipeline.transcribe(
            timeline,
            clip_timestamps=[{"start": p.offset, "end": p.offset + len(p.audio) / SAMPLE_RATE} for p in pieces],
            batch_size=len(pieces),
            without_timestamps=False,  # segments split as the sequential path splits them
            # vad_filter goes along unused: given clip_timestamps, the pipeline runs no VAD (`cut_into_pieces` did).
            **_decoding_arguments(request, language),
        )
        return segments_by_piece(raw_segments, pieces, self.model.frames_per_second)


class _GroupStream:
    """One group's streams while its pieces decode: each clip's segments numbered and sent as they
    come, its result once its last piece is decoded."""

    def __init__(
        self,
        clips: Sequence[_Clip],
        members: list[int],
        languages: dict[int, tuple[str, float]],
        send: Callable[[int, StreamEvent | Exception], None],
        started: float,
    ) -> None:
        self.language = languages[members[0]][0]
        self.pieces = _pieces([clips[row] for row in members], members)
        self._clips = clips
        self._languages = languages
        self._send = send
        self._started = started
        self._found: dict[int, list[Segment]] = {row: [] for row in members}
        self._left = {row: sum(piece.clip == row for piece in self.pieces) for row in members}
        for row in members:
            if self._left[row] == 0:  # nothing to decode (silence under VAD): its result at once
                self._finish(row)

    def unfinished(self) -> dict[int, int]:
        """The rows with pieces never decoded (their streams left), with the segments each was sent."""
        return {row: len(self._found[row]) for row, left in self._left.items() if left}

    def decoded(self, decoded: list[tuple[Piece, list[Segment]]]) -> None:
        for piece, segments in decoded:
            found = self._found[piece.clip]
            for segment in segments:
                found.append(segment.model_copy(update={"id": len(found) + 1}))  # as `renumbered` numbers them
                self._send(piece.clip, SegmentEvent(segment=found[-1]))
            self._left[piece.clip] -= 1
            if self._left[piece.clip] == 0:
                self._finish(piece.clip)

    def fail(self, exc: Exception) -> None:
        for row, left in self._left.items():
            if left:
                self._left[row] = 0
                self._send(row, exc)

    def _finish(self, row: int) -> None:
        clip = self._clips[row]
        metadata = {
            "batch_size": len(self._clips),
            "inference_ms": elapsed_ms(self._started),
            "batched": True,
            "decode_ms": clip.decode_ms,
        }
        transcript = _Transcript(self._found[row], *self._languages[row])
        self._send(row, ResultEvent(response=_response(clip, transcript, metadata)))


# -- helpers ----------------------------------------------------------------------------------


def _response(clip: _Clip, transcript: _Transcript, metadata: dict[str, Any]) -> TranscriptionResponse:
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


def _pieces(clips: Sequence[_Clip], indices: Sequence[int]) -> list[Piece]:
    """The clips cut into pieces for the pipeline, each marked with its index."""
    return [
        piece
        for clip, index in zip(clips, indices, strict=True)
        for piece in cut_into_pieces(clip.audio, clip.request.vad_filter, index)
    ]


def _decoding_arguments(request: TranscriptionRequest, language: str | None) -> dict[str, Any]:
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


def _group_key(request: TranscriptionRequest, language: str) -> tuple[Any, ...]:
    # vad_filter is not in it: it only decides how a clip is cut into pieces.
    return (
        language,
        request.task,
        request.beam_size,
        request.temperature,
        request.initial_prompt,
        request.word_timestamps,
    )


def _stop_if(cancel: threading.Event, where: str) -> None:
    """Raise Cancelled once `cancel` is set; called where decoding can stop (between windows or pipeline calls)."""
    if cancel.is_set():
        raise Cancelled(f"transcription stopped {where}")


def _device(setting: Literal["cpu", "cuda", "auto"]) -> Literal["cpu", "cuda"]:
    if setting == "auto":
        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    return setting
