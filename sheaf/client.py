"""Typed clients for a sheaf server: `SheafClient` and its async twin `AsyncSheafClient`.

    with SheafClient("http://127.0.0.1:3000") as client:
        response = client.predict("textgen", TextGenerationRequest(prompt="Hi"))
        for event in client.stream("textgen", request):
            ...

`predict` returns the deployment's typed response; `stream` yields typed events and ends
with a `ResultEvent` (an `error` event raises `StreamError`); `batch` sends requests the
caller batched itself and answers each with its response or its own error. Jobs outlive
the connection: `submit` queues one, `job` says where it is, `events` follows its log (and
resumes by itself, from the last event it got, when the connection drops), `cancel` stops
it. Errors are in `sheaf.exceptions`.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from types import TracebackType
from typing import Any, Self

import httpx

from sheaf.api.audio import TranscriptionResponse
from sheaf.api.base import BaseRequest, BaseResponse, ResponseT
from sheaf.api.diffusion import DiffusionResponse
from sheaf.api.events import ErrorEvent, JobEvent, ResultEvent, StreamEvent, parse_event, parse_job_event
from sheaf.api.forecast import ForecastResponse
from sheaf.api.jobs import JobAccepted, JobInfo
from sheaf.api.textgen import TextGenerationResponse
from sheaf.exceptions import (
    ClientError,
    FeatureEntityNotFound,
    FeatureRefInvalid,
    FeatureStoreFailed,
    HTTPStatusError,
    InvalidRequest,
    ServerError,
    StreamError,
    TransportError,
    describe_detail,
    field_of,
)
from sheaf.streaming import SSEDecoder

API_KEY_ENV = "SHEAF_API_KEY"
DEFAULT_URL = "http://127.0.0.1:3000"
DEFAULT_TIMEOUT = httpx.Timeout(300.0, connect=10.0)
RESPONSES: dict[str, type[BaseResponse]] = {
    "flux": DiffusionResponse,
    "whisper": TranscriptionResponse,
    "textgen": TextGenerationResponse,
    "forecast": ForecastResponse,
}
"""The response type of each shipped deployment, for a job's result."""
RESUME_TRIES = 5  # reconnections in a row, each after a longer wait, before `events` gives up


def deployment_of(job_id: str) -> str:
    """The deployment a job id belongs to (ids are `{name}-{hex}`)."""
    name, dash, rest = job_id.partition("-")
    if not (dash and name and rest):
        raise ValueError(f"not a job id: {job_id!r}")
    return name


class _JobEvents:
    """A job's SSE event log as typed events, remembering the last id for a resume."""

    def __init__(self, job_id: str, response_model: type[BaseResponse] | None, after: int) -> None:
        self.name = deployment_of(job_id)
        self.path = f"/{self.name}/jobs/{job_id}/events"
        self.response_model = response_model or RESPONSES.get(self.name, BaseResponse)
        self.last = after
        self.finished = False
        self.failures = 0  # reconnections since the last event

    def start(self) -> SSEDecoder:
        return SSEDecoder()

    @property
    def headers(self) -> dict[str, str]:
        return {"last-event-id": str(self.last)}

    def feed(self, decoder: SSEDecoder, chunk: bytes) -> Iterator[JobEvent]:
        """The chunk's events one by one: those before an `error` event reach the caller before it raises."""
        for event_id, payload in decoder.feed_with_ids(chunk):
            if self.finished:
                raise StreamError("the server sent events after the final one")
            if event_id is not None:
                self.last = int(event_id)
            self.failures = 0
            event = parse_job_event(payload, self.response_model)
            if isinstance(event, ErrorEvent):
                raise StreamError(event.error, event.code)
            self.finished = bool(payload.get("done"))
            yield event

    def retry_in(self, cause: Exception) -> float:
        """How long to wait before the next try; raises once it has failed RESUME_TRIES times running."""
        self.failures += 1
        if self.failures > RESUME_TRIES:
            if isinstance(cause, httpx.TransportError):
                raise TransportError(str(cause) or type(cause).__name__) from cause
            raise StreamError(str(cause)) from cause
        return float(min(0.25 * 2 ** (self.failures - 1), 4.0))


