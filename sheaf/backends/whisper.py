"""Speech to text with faster-whisper (Whisper on CTranslate2): batched, streamed, cancellable.

Each request's audio is decoded on its own (PyAV, in memory), so one bad clip is that request's
422 and never its batch-mates' failure. Only the containers in `AUDIO_CONTAINERS` are
opened, and a clip's length is counted from its packets before any of it is decoded, so a clip
over the deployment's limit costs a moment of demuxing, not the decoding of minutes of audio.

Two ways to run a batch, chosen by the `batched` option:

- batched (the default: measured faster, see `BATCHED_BY_DEFAULT`): every clip is cut into
  pieces of at most 30 s (its speech under `vad_filter`, else consecutive stretches cut at a
  pause), the pieces of all clips that share decoding settings go a few at a time through
  `BatchedInferencePipeline` on one shared timeline, and each segment is mapped back to its clip.
- sequential: each clip goes through `WhisperModel.transcribe` in turn (Whisper's own sliding
  30 s windows, each conditioned on the previous window's text).

`stream` always decodes sequentially, since that is what yields segments window by window; so a
clip's streamed segments can differ a little from its predicted ones under the batched default.

Cancelling: CTranslate2 cannot stop a call once begun, so work stops at the next boundary: the next
30 s window when sequential (stream or predict), the next pipeline call (a few pieces) when batched.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import av
import ctranslate2
import numpy as np
import numpy.typing as npt
from av.container import InputContainer
from faster_whisper import BatchedInferencePipeline, WhisperModel
from faster_whisper import transcribe as fw
from faster_whisper.vad import VadOptions, get_speech_timestamps

from sheaf.api.audio import AUDIO_CONTAINERS, Segment, TranscriptionRequest, TranscriptionResponse, Word
from sheaf.api.events import ResultEvent, SegmentEvent, StreamEvent
from sheaf.backends.base import ADMITTED, Admitted, Backend, Cancelled, elapsed_ms
from sheaf.config import DeploymentConfig, find_in_package, weights_location
from sheaf.exceptions import InvalidRequest
from sheaf.options import WhisperOptions

logger = logging.getLogger("sheaf.backends.whisper")

Audio = npt.NDArray[np.float32]

SAMPLE_RATE = 16_000  # what every Whisper model takes
PIECE_SECONDS = 30  # Whisper's window: the batched pipeline decodes one window per piece
# Pieces encoded and decoded together in one pipeline call. On the 2-core CPU 4 was fastest: 2 gave the
# decoder less to share, and at 8 the encoder's time per piece grew (0.22 s alone, 0.27 s in a batch of 8).
# 16 on a GPU is the batch size of faster-whisper's README example; it was not measured here.
PIECES_PER_CALL = {"cpu": 4, "cuda": 16}
# WhisperModel.transcribe's defaults for skipping a silent window.
NO_SPEECH_THRESHOLD, LOG_PROB_THRESHOLD = 0.6, -1.0
CUT_SEARCH_SECONDS = 5  # how far before the 30 s limit a clip's cut may move to find a pause

# Only these demuxers open a request's audio. The rest stay closed: image, subtitle and raw formats, and
# playlists (HLS, concat) that would open the files or addresses they list.
_NOT_AUDIO = f"is not a decodable audio file; accepted: {', '.join(AUDIO_CONTAINERS.values())}"

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


@dataclass
class _Piece:
    """At most 30 s of one clip for the batched pipeline: its audio (speech only, under VAD)
    and the stretches of the clip it came from, in samples, to map its times back."""

    clip: int
    audio: Audio
    regions: list[dict[str, int]]
    offset: int = 0  # whole seconds into the shared timeline; set when laid out


class WhisperBackend(Backend[TranscriptionRequest, TranscriptionResponse]):
    request_model = TranscriptionRequest
    options_model = WhisperOptions

    def __init__(self, config: DeploymentConfig) -> None:
        super().__init__(config)
        self._options: WhisperOptions = self.options()
        self._batched = BATCHED_BY_DEFAULT if self._options.batched is None else self._options.batched
        self._model: WhisperModel | None = None
        self._pieces_per_call = PIECES_PER_CALL["cpu"]

    @property
    def batched(self) -> bool:
        """Whether a batch goes through one BatchedInferencePipeline call (else clip after clip)."""
        return self._batched

    @property
    def model(self) -> WhisperModel:
        if self._model is None:
            raise RuntimeError("the model is not loaded: call load() first")
        return self._model

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

    def predict_batch(
        self, requests: Sequence[TranscriptionRequest], cancel: threading.Event | None = None
    ) -> list[TranscriptionResponse | Exception]:
        cancel = cancel or threading.Event()  # none given: never set
        prepared = [self._prepare(request) for request in requests]
        clips = [item for item in prepared if isinstance(item, _Clip)]
        started = time.perf_counter()
        try:
            if not clips:
                results: list[_Transcript | Exception] = []
            elif self._batched:
                results = self._transcribe_batched(clips, cancel)
            else:
                results = [self._transcribe_one(clip, cancel) for clip in clips]
        except Cancelled as exc:
            logger.info("predict batch of %d cancelled: %s", len(clips), exc)
            raise
        metadata = {"batch_size": len(clips), "inference_ms": elapsed_ms(started), "batched": self._batched}
        outcomes = iter(results)
        return [
            item if isinstance(item, Exception) else self._outcome(item, next(outcomes), metadata) for item in prepared
        ]

    def _outcome(
        self, clip: _Clip, result: _Transcript | Exception, metadata: dict[str, Any]
    ) -> TranscriptionResponse | Exception:
        if isinstance(result, Exception):
            return result
        return self._response(clip, result, {**metadata, "decode_ms": clip.decode_ms})

    def stream(self, request: TranscriptionRequest, cancel: threading.Event) -> Iterator[StreamEvent | Admitted]:
        clip = self._prepare(request)
        if isinstance(clip, Exception):
            raise clip
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
                segment = _segment(raw)
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
        yield ResultEvent(response=self._response(clip, transcript, metadata))

    def _prepare(self, request: TranscriptionRequest) -> _Clip | Exception:
        try:
            self._language(request)  # a bad language is refused before decoding any audio
            started = time.perf_counter()
            audio = decode_request_audio(request.audio_b64, self._options.max_audio_seconds)
        except Exception as exc:  # InvalidRequest, or whatever else this one request hit: it stays its own outcome
            return exc
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
                decoded.append(_segment(raw))
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
        languages: dict[int, tuple[str, float]] = {}
        segments: dict[int, list[Segment] | Exception] = {}
        groups: dict[tuple[Any, ...], list[int]] = {}
        for index, clip in enumerate(clips):
            _stop_if(cancel, "before language detection")
            try:
                languages[index] = self._resolved_language(clip)
            except Exception as exc:  # this clip's failure alone
                logger.exception("language detection failed for request %s", clip.request.request_id)
                segments[index] = exc
                continue
            groups.setdefault(_group_key(clip.request, languages[index][0]), []).append(index)
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
        request = clips[0].request  # every clip in a group decodes the same way
        pieces = [piece for clip, index in zip(clips, indices, strict=True) for piece in _pieces(clip, index)]
        found: dict[int, list[Segment]] = {index: [] for index in indices}
        for first in range(0, len(pieces), self._pieces_per_call):
            # A pipeline call cannot be stopped once begun (CTranslate2 decodes its pieces in one go): check between.
            _stop_if(cancel, f"after {first} of {len(pieces)} pieces")
            for piece, segments in self._decode_pieces(
                language, request, pieces[first : first + self._pieces_per_call]
            ):
                found[piece.clip].extend(segments)
        return {index: _renumbered(segments) for index, segments in found.items()}

    def _decode_pieces(
        self, language: str, request: TranscriptionRequest, pieces: Sequence[_Piece]
    ) -> list[tuple[_Piece, list[Segment]]]:
        """One BatchedInferencePipeline call for these pieces; each piece's segments in its clip's time."""
        timeline = _lay_out(pieces)
        pipeline = BatchedInferencePipeline(self.model)  # it keeps state between pieces: one per call
        raw_segments, _ = pipeline.transcribe(
            timeline,
            clip_timestamps=[{"start": p.offset, "end": p.offset + len(p.audio) / SAMPLE_RATE} for p in pieces],
            batch_size=len(pieces),
            without_timestamps=False,  # segments split as the sequential path splits them
            # vad_filter goes along unused: given clip_timestamps, the pipeline runs no VAD (`_pieces` did).
            **_decoding_arguments(request, language),
        )
        # The pipeline marks each segment with its piece's start on the timeline, in feature frames.
        per_piece: dict[int, list[fw.Segment]] = {}
        for raw in raw_segments:
            per_piece.setdefault(raw.seek, []).append(raw)
        decoded = []
        for piece in pieces:
            own = per_piece.get(piece.offset * self.model.frames_per_second, [])
            restored = fw.restore_speech_timestamps(
                [_shifted(raw, -piece.offset) for raw in own], piece.regions, SAMPLE_RATE
            )
            decoded.append((piece, [_segment(raw) for raw in restored if _kept(raw)]))
        return decoded

    # -- responses ---------------------------------------------------------------------------

    def _response(self, clip: _Clip, transcript: _Transcript, metadata: dict[str, Any]) -> TranscriptionResponse:
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


# -- audio --------------------------------------------------------------------------------------


def decode_request_audio(audio_b64: str, max_seconds: float) -> Audio:
    """`audio_b64` as 16 kHz mono float32; InvalidRequest naming `audio_b64` for anything unusable."""
    try:
        data = base64.b64decode(audio_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest("audio_b64", f"is not valid base64 ({exc})") from None
    if not data:
        raise InvalidRequest("audio_b64", "is empty")
    try:
        audio = _decode(data, max_seconds)
    except _TooLong as exc:
        raise InvalidRequest(
            "audio_b64", f"audio is {exc.describe()} long; this deployment takes at most {max_seconds:g} s"
        ) from None
    except _NoAudio as exc:
        raise InvalidRequest("audio_b64", str(exc)) from None
    except (av.FFmpegError, ValueError, OSError, EOFError, IndexError, RuntimeError) as exc:
        # FFmpeg's words (an errno, the buffer's placeholder name `<none>`) mean nothing to the caller.
        logger.debug("undecodable audio: %s: %s", type(exc).__name__, exc)
        raise InvalidRequest("audio_b64", _NOT_AUDIO) from None
    if len(audio) == 0:
        raise InvalidRequest("audio_b64", "holds no audio samples")
    return audio


class _NoAudio(Exception):
    pass


class _TooLong(Exception):
    def __init__(self, decoded_s: float, declared_s: float | None) -> None:
        super().__init__(decoded_s)
        self.decoded_s = decoded_s
        self.declared_s = declared_s

    def describe(self) -> str:
        if self.declared_s is not None and self.declared_s > self.decoded_s:
            return f"{self.declared_s:.1f} s"
        return f"more than {self.decoded_s:.1f} s"  # the file does not say; decoding stopped at the limit


def _decode(data: bytes, max_seconds: float) -> Audio:
    """faster_whisper.decode_audio's decoding (s16 mono at 16 kHz, damaged frames skipped, scaled to
    [-1, 1)), but only for audio within the length limit: a small file can hold hours of silence, and
    decode_audio would decode all of it into memory before anyone could check its length.

    The length is counted twice: from the packets' durations before decoding (the container's framing,
    exact, and cheap: 0.1 s for ten minutes of any format), then from the decoded samples, which also
    stops a file whose packets understate what they decode to."""
    limit = math.floor(max_seconds * SAMPLE_RATE)
    with _open(data) as container:
        stream = _audio_stream(container)
        declared = _declared_seconds(container, stream)
        counted = _packet_seconds(container, stream, max_seconds)
        if counted > max_seconds:
            raise _TooLong(counted, declared)
    chunks: list[npt.NDArray[np.int16]] = []
    total = 0
    with _open(data) as container:
        stream = _audio_stream(container)
        resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
        for frame in _frames(container, stream):
            frame.pts = None  # a gap or jump in timestamps must not stop the resampler
            for out in resampler.resample(frame):
                chunk = _samples(out)
                chunks.append(chunk)
                total += len(chunk)
                if total > limit:
                    raise _TooLong(total / SAMPLE_RATE, declared)
        for out in resampler.resample(None):  # flush what the resampler holds back
            chunks.append(_samples(out))
            total += len(chunks[-1])
    if total > limit:
        raise _TooLong(total / SAMPLE_RATE, declared)
    samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
    return (samples.astype(np.float32) / 32768.0).astype(np.float32)


def _open(data: bytes) -> InputContainer:
    # Only the accepted demuxers: FFmpeg checks the list after probing, before the demuxer reads anything.
    options = {"format_whitelist": ",".join(AUDIO_CONTAINERS)}
    return av.open(io.BytesIO(data), mode="r", metadata_errors="ignore", container_options=options)


def _audio_stream(container: InputContainer) -> av.AudioStream:
    if not container.streams.audio:
        raise _NoAudio("holds no audio stream")
    return container.streams.audio[0]


def _declared_seconds(container: InputContainer, stream: av.AudioStream) -> float | None:
    """The length the header gives (or FFmpeg estimated from the bit rate, which can be far off): for messages."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return container.duration / av.time_base if container.duration else None


