"""The entry service's routes: every deployment behind one host and port, per the wire contract.

For each deployment the gateway declares a `bentoml.depends` (BentoML runs it and says
where it listens; `sheaf.upstream` calls it) and serves

- `POST /{name}/predict`: one request, merged with concurrent ones into one call of the
  deployment's `predict_batch` (`sheaf.batching`);
- `POST /{name}/stream`: the deployment's SSE frames, relayed whole as they arrive;
- `POST /{name}/batch`: a list of requests the caller batched itself, answered with one
  `{"status", "body"}` outcome per request, in order;
- `GET /{name}/health` and `GET /{name}/ready`: probes (BentoML APIs are POST only, so
  these live in a small mounted app).

BentoML answers a body that fails validation with 400; `ValidationErrorsAs422` gives the
contract's 422 `{"detail": [...]}` instead.
"""

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager
from typing import Any

import bentoml
import pydantic_core
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sheaf import upstream
from sheaf.api.base import BaseRequest
from sheaf.batching import Batcher, QueueFull
from sheaf.config import DeploymentConfig, Limits
from sheaf.deployment import Outcome, error_outcome
from sheaf.logs import show_sheaf_logs
from sheaf.service import typed
from sheaf.streaming import encode_event, error_event

logger = logging.getLogger("sheaf.gateway")


def gateway_routes(*deployments: bentoml.Service[Any] | None) -> type:
    """A base class for the entry service: each deployment as a dependency, with its routes.

    BentoML finds the entry service by name in the module that `bentoml serve` imports, so
    it is declared there, then given the rest of the contract by `serve_contract`::

        @bentoml.service(name="sheaf")
        class Sheaf(gateway_routes(textgen.TextGen)): ...

        serve_contract(Sheaf)
    """
    members: dict[str, Any] = {"__init__": lambda self: show_sheaf_logs()}
    for service in deployments:
        if service is None:  # not configured in this config set
            continue
        members[service.name] = bentoml.depends(service)
        members.update(_routes(service))
    return type("GatewayRoutes", (), members)


def serve_contract(gateway: bentoml.Service[Any]) -> None:
    """Add the GET probes, the 413 for oversized bodies and the 422 for invalid ones to the entry service."""
    deployments = {name: dependency.on for name, dependency in gateway.dependencies.items()}
    gateway.mount_asgi_app(_probes(deployments), path="/", name="probes")
    gateway.add_asgi_middleware(ValidationErrorsAs422)
    limits = {
        f"/{name}/{route}": int(service.inner.deployment_config.max_body_mb * 1024 * 1024)
        for name, service in deployments.items()
        for route in ("predict", "stream", "batch")
    }
    gateway.add_asgi_middleware(RequestBodies, limits=limits)


def _api(name: str, route: str, func: Any) -> Any:
    func.__name__ = func.__qualname__ = name
    return bentoml.api(route=route)(func)


