"""The OpenAI-compatible routes, `/v1/...`, mounted on the entry service beside the native ones.

The request's `model` names the deployment. Each route turns OpenAI's request into sheaf's and
hands it to that deployment's `Lane`, as the native routes do: the same admission limits,
deadlines, batching in the deployment and cancellation when the client leaves.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import aclosing
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from sheaf.api import DiffusionRequest, TextGenerationRequest, TranscriptionRequest
from sheaf.api.base import BaseRequest
from sheaf.disconnects import ClientGone, unless_disconnected
from sheaf.gateway import Lane, Refused
from sheaf.openai_api import audio, chat
from sheaf.openai_api.errors import OpenAIError, bad_parameter, from_sheaf
from sheaf.openai_api.images import ImageRequest, images_response
from sheaf.streaming import SSEDecoder, encode_event, encode_frame

DONE = encode_frame("[DONE]")

Translate = Callable[[dict[str, Any]], list[dict[str, Any]]]
"""sheaf's stream event as the OpenAI payloads to send for it."""


def openai_app(lanes: Mapping[str, Lane]) -> Starlette:
    """The `/v1` app over the entry service's lanes (mount it at `PREFIX`)."""
    routes = OpenAIRoutes(lanes)
    return Starlette(
        routes=[
            Route("/models", routes.models, methods=["GET"]),
            Route("/models/{model}", routes.model, methods=["GET"]),
            Route("/chat/completions", routes.chat_completions, methods=["POST"]),
            Route("/completions", routes.completions, methods=["POST"]),
            Route("/audio/transcriptions", routes.transcriptions, methods=["POST"]),
            Route("/audio/translations", routes.translations, methods=["POST"]),
            Route("/images/generations", routes.images, methods=["POST"]),
            # BentoML mounts an app only for paths one of its routes matches: any other is answered here.
            Route("/{path:path}", _invalid_url, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        ],
        exception_handlers={OpenAIError: _openai_error, HTTPException: _http_error},
    )


class OpenAIRoutes:
    def __init__(self, lanes: Mapping[str, Lane]) -> None:
        self.lanes = lanes
        self.created = int(time.time())

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [self._model(name) for name in self.lanes]})

    async def model(self, request: Request) -> JSONResponse:
        name = request.path_params["model"]
        self._lane(name)  # 404 for one that does not exist
        return JSONResponse(self._model(name))

    def _model(self, name: str) -> dict[str, Any]:
        kind = self.lanes[name].request_type.model_fields["model_type"].default
        return {"id": name, "object": "model", "created": self.created, "owned_by": "sheaf", "model_type": kind}

    def _lane(self, model: str, wanted: type[BaseRequest[Any]] | None = None) -> Lane:
        lane = self.lanes.get(model)
        if lane is None:
            known = ", ".join(self.lanes)
            message = f"The model `{model}` does not exist; this server has: {known}"
            raise OpenAIError(404, message, param="model", code="model_not_found")
        if wanted is not None and not issubclass(lane.request_type, wanted):
            have = lane.request_type.model_fields["model_type"].default
            need = wanted.model_fields["model_type"].default
            raise bad_parameter("model", f"`{model}` serves {have}; this route needs a {need} deployment")
        return lane

    async def chat_completions(self, request: Request) -> Response:
        return await self._text(request, chat.ChatCompletionRequest, "chatcmpl")

    async def completions(self, request: Request) -> Response:
        return await self._text(request, chat.CompletionRequest, "cmpl")

    async def _text(
        self, request: Request, kind: type[chat.ChatCompletionRequest | chat.CompletionRequest], prefix: str
    ) -> Response:
        parsed = kind.parse(await _json(request))
        lane = self._lane(parsed.model, TextGenerationRequest)
        completion_id = f"{prefix}-{uuid.uuid4().hex}"
        sheaf_request = parsed.to_sheaf(completion_id)
        is_chat = isinstance(parsed, chat.ChatCompletionRequest)
        replies = chat.Replies(is_chat, completion_id, parsed.model, int(time.time()), parsed.include_usage)
        if not parsed.stream:
            return JSONResponse(replies.whole(await _answer(request, lane, sheaf_request, chat.RENAMES)))

        def translate(event: dict[str, Any]) -> list[dict[str, Any]]:
            if event["type"] == "token":
                return [replies.chunk(event["text"])]
            return replies.last(event) if event["type"] == "result" else []

        first = replies.first()
        return await _stream(request, lane, sheaf_request, chat.RENAMES, translate, [first] if first else [], DONE)

    async def transcriptions(self, request: Request) -> Response:
        return await self._audio(request, "transcribe")

    async def translations(self, request: Request) -> Response:
        return await self._audio(request, "translate")

    async def _audio(self, request: Request, task: str) -> Response:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise OpenAIError(400, "send the audio as multipart/form-data, with a `file` part", code="invalid_request")
        async with request.form(max_files=1) as form:
            fields = audio.AudioForm.parse(form)
            lane = self._lane(fields.model, TranscriptionRequest)
            sheaf_request = await audio.to_sheaf(form, fields, task, f"{task}-{uuid.uuid4().hex}")
        if fields.stream:

            def translate(event: dict[str, Any]) -> list[dict[str, Any]]:
                if event["type"] == "segment":
                    return [audio.delta_event(event["segment"])]
                return [audio.done_event(event)] if event["type"] == "result" else []

            return await _stream(request, lane, sheaf_request, audio.RENAMES, translate, [], "")
        answer = await _answer(request, lane, sheaf_request, audio.RENAMES)
        content, media_type = audio.formatted(answer, fields, task)
        if isinstance(content, dict):
            return JSONResponse(content)
        return PlainTextResponse(content, media_type=media_type)

    async def images(self, request: Request) -> JSONResponse:
        parsed = ImageRequest.parse(await _json(request))
        lane = self._lane(parsed.model, DiffusionRequest)
        requests = parsed.to_sheaf(f"image-{uuid.uuid4().hex}", lane.config.batching.max_batch_size)
        outcomes = await lane.outcomes(requests, request)  # one call: the n images are one batch
        if not isinstance(outcomes, list):
            outcomes = [outcomes]
        for outcome in outcomes:
            if outcome["status"] != 200:
                retry = lane.retry_after(outcome["status"])
                raise from_sheaf(outcome["status"], outcome["body"], {"width": "size", "height": "size"}, retry)
        return JSONResponse(images_response([outcome["body"] for outcome in outcomes], int(time.time())))


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError as exc:
        raise OpenAIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None