def _packet_seconds(container: InputContainer, stream: av.AudioStream, max_seconds: float) -> float:
    """The stream's length from its packets' durations, read without decoding; the count stops once past
    `max_seconds`. Damage ends the count early: decoding, which skips what it cannot read, then decides."""
    if stream.time_base is None:
        return 0.0
    limit = max_seconds / stream.time_base  # in the stream's ticks
    total = 0
    try:
        for packet in container.demux(stream):
            total += packet.duration or 0
            if total > limit:
                break
    except (av.FFmpegError, EOFError):
        pass
    return float(total * stream.time_base)


def _samples(frame: av.AudioFrame) -> npt.NDArray[np.int16]:
    return np.asarray(frame.to_ndarray(), dtype=np.int16).reshape(-1)


def _frames(container: InputContainer, stream: av.AudioStream) -> Iterator[av.AudioFrame]:
    """The stream's decoded frames, skipping the ones FFmpeg reports as damaged (as decode_audio does)."""
    frames = container.decode(stream)
    while True:
        try:
            yield next(frames)
        except StopIteration:
            return
        except av.InvalidDataError:
            continue


# -- helpers ----------------------------------------------------------------------------------


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


def _pieces(clip: _Clip, index: int) -> list[_Piece]:
    """The clip cut into pieces of at most 30 s: its speech under VAD, else consecutive 30 s stretches."""
    audio = clip.audio
    if clip.request.vad_filter:
        speech = get_speech_timestamps(
            audio, VadOptions(max_speech_duration_s=PIECE_SECONDS, min_silence_duration_ms=160)
        )
        return [
            _Piece(index, np.concatenate([audio[r["start"] : r["end"]] for r in regions]), regions)
            for regions in _up_to_a_window(speech)
        ]
    return [_Piece(index, audio[start:end], [{"start": start, "end": end}]) for start, end in _quiet_cuts(audio)]


