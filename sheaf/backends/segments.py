"""Whisper's segments in the contract's terms, and the batched pipeline's layout of clips.

`to_segment` turns a faster-whisper segment (and its words) into the contract's `Segment`. For the
batched pipeline, `cut_into_pieces` cuts a clip into pieces of at most 30 s, `lay_out` puts pieces on
one shared timeline, and `segments_by_piece` maps the pipeline's segments back to each piece's clip.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from faster_whisper import transcribe as fw
from faster_whisper.vad import VadOptions, get_speech_timestamps

from sheaf.api.audio import Segment, Word
from sheaf.backends.audio import SAMPLE_RATE, Audio

PIECE_SECONDS = 30  # Whisper's window: the batched pipeline decodes one window per piece
CUT_SEARCH_SECONDS = 5  # how far before the 30 s limit a clip's cut may move to find a pause
# WhisperModel.transcribe's defaults for skipping a silent window.
NO_SPEECH_THRESHOLD, LOG_PROB_THRESHOLD = 0.6, -1.0


def to_segment(raw: fw.Segment) -> Segment:
    """The contract's segment, times rounded to the millisecond, each word inside its segment."""
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


def renumbered(segments: list[Segment]) -> list[Segment]:
    """A clip's segments, gathered from its pieces, numbered from 1 again."""
    return [segment.model_copy(update={"id": number}) for number, segment in enumerate(segments, start=1)]


# -- the batched pipeline's layout --------------------------------------------------------------


@dataclass
class Piece:
    """At most 30 s of one clip for the batched pipeline: its audio (speech only, under VAD)
    and the stretches of the clip it came from, in samples, to map its times back."""

    clip: int
    audio: Audio
    regions: list[dict[str, int]]
    offset: int = 0  # whole seconds into the shared timeline; set when laid out


def cut_into_pieces(audio: Audio, vad_filter: bool, clip: int) -> list[Piece]:
    """Clip number `clip` cut into pieces of at most 30 s: its speech under VAD, else consecutive 30 s stretches."""
    if vad_filter:
        speech = get_speech_timestamps(
            audio, VadOptions(max_speech_duration_s=PIECE_SECONDS, min_silence_duration_ms=160)
        )
        return [
            Piece(clip, np.concatenate([audio[r["start"] : r["end"]] for r in regions]), regions)
            for regions in _up_to_a_window(speech)
        ]
    return [Piece(clip, audio[start:end], [{"start": start, "end": end}]) for start, end in _quiet_cuts(audio)]


def lay_out(pieces: Sequence[Piece]) -> Audio:
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


def segments_by_piece(
    raw_segments: Iterable[fw.Segment], pieces: Sequence[Piece], frames_per_second: int
) -> list[tuple[Piece, list[Segment]]]:
    """The pipeline's segments of a laid-out timeline, each piece's in its clip's time, without the ones
    WhisperModel.transcribe would have dropped."""
    # The pipeline marks each segment with its piece's start on the timeline, in feature frames.
    per_piece: dict[int, list[fw.Segment]] = {}
    for raw in raw_segments:
        per_piece.setdefault(raw.seek, []).append(raw)
    decoded = []
    for piece in pieces:
        own = per_piece.get(piece.offset * frames_per_second, [])
        restored = fw.restore_speech_timestamps(
            [_shifted(raw, -piece.offset) for raw in own], piece.regions, SAMPLE_RATE
        )
        decoded.append((piece, [to_segment(raw) for raw in restored if _kept(raw)]))
    return decoded


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