def _routes(deployment: bentoml.Service[Any]) -> dict[str, Any]:
    name = deployment.name
    request_model: type[BaseRequest[Any]] = deployment.inner.request_model
    config: DeploymentConfig = deployment.inner.deployment_config
    gate = Gate(config.limits)
    limit = config.batching.max_batch_size

    async def send(requests: list[BaseRequest[Any]]) -> list[Outcome]:
        """The deployment's outcomes, or one shared outcome when the gateway answers for it."""
        budget = config.timeout_for(*(request.timeout_s for request in requests))
        deadline = time.monotonic() + budget
        for attempt in (1, 2):
            try:
                return await upstream.predict_batch(deployment, requests, deadline - time.monotonic())
            except TimeoutError:
                return [_past_deadline(budget)] * len(requests)
            except Exception as exc:  # the deployment refused, or a pooled connection to it broke
                status = getattr(exc, "status", None)
                logger.warning("%s predict failed upstream: %s: %s", name, type(exc).__name__, exc)
                if status is None and attempt == 1:
                    continue  # predicts are safe to send again
                return [error_outcome(status or 502, f"deployment {name}: {exc}")] * len(requests)
        raise AssertionError("unreachable")

    queue_s = config.batching.max_latency_ms / 1000
    batcher = Batcher(send, max_batch_size=limit, slots=config.workers, max_queue_s=queue_s) if limit > 1 else None

    async def forward(requests: list[BaseRequest[Any]]) -> list[Outcome]:
        """`requests` answered together, in one batch with other callers' when batching is on."""
        if batcher is None:
            return await send(requests)
        budget = config.timeout_for(*(request.timeout_s for request in requests))
        try:
            return await asyncio.wait_for(batcher.submit(requests), budget)
        except TimeoutError:
            return [_past_deadline(budget)] * len(requests)
        except QueueFull as exc:
            retry = config.limits.retry_after_s
            return [error_outcome(503, f"deployment {name} is busy: {exc}; retry after {retry} s")] * len(requests)

    @typed(request=request_model, **{"return": request_model.response_model})
    async def predict(self: Any, request: BaseRequest[Any], /) -> Any:
        with gate.predicts(1) as admitted:
            (outcome,) = await forward([request]) if admitted else [gate.full("predict requests")]
        return _response(outcome, config)

    @typed(request=request_model)
    async def stream(self: Any, request: BaseRequest[Any], /, ctx: bentoml.Context) -> AsyncGenerator[str, None]:
        with gate.stream() as admitted:
            if not admitted:
                full = gate.full("streams")
                yield _http_error(ctx, full["status"], full["body"], config)
                return
            frames = upstream.stream(deployment, request)
            async for chunk in _relay(frames, ctx, config):
                yield chunk

    @typed(requests=list[request_model])  # type: ignore[valid-type]
    async def batch(self: Any, requests: list[BaseRequest[Any]], /) -> Any:
        if len(requests) > limit:
            problem = f"at most {limit} requests per call (this deployment's max_batch_size), got {len(requests)}"
            return JSONResponse({"detail": [{"loc": ["body"], "msg": problem, "type": "too_long"}]}, status_code=422)
        if not requests:
            return []
        with gate.predicts(len(requests)) as admitted:
            if not admitted:
                return _response(gate.full("predict requests"), config)
            return await forward(requests)

    return {
        f"{name}_predict": _api(f"{name}_predict", f"/{name}/predict", predict),
        f"{name}_stream": _api(f"{name}_stream", f"/{name}/stream", stream),
        f"{name}_batch": _api(f"{name}_batch", f"/{name}/batch", batch),
    }