def _up_to_a_window(speech: list[dict[str, int]]) -> list[list[dict[str, int]]]:
    """Consecutive speech stretches grouped so that each group's speech lasts at most 30 s. (faster-whisper's
    collect_chunks does this too, but leaves each later group's first stretch out of its metadata.)"""
    limit = PIECE_SECONDS * SAMPLE_RATE
    groups: list[list[dict[str, int]]] = []
    total = 0
    for region in speech:
        size = region["end"] - region["start"]
        if groups and total + size <= limit:
            groups[-1].append(region)
            total += size
        else:
            groups.append([region])
            total = size
    return groups


def _quiet_cuts(audio: Audio) -> list[tuple[int, int]]:
    """Consecutive stretches of at most 30 s that cover the whole clip, each cut at the quietest 100 ms
    of the 5 s before the limit: a pause, as a rule, rather than the middle of a word."""
    window, frame = CUT_SEARCH_SECONDS * SAMPLE_RATE, SAMPLE_RATE // 10
    limit = PIECE_SECONDS * SAMPLE_RATE
    stretches: list[tuple[int, int]] = []
    start, length = 0, len(audio)
    while length - start > limit:
        search = audio[start + limit - window : start + limit]
        loudness = np.abs(search).reshape(-1, frame).mean(axis=1)
        cut = start + limit - window + int(np.argmin(loudness)) * frame + frame // 2
        stretches.append((start, cut))
        start = cut
    stretches.append((start, length))
    return stretches


