"""The whisper deployment end to end: a real server on the real whisper tiny.en weights."""

import base64
import io
import re
import time
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
import pytest

from sheaf.streaming import SSEDecoder
from tests.conftest import Server, one_sentence_a_window, predict_at_once, speak

SENTENCES = "I would like a cup of coffee. Please call me tomorrow morning. The children are playing in the garden."


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> str:
    return base64.b64encode(speak(SENTENCES, tmp_path_factory.mktemp("speech") / "speech.wav")).decode()


def body(audio_b64: str, **fields: Any) -> dict[str, Any]:
    return {"model_type": "audio", "audio_b64": audio_b64, "beam_size": 1, **fields}


def words(text: str) -> list[str]:
    return "".join(c for c in text.lower() if c.isalnum() or c.isspace()).split()


def word_error_rate(reference: str, heard: str) -> float:
    expected, got = words(reference), words(heard)
    distance = list(range(len(got) + 1))
    for i, word in enumerate(expected, 1):
        previous, distance[0] = distance[0], i
        for j, other in enumerate(got, 1):
            previous, distance[j] = distance[j], min(distance[j] + 1, distance[j - 1] + 1, previous + (word != other))
    return distance[-1] / len(expected)


def test_predict_transcribes_real_speech(server: Server, speech: str) -> None:
    response = httpx.post(f"{server.url}/whisper/predict", json=body(speech), timeout=120)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["language"] == "en"
    assert word_error_rate(SENTENCES, answer["text"]) <= 0.2, answer["text"]
    assert answer["duration"] > 4
    assert answer["segments"] and all(s["start"] < s["end"] for s in answer["segments"])


def test_stream_sends_segments_then_the_result(server: Server, speech: str) -> None:
    decoder = SSEDecoder()
    with httpx.stream("POST", f"{server.url}/whisper/stream", json=body(speech), timeout=120) as response:
        assert response.status_code == 200
        events = [event for chunk in response.iter_raw() for event in decoder.feed(chunk)]
    *segments, result = events
    assert segments and {event["type"] for event in segments} == {"segment"}
    assert result["type"] == "result"
    assert result["segments"] == [event["segment"] for event in segments]


BAD = {
    "not base64": "%%% not base64 %%%",
    "not audio": base64.b64encode(b"this is plain text, not a sound file" * 10).decode(),
    "empty": "",
}


@pytest.mark.parametrize("route", ["predict", "stream"])
@pytest.mark.parametrize("case", BAD)
def test_bad_audio_is_a_422_naming_the_field(server: Server, route: str, case: str) -> None:
    response = httpx.post(f"{server.url}/whisper/{route}", json=body(BAD[case]), timeout=60)
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "audio_b64"]
    if case == "not audio":  # what the caller can act on, and nothing of FFmpeg's insides
        assert error["msg"].startswith("is not a decodable audio file; accepted: WAV, FLAC, MP3, Ogg"), error
        assert "<none>" not in error["msg"] and "Errno" not in error["msg"]


def test_audio_over_the_length_limit_is_a_422(server: Server, tmp_path: Path) -> None:
    long = base64.b64encode(speak(SENTENCES * 7, tmp_path / "long.wav")).decode()  # about 40 s: over the 30 s limit
    response = httpx.post(f"{server.url}/whisper/predict", json=body(long), timeout=60)
    assert response.status_code == 422
    assert "audio_b64" in response.text and "30" in response.text


def silent_flac(seconds: int) -> str:
    """`seconds` of 16 kHz silence as FLAC, base64: a few hundred bytes a minute."""
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="flac") as out:
        stream = out.add_stream("flac", rate=16000, layout="mono")
        for _ in range(seconds):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 16000), dtype=np.int16), format="s16", layout="mono")
            frame.sample_rate = 16000
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("route", ["predict", "stream"])
def test_a_long_silent_flac_is_a_422_from_its_length(server: Server, route: str) -> None:
    response = httpx.post(f"{server.url}/whisper/{route}", json=body(silent_flac(29 * 60)), timeout=60)
    assert response.status_code == 422, response.text
    assert response.json()["detail"] == [
        {
            "loc": ["body", "audio_b64"],
            "msg": "audio is 1740.0 s long; this deployment takes at most 30 s",
            "type": "value_error",
        }
    ]


def test_a_body_over_the_size_limit_is_413(server: Server) -> None:
    huge = base64.b64encode(b"\0" * 4 * 1024 * 1024).decode()  # over the test config's 4 MB
    assert httpx.post(f"{server.url}/whisper/stream", json=body(huge), timeout=60).status_code == 413


def test_bad_clips_fail_alone_in_their_batch(server: Server, speech: str) -> None:
    bodies = [body(speech, request_id=f"clip-{i}") for i in range(8)]
    bodies[2]["audio_b64"] = BAD["not audio"]
    bodies[5]["audio_b64"] = BAD["not base64"]
    bodies[6]["model_name"] = "fail-in-batch"  # decoded with the rest, then it fails

    responses = predict_at_once(server, "whisper", bodies, timeout=300)
    assert [r.status_code for r in responses] == [200, 200, 422, 200, 200, 422, 500, 200]
    assert responses[6].json() == {"detail": "InjectedFault: injected for this request"}
    texts = {r.json()["text"] for r in responses if r.status_code == 200}
    assert len(texts) == 1  # the same clip gives the same text in any batch
    assert max(r.json()["metadata"]["batch_size"] for r in responses if r.status_code == 200) > 1


def test_a_dropped_stream_stops_decoding_and_the_server_goes_on(
    long_audio_server: Server, speech: str, tmp_path: Path
) -> None:
    server = long_audio_server
    # 360 s: twelve windows, each with a sentence, which the batched pipeline decodes four to a call.
    # The drop is heard while the second call runs (CTranslate2 cannot stop it): the third never does.
    sentences = [f"This is sentence number {n} in window {n}." for n in range(1, 13)]
    clip = base64.b64encode(one_sentence_a_window(sentences, tmp_path / "long.wav", tmp_path)).decode()
    with httpx.stream(
        "POST", f"{server.url}/whisper/stream", json=body(clip, request_id="dropped-whisper"), timeout=120
    ) as response:
        decoder = SSEDecoder()
        first = next(event for chunk in response.iter_raw() for event in decoder.feed(chunk))
    assert first["type"] == "segment"  # the first call is decoded; the client leaves
    deadline = time.monotonic() + 60
    while not (match := re.search(r"stream dropped-whisper cancelled after (\d+) segments", server.log_text())):
        assert time.monotonic() < deadline, "the server never stopped decoding"
        time.sleep(0.1)
    assert int(match.group(1)) > 0  # logged only when some of its pieces were never decoded
    assert re.search(r"whisper stream request_id=dropped-whisper events=\d+ outcome=cancelled", server.log_text())
    response = httpx.post(f"{server.url}/whisper/predict", json=body(speech), timeout=120)
    assert response.status_code == 200, response.text
    assert word_error_rate(SENTENCES, response.json()["text"]) <= 0.2
