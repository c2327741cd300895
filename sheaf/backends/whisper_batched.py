"""Whisper's batched way to decode (the default): every clip is cut into pieces of at most 30 s
(its speech under `vad_filter`, else consecutive stretches cut at a pause), the pieces of all
clips that share decoding settings go a few at a time through faster-whisper's
`BatchedInferencePipeline` on one shared timeline, and each segment is mapped back to its clip
(the cutting, the timeline and the mapping back are in `sheaf.backends.segments`).

Streams share these calls as predicts do: each clip's segments go to its stream as each call
decodes them, so a stream's segments are its predict's. CTranslate2 cannot stop a call once
begun, so cancelled work stops at the next pipeline call (a few pieces).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from faster_whisper import BatchedInferencePipeline, WhisperModel

from sheaf.api.audio import Segment, TranscriptionRequest
from sheaf.api.events import ResultEvent, SegmentEvent, StreamEvent
from sheaf.backends.audio import SAMPLE_RATE
from sheaf.backends.base import Cancelled, EveryEvent, elapsed_ms
from sheaf.backends.segments import Piece, cut_into_pieces, lay_out, renumbered, segments_by_piece
from sheaf.backends.transcripts import Clip, Transcript, decoding_arguments, response, stop_if

logger = logging.getLogger("sheaf.backends.whisper")

# Pieces encoded and decoded together in one pipeline call. On the 2-core CPU 4 was fastest: 2 gave the
# decoder less to share, and at 8 the encoder's time per piece grew (0.22 s alone, 0.27 s in a batch of 8).
# 16 on a GPU is the batch size of faster-whisper's README example; it was not measured here.
PIECES_PER_CALL = {"cpu": 4, "cuda": 16}

Send = Callable[[int, StreamEvent | Exception], None]
"""A clip's event (by its row in the batch), or its failure."""


class BatchedTranscriber:
    """A loaded model's batched transcription: `transcribe` for predicts, `stream` for streams."""

    def __init__(
        self, model: WhisperModel, pieces_per_call: int, language_of: Callable[[TranscriptionRequest], str | None]
    ) -> None:
        """`language_of`: the request's language (None: detect it), or `InvalidRequest`."""
        self.model = model
        self.pieces_per_call = pieces_per_call
        self._language_of = language_of

    def transcribe(self, clips: Sequence[Clip], cancel: threading.Event) -> list[Transcript | Exception]:
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
            found if isinstance(found, Exception) else Transcript(found, *languages[index])
            for index, found in sorted(segments.items())
        ]

    def stream(self, clips: Sequence[Clip], listening: Sequence[threading.Event], send: Send) -> None:
        """Each clip's segments to `send` as each call decodes them, and its result once its last
        piece is decoded. Pieces of a clip whose stream has left (`listening[row]` set) are not decoded."""
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

    def decode_pieces(
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
            **decoding_arguments(request, language),
        )
        return segments_by_piece(raw_segments, pieces, self.model.frames_per_second)

    def _grouped(
        self, clips: Sequence[Clip], cancel: threading.Event
    ) -> tuple[dict[int, tuple[str, float]], dict[int, Exception], dict[tuple[Any, ...], list[int]]]:
        """Each clip's language, the clips that failed to find one (their own failure), and the clips
        grouped by their decoding settings."""
        languages: dict[int, tuple[str, float]] = {}
        failures: dict[int, Exception] = {}
        groups: dict[tuple[Any, ...], list[int]] = {}
        for index, clip in enumerate(clips):
            stop_if(cancel, "before language detection")
            try:
                languages[index] = self._resolved_language(clip)
            except Exception as exc:  # this clip's failure alone
                logger.exception("language detection failed for request %s", clip.request.request_id)
                failures[index] = exc
                continue
            groups.setdefault(_group_key(clip.request, languages[index][0]), []).append(index)
        return languages, failures, groups

    def _resolved_language(self, clip: Clip) -> tuple[str, float]:
        """The request's language, or the one detected on this clip alone (the pipeline would detect one
        language for the whole batch)."""
        language = self._language_of(clip.request)
        if language is not None:
            return language, 1.0
        detected, probability, _ = self.model.detect_language(audio=clip.audio, vad_filter=clip.request.vad_filter)
        return detected, float(probability)

    def _decode_group(
        self, language: str, clips: Sequence[Clip], indices: Sequence[int], cancel: threading.Event
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
                stop_if(cancel, f"after {done} of {len(pieces)} pieces")
            call, remaining = remaining[: self.pieces_per_call], remaining[self.pieces_per_call :]
            yield self.decode_pieces(language, request, call)
            done += len(call)


class _GroupStream:
    """One group's streams while its pieces decode: each clip's segments numbered and sent as they
    come, its result once its last piece is decoded."""

    def __init__(
        self,
        clips: Sequence[Clip],
        members: list[int],
        languages: dict[int, tuple[str, float]],
        send: Send,
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
        transcript = Transcript(self._found[row], *self._languages[row])
        self._send(row, ResultEvent(response=response(clip, transcript, metadata)))


def _pieces(clips: Sequence[Clip], indices: Sequence[int]) -> list[Piece]:
    """The clips cut into pieces for the pipeline, each marked with its index."""
    return [
        piece
        for clip, index in zip(clips, indices, strict=True)
        for piece in cut_into_pieces(clip.audio, clip.request.vad_filter, index)
    ]


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