class Gate:
    """Admission to one deployment: predicts pending and streams open, each under its limit.

    The entry service runs in one process, so plain counters are exact; a refusal is at once.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.pending = 0
        self.streams = 0

    @contextmanager
    def predicts(self, count: int) -> Iterator[bool]:
        admitted = self.pending + count <= self.limits.max_pending
        self.pending += count if admitted else 0
        try:
            yield admitted
        finally:
            self.pending -= count if admitted else 0

    @contextmanager
    def stream(self) -> Iterator[bool]:
        admitted = self.streams < self.limits.max_streams
        self.streams += admitted
        try:
            yield admitted
        finally:
            self.streams -= admitted

    def full(self, what: str) -> Outcome:
        limit = self.limits.max_streams if what == "streams" else self.limits.max_pending
        retry = self.limits.retry_after_s
        return error_outcome(503, f"this deployment is full ({limit} {what}); retry after {retry} s")


def _past_deadline(budget: float) -> Outcome:
    return error_outcome(504, f"no answer within the deadline of {budget:g} s")


def _response(outcome: Outcome, config: DeploymentConfig) -> JSONResponse:
    return JSONResponse(outcome["body"], status_code=outcome["status"], headers=_retry_after(outcome["status"], config))


def _retry_after(status: int, config: DeploymentConfig) -> dict[str, str]:
    """Every 429 and 503 says when to come back."""
    return {"retry-after": str(config.limits.retry_after_s)} if status in (429, 503) else {}


async def _relay(
    frames: AsyncGenerator[str, None], ctx: bentoml.Context, config: DeploymentConfig
) -> AsyncGenerator[str, None]:
    """Forward a deployment's SSE frames whole, as they arrive.

    Before anything is sent, an error frame carrying `status` becomes a plain HTTP error.
    After, a broken or truncated upstream still ends the stream with one `error` event.
    """
    buffer = ""
    sent_any = finished = False
    try:
        async for chunk in frames:
            buffer += chunk
            end = buffer.rfind("\n\n") + 2
            if end < 2:
                continue
            complete, buffer = buffer[:end], buffer[end:]
            start = complete.rfind("data: ", 0, -2)
            if start < 0:  # heartbeats only
                yield complete
                continue
            last = json.loads(complete[start + 6 : complete.index("\n\n", start)])
            if not sent_any and last["type"] == "error" and "status" in last:
                yield _http_error(ctx, last["status"], last["body"], config)
                return
            sent_any, finished = True, last["done"]
            yield complete
    except Exception as exc:
        logger.exception("relaying a stream failed")
        if not sent_any:
            yield _http_error(ctx, 502, {"detail": f"deployment failed: {type(exc).__name__}: {exc}"}, config)
            return
        yield encode_event(error_event(exc, code="upstream_error"))
        return
    finally:
        await frames.aclose()
    if not finished:
        yield encode_event(
            {"type": "error", "done": True, "error": "stream ended without a result", "code": "upstream_error"}
        )


def _http_error(ctx: bentoml.Context, status: int, body: dict[str, Any], config: DeploymentConfig) -> str:
    """Turn a stream that has sent nothing yet into a plain JSON error; returns the body to send."""
    ctx.response.status_code = status
    ctx.response.metadata["content-type"] = "application/json"
    ctx.response.metadata.update(_retry_after(status, config))
    return json.dumps(body)


def _probes(deployments: dict[str, bentoml.Service[Any]]) -> Starlette:
    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> JSONResponse:
        name = request.url.path.split("/")[1]
        try:
            outcome = await upstream.ready(deployments[name])
        except Exception as exc:  # the deployment's process is not up (yet)
            outcome = error_outcome(503, f"deployment {name} unreachable: {type(exc).__name__}")
        return JSONResponse(outcome["body"], status_code=outcome["status"])

    routes = [Route(f"/{name}/health", health, methods=["GET"]) for name in deployments]
    routes += [Route(f"/{name}/ready", ready, methods=["GET"]) for name in deployments]
    return Starlette(routes=routes)


class RequestBodies:
    """What reaches a deployment's routes is JSON within its `max_body_mb`.

    - 413 for a body over the limit, declared or chunked, before anything reads it;
    - any content type is read as JSON (BentoML would otherwise try multipart forms and fail
      with 500);
    - a `/batch` body that is not JSON is a 422 here: BentoML parses list bodies with
      `json.loads` and answers its errors (bad bytes, deep nesting, huge numbers) with 500.
    """

    def __init__(self, app: ASGIApp, limits: dict[str, int]) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limits.get(scope["path"]) if scope["type"] == "http" else None
        if limit is None:
            await self.app(scope, receive, send)
            return
        too_large = {"detail": f"request body is larger than this deployment's limit of {limit} bytes"}
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _answer(send, 413, too_large)
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > limit:
                await _answer(send, 413, too_large)
                return
            if not message.get("more_body"):
                break
        if scope["path"].endswith("/batch"):
            try:
                pydantic_core.from_json(body)
            except ValueError as exc:
                detail = [{"loc": ["body"], "msg": f"Invalid JSON: {exc}", "type": "json_invalid"}]
                await _answer(send, 422, {"detail": detail})
                return
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"content-type", b"content-length")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app({**scope, "headers": headers}, replay, send)


async def _answer(send: Send, status: int, body: dict[str, Any]) -> None:
    content = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})


class ValidationErrorsAs422:
    """Answer BentoML's 400 for a body that fails validation as the contract's 422 `{"detail": [...]}`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        held: Message | None = None
        body = b""

        async def send_rewritten(message: Message) -> None:
            nonlocal held, body
            if message["type"] == "http.response.start" and message["status"] == 400:
                held = message
                return
            if held is None:
                await send(message)
                return
            body += message.get("body", b"")
            if message.get("more_body"):
                return
            content = json.dumps({"detail": _validation_detail(body)}).encode()
            headers = [(k, v) for k, v in held["headers"] if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(content)).encode()))
            await send({**held, "status": 422, "headers": headers})
            await send({"type": "http.response.body", "body": content})

        await self.app(scope, receive, send_rewritten)


def _validation_detail(body: bytes) -> Any:
    """Pydantic's errors without the doc links, with `body` first in each location as FastAPI does."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body.decode(errors="replace")
    if not isinstance(payload, dict) or not isinstance(payload.get("detail"), list):
        return payload.get("error", payload) if isinstance(payload, dict) else payload
    return [
        {
            "loc": ["body", *_without_root(error.get("loc", []))],
            "msg": error.get("msg", ""),
            "type": error.get("type", ""),
        }
        for error in payload["detail"]
    ]


def _without_root(loc: list[Any]) -> list[Any]:
    """BentoML wraps a list body in a model whose one field is `root`; the caller never saw it."""
    return loc[1:] if loc[:1] == ["root"] else loc
