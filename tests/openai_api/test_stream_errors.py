"""An error after a `/v1` stream has begun: the deployment's `error` event becomes OpenAI's last
`{"error": ...}` payload, and the real `openai` SDK raises `APIError` on it.

The `/v1` app runs in process (httpx's ASGI transport) over a lane whose deployment answers
a fixed list of sheaf frames: the route, its translation of events and the SDK's parsing are real."""

import asyncio
import json
from collections.abc import AsyncGenerator, Mapping
from typing import Any, cast

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from sheaf.api import TextGenerationRequest
from sheaf.api.base import BaseRequest
from sheaf.api.events import ErrorEvent, ResultEvent, TokenEvent
from sheaf.api.textgen import TextGenerationResponse
from sheaf.gateway import Lane, Refused
from sheaf.openai_api.routes import openai_app
from sheaf.streaming import HEARTBEAT, encode_event

FAILED = ErrorEvent(error="RuntimeError: the model fell over", code="backend_error")
CHAT: dict[str, Any] = {"model": "textgen", "messages": [{"role": "user", "content": "hi"}], "stream": True}


class ScriptedLane:
    """A text generation lane as the `/v1` routes use it: each stream relays `frames`."""

    request_type = TextGenerationRequest

    def __init__(self, frames: list[str]) -> None:
        self.frames = frames
        self.relayed: list[BaseRequest[Any]] = []

    async def relay(self, request: BaseRequest[Any]) -> AsyncGenerator[str | Refused, None]:
        self.relayed.append(request)
        for frame in self.frames:
            yield frame

    def retry_after(self, status: int) -> dict[str, str]:
        return {}


def tokens_then(last: str) -> list[str]:
    """What a deployment sends: acceptance, two tokens (with a heartbeat between), then `last`."""
    return [
        ": accepted\n\n",
        encode_event(TokenEvent(text="a", index=0)),
        HEARTBEAT,
        encode_event(TokenEvent(text=" fox", index=1)),
        last,
    ]


def v1(lane: ScriptedLane) -> httpx.ASGITransport:
    """The `/v1` app over `lane`, mounted where the entry service mounts it."""
    app = Starlette(routes=[Mount("/v1", app=openai_app(cast(Mapping[str, Lane], {"textgen": lane})))])
    return httpx.ASGITransport(app=app)


def raw_stream(lane: ScriptedLane, body: dict[str, Any]) -> tuple[int, list[str]]:
    """The status and the `data:` payloads of a streamed `/v1/chat/completions`, as sent."""

    async def run() -> tuple[int, str]:
        async with httpx.AsyncClient(transport=v1(lane), base_url="http://sheaf") as client:
            response = await client.post("/v1/chat/completions", json=body)
            return response.status_code, response.text

    status, text = asyncio.run(run())
    frames = [frame for frame in text.split("\n\n") if frame.startswith("data: ")]
    return status, [frame.removeprefix("data: ") for frame in frames]


def test_an_error_event_after_tokens_is_the_last_payload_an_error_in_openais_shape() -> None:
    lane = ScriptedLane(tokens_then(encode_event(FAILED)))
    status, payloads = raw_stream(lane, CHAT)
    assert status == 200  # the stream had begun: the error can only come inside it
    assert payloads[-1] != "[DONE]" and "[DONE]" not in payloads  # it did not end as a completed stream
    chunks = [json.loads(payload) for payload in payloads]
    contents = [chunk["choices"][0]["delta"].get("content") for chunk in chunks[:-1]]
    assert contents == ["", "a", " fox"]  # the role chunk, then each token before the failure
    assert chunks[-1] == {
        "error": {
            "message": "RuntimeError: the model fell over",
            "type": "server_error",
            "param": None,
            "code": "backend_error",
        }
    }
    assert len(lane.relayed) == 1


def test_a_stream_without_an_error_ends_with_done_instead() -> None:
    answer = TextGenerationResponse(
        request_id="r", model_name="tiny", text="a fox", finish_reason="stop", prompt_tokens=1, completion_tokens=2
    )
    _, payloads = raw_stream(ScriptedLane(tokens_then(encode_event(ResultEvent(response=answer)))), CHAT)
    assert payloads[-1] == "[DONE]"
    assert json.loads(payloads[-2])["choices"][0]["finish_reason"] == "stop"
    assert not any("error" in json.loads(payload) for payload in payloads[:-1])


def test_the_openai_sdk_raises_api_error_on_it_after_the_tokens() -> None:
    lane = ScriptedLane(tokens_then(encode_event(FAILED)))

    async def run() -> tuple[list[str], openai.APIError]:
        http = httpx.AsyncClient(transport=v1(lane))
        # The SDK takes an httpx client as well as its own httpx2 one; its types name only the latter.
        async with openai.AsyncOpenAI(
            base_url="http://sheaf/v1",
            api_key="unused",
            http_client=http,  # type: ignore[arg-type]
        ) as sdk:
            stream = await sdk.chat.completions.create(
                model="textgen", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            received: list[str] = []
            with pytest.raises(openai.APIError) as raised:
                async for chunk in stream:
                    received.append(chunk.choices[0].delta.content or "")
            return received, raised.value

    received, error = asyncio.run(run())
    assert received == ["", "a", " fox"]  # what came before the failure reached the caller
    assert not isinstance(error, openai.APIStatusError)  # raised from inside the 200 stream
    assert error.message == "RuntimeError: the model fell over"
    assert error.body == {
        "message": "RuntimeError: the model fell over",
        "type": "server_error",
        "param": None,
        "code": "backend_error",
    }
    assert error.code == "backend_error" and error.type == "server_error"