def _lay_out(pieces: Sequence[_Piece]) -> Audio:
    """One timeline with every piece starting on a whole second, so that each piece's start (and the
    `seek` the pipeline derives from it) is exact and different from every other's."""
    offset = 0
    for piece in pieces:
        piece.offset = offset
        offset += max(1, math.ceil(len(piece.audio) / SAMPLE_RATE))
    timeline = np.zeros(offset * SAMPLE_RATE, dtype=np.float32)
    for piece in pieces:
        start = piece.offset * SAMPLE_RATE
        timeline[start : start + len(piece.audio)] = piece.audio
    return timeline


def _shifted(raw: fw.Segment, seconds: float) -> fw.Segment:
    words = (
        None
        if raw.words is None
        else [dataclasses.replace(word, start=word.start + seconds, end=word.end + seconds) for word in raw.words]
    )
    return dataclasses.replace(raw, start=raw.start + seconds, end=raw.end + seconds, words=words)


def _kept(raw: fw.Segment) -> bool:
    """What WhisperModel.transcribe keeps and the batched pipeline does not filter by itself: text with a
    duration, from a window that is not judged silent (likely no speech, decoded with low confidence)."""
    silent = raw.no_speech_prob > NO_SPEECH_THRESHOLD and raw.avg_logprob < LOG_PROB_THRESHOLD
    return bool(raw.text.strip()) and raw.start != raw.end and not silent