class _Cut(Exception):
    """A job's event stream ended cleanly before its last event (a proxy closed it)."""


def _body(request: BaseRequest[Any]) -> dict[str, Any]:
    return request.model_dump(mode="json")


def _check(response: httpx.Response) -> None:
    """Raise the typed error for a 4xx or 5xx answer (its body must have been read)."""
    if response.is_success:
        return
    try:
        payload = response.json()
    except ValueError:
        payload = None
    detail = payload["detail"] if isinstance(payload, dict) and "detail" in payload else response.text
    retry_after = response.headers.get("retry-after")
    raise _error(response.status_code, detail, float(retry_after) if retry_after else None)


# The lookup failure a detail's `type` names, at `["body", "feature_ref"]`.
_FEATURE_ERRORS = {kind.error_type: kind for kind in (FeatureRefInvalid, FeatureEntityNotFound, FeatureStoreFailed)}


def _error(status: int, detail: Any, retry_after: float | None = None) -> HTTPStatusError:
    """The typed error for an error answer: every answer the client reads, single or batched, goes through here."""
    problems = [item for item in detail if isinstance(item, dict)] if isinstance(detail, list) else []
    for item in problems:
        kind = _FEATURE_ERRORS.get(str(item.get("type")))
        if item.get("loc") == ["body", "feature_ref"] and kind is not None and kind.status_code == status:
            return kind(None, str(item.get("msg", "")))
    if status == 422:
        # Always a list of problems, as the server sends it; anything else becomes one about the whole body.
        problems = problems or [{"loc": ["body"], "msg": describe_detail(detail), "type": "value_error"}]
        return InvalidRequest(
            field_of(problems[0].get("loc", [])) or "body", str(problems[0].get("msg")), detail=problems
        )
    return (ClientError if status < 500 else ServerError)(status, detail, retry_after)


def _batch_results(
    requests: Sequence[BaseRequest[ResponseT]], response: httpx.Response
) -> list[ResponseT | HTTPStatusError]:
    _check(response)
    return [
        request.response_model.model_validate(outcome["body"])  # type: ignore[misc]
        if outcome["status"] == 200
        else _error(outcome["status"], outcome["body"].get("detail") if isinstance(outcome["body"], dict) else None)
        for request, outcome in zip(requests, response.json(), strict=True)
    ]


def _response(request: BaseRequest[ResponseT], response: httpx.Response) -> ResponseT:
    _check(response)
    return request.response_model.model_validate_json(response.content)  # type: ignore[return-value]


class _Events:
    """Turns an SSE byte stream into typed events; raises on an `error` event or a cut stream."""

    def __init__(self, request: BaseRequest[Any]) -> None:
        self.response_model = request.response_model
        self.decoder = SSEDecoder()
        self.finished = False

    def feed(self, chunk: bytes) -> Iterator[StreamEvent]:
        """The chunk's events one by one: those before an `error` event reach the caller before it raises
        (under load several events come in one write)."""
        for payload in self.decoder.feed(chunk):
            if self.finished:
                raise StreamError("the server sent events after the final one")
            event = parse_event(payload, self.response_model)
            if isinstance(event, ErrorEvent):
                raise StreamError(event.error, event.code)
            self.finished = isinstance(event, ResultEvent)
            yield event

    def close(self) -> None:
        if not self.finished:
            raise StreamError("the stream ended before its result")


def _auth_headers(api_key: str | None) -> dict[str, str]:
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV, "")
    return {"authorization": f"Bearer {key}"} if key else {}


