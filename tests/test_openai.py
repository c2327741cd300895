"""The OpenAI-compatible routes against a served sheaf, with the real `openai` package as the client."""

import asyncio
import base64
import contextlib
import io
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam
from PIL import Image

from tests.conftest import DEPLOYMENTS, Server, one_sentence_a_window, speak

SPOKEN = "I would like a cup of coffee. Please call me tomorrow morning."
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "the quick brown fox"}]


@pytest.fixture(scope="module")
def server(together_server: Server) -> Server:
    return together_server


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[openai.OpenAI]:
    # No retries: a refusal must show as the test sent it.
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120) as sdk:
        yield sdk


def async_client(server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    speak(SPOKEN, path)
    return path


def words(text: str) -> list[str]:
    return "".join(c for c in text.lower() if c.isalnum() or c.isspace()).split()


def test_models_lists_every_deployment(client: openai.OpenAI) -> None:
    listed = {model.id for model in client.models.list()}
    assert listed == set(DEPLOYMENTS)
    assert client.models.retrieve("flux").id == "flux"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("dall-e-3")


def test_a_greedy_chat_streamed_says_what_it_says_whole(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="textgen", messages=CHAT, max_tokens=12, temperature=0)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 12
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12
    stream = client.chat.completions.create(
        model="textgen",
        messages=CHAT,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert streamed == whole.choices[0].message.content
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert len({chunk.id for chunk in chunks}) == 1


def test_an_async_chat_streams_tokens_as_they_come(server: Server) -> None:
    async def run() -> tuple[str, list[str]]:
        async with async_client(server) as sdk:
            whole = await sdk.chat.completions.create(model="textgen", messages=CHAT, max_tokens=10, temperature=0)
            stream = await sdk.chat.completions.create(
                model="textgen", messages=CHAT, max_tokens=10, temperature=0, stream=True
            )
            pieces = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices[0].delta.content]
            return whole.choices[0].message.content or "", pieces

    whole, pieces = asyncio.run(run())
    assert len(pieces) > 1  # token by token, not one piece at the end
    assert "".join(pieces) == whole


def test_a_completion_is_the_native_predict_of_its_prompt(client: openai.OpenAI, server: Server) -> None:
    native = httpx.post(
        f"{server.url}/textgen/predict",
        json={"model_type": "text_generation", "prompt": "the quick brown fox", "max_new_tokens": 8},
        timeout=60,
    ).json()
    completion = client.completions.create(model="textgen", prompt="the quick brown fox", max_tokens=8, temperature=0)
    assert completion.object == "text_completion"
    assert completion.choices[0].text == native["text"]
    streamed = client.completions.create(
        model="textgen", prompt="the quick brown fox", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == native["text"]


def test_seeded_sampling_repeats(client: openai.OpenAI) -> None:
    answers = {
        client.chat.completions.create(model="textgen", messages=CHAT, max_tokens=8, seed=7).choices[0].message.content
        for _ in range(2)
    }
    assert len(answers) == 1


def test_a_stop_string_ends_the_text_before_it_and_the_reason_is_stop(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="textgen", messages=CHAT, max_tokens=24, temperature=0)
    text = whole.choices[0].message.content or ""
    assert whole.choices[0].finish_reason == "length" and len(text) > 8, text
    middle = len(text) // 2
    stop = text[middle : middle + 3]  # greedy: the same text again, up to where this first appears
    before = text[: text.index(stop)]
    stopped = client.chat.completions.create(model="textgen", messages=CHAT, max_tokens=24, temperature=0, stop=stop)
    assert stopped.choices[0].message.content == before
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage is not None and stopped.usage.completion_tokens < 24
    streamed = list(
        client.chat.completions.create(
            model="textgen", messages=CHAT, max_tokens=24, temperature=0, stop=[stop], stream=True
        )
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == before  # none of the stop string
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_max_completion_tokens_limits_the_completion_over_max_tokens(client: openai.OpenAI) -> None:
    longer = client.chat.completions.create(model="textgen", messages=CHAT, max_tokens=12, temperature=0)
    short = client.chat.completions.create(
        model="textgen", messages=CHAT, max_tokens=12, max_completion_tokens=5, temperature=0
    )
    assert short.usage is not None and short.usage.completion_tokens == 5  # the newer name wins
    assert short.choices[0].finish_reason == "length"
    assert (longer.choices[0].message.content or "").startswith(short.choices[0].message.content or "")


def test_top_p_reaches_the_sampler(client: openai.OpenAI) -> None:
    def chat(**fields: Any) -> str:
        answer = client.chat.completions.create(model="textgen", messages=CHAT, max_tokens=10, **fields)
        return answer.choices[0].message.content or ""

    assert chat(top_p=0.5, seed=7) == chat(top_p=0.5, seed=7)  # seeded nucleus sampling repeats
    greedy = chat(temperature=0)
    # A nucleus so small that it holds only the likeliest token: sampling at temperature 1 is greedy, whatever the seed.
    assert chat(temperature=1, top_p=1e-9, seed=1) == chat(temperature=1, top_p=1e-9, seed=2) == greedy


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"n": 2}, "n"),
        ({"max_tokens": 31000}, "max_tokens"),  # over this deployment's limit: the deployment's 422, renamed
        ({"top_p": 0}, "top_p"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"model": "flux"}, "model"),
    ],
)
def test_a_bad_chat_parameter_is_the_sdks_bad_request_naming_it(
    client: openai.OpenAI, fields: dict[str, object], param: str | None
) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(**{"model": "textgen", "messages": CHAT, **fields})  # type: ignore[call-overload]
    error = raised.value.body
    assert isinstance(error, dict) and error["type"] == "invalid_request_error"
    assert error["param"] == (param or "messages[0].content")
    assert error["message"]


