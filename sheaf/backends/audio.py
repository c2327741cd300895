"""A request's encoded audio as 16 kHz mono float32 samples (PyAV, in memory): `decode_request_audio`.

Only the containers in `AUDIO_CONTAINERS` are opened, and a clip's length is counted from its packets
before any of it is decoded, so a clip over the deployment's limit costs a moment of demuxing, not the
decoding of minutes of audio. Anything unusable is an InvalidRequest naming `audio_b64`.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import math
from collections.abc import Iterator

import av
import numpy as np
import numpy.typing as npt
from av.container import InputContainer

from sheaf.api.audio import AUDIO_CONTAINERS
from sheaf.exceptions import InvalidRequest

logger = logging.getLogger("sheaf.backends.audio")

Audio = npt.NDArray[np.float32]

SAMPLE_RATE = 16_000  # what speech models take (every Whisper model among them)

# Only these demuxers open a request's audio. The rest stay closed: image, subtitle and raw formats, and
# playlists (HLS, concat) that would open the files or addresses they list.
_NOT_AUDIO = f"is not a decodable audio file; accepted: {', '.join(AUDIO_CONTAINERS.values())}"


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