class AsyncSheafClient:
    """Async client for every deployment of one sheaf server."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        **httpx_options: Any,
    ) -> None:
        """`api_key` (default: the `SHEAF_API_KEY` variable) is sent as `Authorization: Bearer` when set."""
        headers = {**_auth_headers(api_key), **httpx_options.pop("headers", {})}
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, headers=headers, **httpx_options)

    async def predict(self, name: str, request: BaseRequest[ResponseT]) -> ResponseT:
        try:
            response = await self._http.post(f"/{name}/predict", json=_body(request))
        except httpx.TransportError as exc:
            raise TransportError(str(exc) or type(exc).__name__) from exc
        return _response(request, response)

    async def stream(self, name: str, request: BaseRequest[ResponseT]) -> AsyncIterator[StreamEvent]:
        """Events as the server sends them; the last is a `ResultEvent` holding the typed response."""
        events = _Events(request)
        try:
            async with self._http.stream("POST", f"/{name}/stream", json=_body(request)) as response:
                if not response.is_success:
                    await response.aread()
                    _check(response)
                async for chunk in response.aiter_raw():
                    for event in events.feed(chunk):
                        yield event
        except httpx.TransportError as exc:
            raise TransportError(str(exc) or type(exc).__name__) from exc
        events.close()

    async def batch(self, name: str, requests: Sequence[BaseRequest[ResponseT]]) -> list[ResponseT | HTTPStatusError]:
        """Requests batched by the caller, in one call (at most the deployment's `max_batch_size`):
        each answer is its response, or the error that request alone got (not raised)."""
        try:
            response = await self._http.post(f"/{name}/batch", json=[_body(request) for request in requests])
        except httpx.TransportError as exc:
            raise TransportError(str(exc) or type(exc).__name__) from exc
        return _batch_results(requests, response)

    async def submit(self, name: str, request: BaseRequest[Any]) -> JobAccepted:
        """Queue a job: `{job_id, status, position}` at once; the work runs whether or not anyone reads it."""
        return JobAccepted.model_validate(await self._call("POST", f"/{name}/jobs", json=_body(request)))

    async def job(self, job_id: str) -> JobInfo:
        """Where the job is: queued (and its position), running (and its last progress), or finished."""
        return JobInfo.model_validate(await self._call("GET", f"/{deployment_of(job_id)}/jobs/{job_id}"))

    async def cancel(self, job_id: str) -> JobInfo:
        """Stop the job (a queued one never starts); where it is then."""
        return JobInfo.model_validate(await self._call("DELETE", f"/{deployment_of(job_id)}/jobs/{job_id}"))

    async def events(
        self, job_id: str, response_model: type[BaseResponse] | None = None, *, after: int = 0
    ) -> AsyncIterator[JobEvent]:
        """The job's events after the one numbered `after`, then live ones, to its last: a `ResultEvent`
        or a `CancelledEvent` (its `error` raises `StreamError`). A dropped connection is resumed
        from the last event received, with none missed and none twice."""
        log = _JobEvents(job_id, response_model, after)
        while not log.finished:
            try:
                async with self._http.stream("GET", log.path, headers=log.headers) as response:
                    if not response.is_success:
                        await response.aread()
                        _check(response)
                    decoder = log.start()
                    async for chunk in response.aiter_raw():
                        for event in log.feed(decoder, chunk):
                            yield event
                if not log.finished:
                    raise _Cut("the job's events ended before its last one")
            except (httpx.TransportError, _Cut) as exc:  # dropped: resume from the last event
                await asyncio.sleep(log.retry_in(exc))

    async def _call(self, method: str, path: str, **options: Any) -> dict[str, Any]:
        try:
            response = await self._http.request(method, path, **options)
        except httpx.TransportError as exc:
            raise TransportError(str(exc) or type(exc).__name__) from exc
        _check(response)
        result: dict[str, Any] = response.json()
        return result

    async def health(self, name: str) -> dict[str, Any]:
        return await self._get(f"/{name}/health")

    async def ready(self, name: str) -> dict[str, Any]:
        """`{"status": "ready", "model": name}`; raises `ServerError` (503) while the model loads."""
        return await self._get(f"/{name}/ready")

    async def _get(self, path: str) -> dict[str, Any]:
        try:
            response = await self._http.get(path)
        except httpx.TransportError as exc:
            raise TransportError(str(exc) or type(exc).__name__) from exc
        _check(response)
        result: dict[str, Any] = response.json()
        return result

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class SheafClient:
    """Blocking client for every deployment of one sheaf server; the twin of `AsyncSheafClient`."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        **httpx_options: Any,
    ) -> None:
        """`api_key` (default: the `SHEAF_API_KEY` variable) is sent as `Authorization: Bearer` when set."""
        headers = {**_auth_headers(api_key), **httpx_options.pop("headers", {})}
        self._http = httpx.Client(base_url=base_url, timeout=timeout, headers=headers, **httpx_options)

    def predict(self, name: str, request: BaseRequest[ResponseT]) -> ResponseT:
        try:
            response = self._http.post(f"/{name}/predict", json=_body(request))
        except httpx.TransportError as exc:
            raise TransportError(str(exc) or type(exc).__name__) from exc
        return _response(request, response)

    def stream(self, name: str, request: BaseRequest[ResponseT]) -> Iterator[StreamEvent]:
        """Events as the server sends them; the last is a `ResultEvent` holding the typed response."""
        events = _Events(request)
        try:
            with self._http.stream("POST", f"/{name}/stream", json=_body(request)) as response:
                if not response.is_success:
                    response.read()
                    _check(response)
                for chunk in response.iter_raw():
                    yield from events.feed(chunk)
        except httpx.TransportError as exc:
            raise TransportError(str(exc) or type(exc).__name__) from exc
        events.close()

    def batch(self, name: str, requests: Sequence[BaseRequest[ResponseT]]) -> list[ResponseT | HTTPStatusError]:
        """Requests batched by the caller, in one call (at most the deployment's `max_batch_size`):
        each answer is its response, or the error that request alone got (not raised)."""
        try:
            response = self._http.post(f"/{name}/batch", json=[_body(request) for request in requests])
        except httpx.TransportError as exc:
            raise TransportError(str(exc) or type(exc).__name__) from exc
        return _batch_results(requests, response)

    def submit(self, name: str, request: BaseRequest[Any]) -> JobAccepted:
        """Queue a job: `{job_id, status, position}` at once; the work runs whether or not anyone reads it."""
        return JobAccepted.model_validate(self._call("POST", f"/{name}/jobs", json=_body(request)))

    def job(self, job_id: str) -> JobInfo:
        """Where the job is: queued (and its position), running (and its last progress), or finished."""
        return JobInfo.model_validate(self._call("GET", f"/{deployment_of(job_id)}/jobs/{job_id}"))

    def cancel(self, job_id: str) -> JobInfo:
        """Stop the job (a queued one never starts); where it is then."""
        return JobInfo.model_validate(self._call("DELETE", f"/{deployment_of(job_id)}/jobs/{job_id}"))

    def events(
        self, job_id: str, response_model: type[BaseResponse] | None = None, *, after: int = 0
    ) -> Iterator[JobEvent]:
        """The job's events after the one numbered `after`, then live ones, to its last: a `ResultEvent`
        or a `CancelledEvent` (its `error` raises `StreamError`). A dropped connection is resumed
        from the last event received, with none missed and none twice."""
        log = _JobEvents(job_id, response_model, after)
        while not log.finished:
            try:
                with self._http.stream("GET", log.path, headers=log.headers) as response:
                    if not response.is_success:
                        response.read()
                        _check(response)
                    decoder = log.start()
                    for chunk in response.iter_raw():
                        yield from log.feed(decoder, chunk)
                if not log.finished:
                    raise _Cut("the job's events ended before its last one")
            except (httpx.TransportError, _Cut) as exc:  # dropped: resume from the last event
                time.sleep(log.retry_in(exc))

    def _call(self, method: str, path: str, **options: Any) -> dict[str, Any]:
        try:
            response = self._http.request(method, path, **options)
        except httpx.TransportError as exc:
            raise TransportError(str(exc) or type(exc).__name__) from exc
        _check(response)
        result: dict[str, Any] = response.json()
        return result

    def health(self, name: str) -> dict[str, Any]:
        return self._get(f"/{name}/health")

    def ready(self, name: str) -> dict[str, Any]:
        """`{"status": "ready", "model": name}`; raises `ServerError` (503) while the model loads."""
        return self._get(f"/{name}/ready")

    def _get(self, path: str) -> dict[str, Any]:
        try:
            response = self._http.get(path)
        except httpx.TransportError as exc:
            raise TransportError(str(exc) or type(exc).__name__) from exc
        _check(response)
        result: dict[str, Any] = response.json()
        return result

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