def test_an_unknown_model_is_the_sdks_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-4o", messages=CHAT)
    assert "textgen" in raised.value.message  # it says which models there are


def test_errors_outside_the_sdk_are_in_openais_shape(server: Server) -> None:
    not_json = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json", timeout=10)
    assert not_json.status_code == 400
    assert not_json.json()["error"]["code"] == "invalid_json"
    nowhere = httpx.post(f"{server.url}/v1/embeddings", json={}, timeout=10)
    assert nowhere.status_code == 404
    assert nowhere.json()["error"]["message"] == "Invalid URL (POST /v1/embeddings)"
    not_a_form = httpx.post(f"{server.url}/v1/audio/transcriptions", json={"model": "whisper"}, timeout=10)
    assert not_a_form.status_code == 400 and "multipart" in not_a_form.json()["error"]["message"]


def test_concurrent_chats_are_batched(server: Server) -> None:
    async def run() -> list[int]:
        async with async_client(server) as sdk:
            answers = await asyncio.gather(
                *(
                    sdk.chat.completions.create(
                        model="textgen", messages=[{"role": "user", "content": f"count {i}"}], max_tokens=16
                    )
                    for i in range(8)
                )
            )
        return [int((answer.model_extra or {})["sheaf"]["batch_size"]) for answer in answers]

    assert max(asyncio.run(run())) > 1


def test_a_dropped_chat_stream_stops_generation(client: openai.OpenAI, server: Server) -> None:
    stream = client.chat.completions.create(
        model="textgen", messages=CHAT, max_tokens=30000, temperature=0, stream=True
    )
    chunks = [next(stream) for _ in range(4)]
    stream.close()
    completion_id = chunks[0].id
    deadline = time.monotonic() + 30
    while not (stopped := re.search(rf"stream {completion_id} cancelled after (\d+) tokens", server.log_text())):
        assert time.monotonic() < deadline, "the server never stopped generating"
        time.sleep(0.1)
    assert int(stopped.group(1)) < 30000


def test_a_transcription_in_each_format(client: openai.OpenAI, speech: Path) -> None:
    with speech.open("rb") as audio:
        plain = client.audio.transcriptions.create(model="whisper", file=audio)
    assert words(plain.text)[:4] == ["i", "would", "like", "a"]
    with speech.open("rb") as audio:
        verbose = client.audio.transcriptions.create(
            model="whisper", file=audio, response_format="verbose_json", timestamp_granularities=["word", "segment"]
        )
    assert verbose.text == plain.text and verbose.duration > 2
    assert verbose.segments and verbose.segments[0].start < 1
    assert verbose.words and [w.word.strip().lower() for w in verbose.words[:2]] == ["i", "would"]
    assert all(w.start <= w.end for w in verbose.words)
    with speech.open("rb") as audio:
        srt = client.audio.transcriptions.create(model="whisper", file=audio, response_format="srt")
    assert re.match(r"1\n00:00:\d\d,\d{3} --> 00:00:\d\d,\d{3}\n\S", srt)
    with speech.open("rb") as audio:
        vtt = client.audio.transcriptions.create(model="whisper", file=audio, response_format="vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:")
    with speech.open("rb") as audio:
        text = client.audio.transcriptions.create(model="whisper", file=audio, response_format="text")
    assert text.strip() == plain.text