async def _answer(
    request: Request, lane: Lane, sheaf_request: BaseRequest[Any], renames: Mapping[str, str]
) -> dict[str, Any]:
    """The deployment's answer to `sheaf_request`, decoded; its errors raised in OpenAI's shape."""
    answer = await lane.answer(sheaf_request, request)
    body = json.loads(answer.body)
    if answer.status != 200:
        raise from_sheaf(answer.status, body, renames, lane.retry_after(answer.status))
    return body  # type: ignore[no-any-return]


async def _stream(
    request: Request,
    lane: Lane,
    sheaf_request: BaseRequest[Any],
    renames: Mapping[str, str],
    translate: Translate,
    first: list[dict[str, Any]],
    done: str,
) -> Response:
    """The deployment's stream as OpenAI's: a refusal before it starts is a plain error answer;
    then `first`, each event's `translate`d payloads and `done` (`[DONE]` for completions). An
    error after the start is a last `{"error": ...}` payload, as OpenAI sends one. A client that
    leaves closes the deployment's stream, which stops the model."""
    chunks = lane.relay(sheaf_request)
    try:
        head = await unless_disconnected(request, anext(chunks))
    except ClientGone:
        await chunks.aclose()
        return Response(status_code=499)
    if isinstance(head, Refused):
        await chunks.aclose()
        raise from_sheaf(head.status, head.body, renames, lane.retry_after(head.status))
    return StreamingResponse(_events(head, chunks, translate, first, done), media_type="text/event-stream")


async def _events(
    head: str,
    chunks: AsyncGenerator[str | Refused, None],
    translate: Translate,
    first: list[dict[str, Any]],
    done: str,
) -> AsyncGenerator[str, None]:
    async with aclosing(chunks):
        for payload in first:
            yield encode_event(payload)
        decoder = SSEDecoder()
        chunk: str | Refused = head
        while True:
            if isinstance(chunk, str):
                events = decoder.feed(chunk)
                if not events and chunk.startswith(":"):
                    yield chunk  # heartbeats keep proxies from closing a quiet stream; SSE clients skip them
                for event in events:
                    if event["type"] == "error":
                        error = {"message": event["error"], "type": "server_error", "param": None}
                        yield encode_event({"error": {**error, "code": event.get("code")}})
                        return
                    for payload in translate(event):
                        yield encode_event(payload)
                    if event.get("done"):
                        yield done
                        return
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                return


async def _invalid_url(request: Request) -> Response:
    # What OpenAI answers for a route it does not have, or a method a route does not take.
    raise OpenAIError(404, f"Invalid URL ({request.method} {request.url.path})")


async def _openai_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, OpenAIError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return OpenAIError(exc.status_code, str(exc.detail), headers=exc.headers).response()