def _renumbered(segments: list[Segment]) -> list[Segment]:
    return [segment.model_copy(update={"id": number}) for number, segment in enumerate(segments, start=1)]


def _segment(raw: fw.Segment) -> Segment:
    start, end = round(float(raw.start), 3), round(float(raw.end), 3)
    words = None
    if raw.words is not None:
        # faster-whisper's boundary heuristics can move a first or last word a little past its
        # segment's edge; a client may rely on a segment's words lying inside it.
        words = [
            Word(
                word=word.word,
                start=min(max(round(float(word.start), 3), start), end),
                end=min(max(round(float(word.end), 3), start), end),
                probability=float(word.probability),
            )
            for word in raw.words
        ]
    return Segment(
        id=raw.id,
        start=start,
        end=end,
        text=raw.text,
        avg_logprob=float(raw.avg_logprob),
        no_speech_prob=float(raw.no_speech_prob),
        words=words,
    )


def _stop_if(cancel: threading.Event, where: str) -> None:
    """Raise Cancelled once `cancel` is set; called where decoding can stop (between windows or pipeline calls)."""
    if cancel.is_set():
        raise Cancelled(f"transcription stopped {where}")


def _device(setting: Literal["cpu", "cuda", "auto"]) -> Literal["cpu", "cuda"]:
    if setting == "auto":
        return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    return setting