def test_a_streamed_transcription_sends_deltas_then_the_text(server: Server, speech: Path) -> None:
    async def run() -> list[object]:
        async with async_client(server) as sdk:
            stream = await sdk.audio.transcriptions.create(model="whisper", file=speech.read_bytes(), stream=True)
            return [event async for event in stream]

    events = asyncio.run(run())
    kinds = [getattr(event, "type", None) for event in events]
    assert kinds[-1] == "transcript.text.done" and set(kinds[:-1]) == {"transcript.text.delta"} and len(kinds) > 1
    deltas = "".join(event.delta for event in events[:-1])  # type: ignore[attr-defined]
    assert words(deltas) == words(events[-1].text)  # type: ignore[attr-defined]


def test_a_dropped_transcription_stream_stops_decoding(long_audio_server: Server, speech: Path, tmp_path: Path) -> None:
    server = long_audio_server
    # 360 s: twelve pieces of up to 30 s, each with speech, which the batched pipeline decodes four
    # to a call. The client leaves after the first call's first delta; the drop is heard while the
    # second call runs (CTranslate2 cannot stop it), and the third is never made.
    sentences = [f"This is sentence number {n} in window {n}." for n in range(1, 13)]
    clip = tmp_path / "windows.wav"
    one_sentence_a_window(sentences, clip, tmp_path)
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120) as sdk:
        stream = sdk.audio.transcriptions.create(model="whisper", file=clip.read_bytes(), stream=True)
        first = next(iter(stream))
        stream.close()
        assert first.type == "transcript.text.delta" and "sentence" in first.delta.lower()
        deadline = time.monotonic() + 60
        cancelled = r"stream (transcribe-[0-9a-f]+) cancelled after (\d+) segments"
        while not (stopped := re.search(cancelled, server.log_text())):
            assert time.monotonic() < deadline, f"the server never stopped decoding:\n{server.log_text()[-3000:]}"
            time.sleep(0.1)
        assert int(stopped.group(2)) > 0  # logged only when some of its pieces were never decoded
        request_id = stopped.group(1)
        assert re.search(rf"whisper stream request_id={request_id} events=\d+ outcome=cancelled", server.log_text())
        with speech.open("rb") as audio:  # and the deployment goes on serving
            assert words(sdk.audio.transcriptions.create(model="whisper", file=audio).text)[:2] == ["i", "would"]


def test_an_english_only_model_cannot_translate(client: openai.OpenAI, speech: Path) -> None:
    with speech.open("rb") as audio, pytest.raises(openai.BadRequestError) as raised:
        client.audio.translations.create(model="whisper", file=audio)
    assert raised.value.param == "model"


def test_images_are_generated_in_one_batch_as_pngs(client: openai.OpenAI) -> None:
    answer = client.images.generate(model="flux", prompt="a red fox", n=2, size="64x48", extra_body={"seed": 3})
    assert answer.data is not None and len(answer.data) == 2
    images = [Image.open(io.BytesIO(base64.b64decode(image.b64_json or ""))) for image in answer.data]
    assert [image.format for image in images] == ["PNG", "PNG"] and images[0].size == (64, 48)
    assert images[0].tobytes() != images[1].tobytes()  # seeds 3 and 4
    assert (answer.model_extra or {})["sheaf"]["batch_size"] == 2
    again = client.images.generate(model="flux", prompt="a red fox", size="64x48", extra_body={"seed": 3})
    assert again.data and again.data[0].b64_json == answer.data[0].b64_json


def test_image_urls_are_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.generate(model="flux", prompt="a red fox", response_format="url")
    assert raised.value.param == "response_format"
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.generate(model="flux", prompt="a red fox", size="60x60")
    assert raised.value.param == "size"


def test_a_full_deployment_is_a_503_that_says_when_to_retry(server: Server) -> None:
    # Greedy: sampled at temperature 1, the tiny model may end a stream early and free its seat.
    body = {"model": "textgen", "messages": CHAT, "max_tokens": 30000, "temperature": 0, "stream": True}
    with contextlib.ExitStack() as open_streams:
        for _ in range(8):  # this deployment's max_streams
            response = open_streams.enter_context(
                httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60)
            )
            assert response.status_code == 200
        full = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert full.status_code == 503
    assert full.headers["retry-after"] == "2"
    assert full.json()["error"]["code"] == "server_busy"
