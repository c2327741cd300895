"""The entry service's side of each deployment, per the wire contract: it routes, admits,
enforces deadlines and relays; the deployment's own process batches (`sheaf.service`).

`bentos/gateway.py` declares the routes; each hands its call to the deployment's `Lane`:

- `POST /{name}/predict`: one request, sent to the deployment's `predict`;
- `POST /{name}/stream`: the deployment's SSE frames, relayed whole as they arrive;
- `POST /{name}/batch`: a list of requests the caller batched itself, each item validated
  on its own (`BatchItem`), answered with one `{"status", "body"}` outcome per request;
- `GET /{name}/health` and `GET /{name}/ready`: probes (BentoML APIs are POST only, so
  these live in a small mounted app, `probes`, beside the job routes of `sheaf.job_routes`).

The contract's middlewares (`contract_middlewares`) turn BentoML's 400 for an invalid body
into the contract's 422, oversized bodies into 413, and unknown deployments into a 404.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Sequence
from contextlib import aclosing, contextmanager
from typing import Annotated, Any, ClassVar, NamedTuple, TypeVar, cast, get_type_hints

import bentoml
from pydantic import ValidationError, ValidatorFunctionWrapHandler, WrapValidator
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from sheaf import auth, openai_api, shutdown, slow_clients, upstream
from sheaf.api.base import BaseRequest, ResponseT
from sheaf.config import SERVER_CONFIG_FILE, ConfigError, DeploymentConfig, Limits, config_dir, load_server_config
from sheaf.disconnects import ClientGone, unless_disconnected
from sheaf.jobs import JobBoard
from sheaf.logs import show_sheaf_logs
from sheaf.outcomes import Outcome, error_outcome
from sheaf.request_bodies import RequestBodies
from sheaf.streaming import ACCEPTED, HEARTBEAT, FrameRelay, encode_event, error_event
from sheaf.unknown_deployments import UnknownDeployments
from sheaf.validation_errors import ValidationErrorsAs422

logger = logging.getLogger("sheaf.gateway")


class Gateway:
    """The base of the entry service: one `Lane` per deployment it serves, and a log line once
    they are all ready. `bentos/gateway.py` declares the routes, each handing its call to a lane."""

    deployments: ClassVar[list[bentoml.Service[Any]]]
    """The deployments served, which the routes' `bentoml.depends` declare."""
    lanes: ClassVar[dict[str, Lane]]
    """Their lanes by name, shared with the mounted OpenAI routes (`sheaf.openai_api`): one set
    of limits per deployment."""
    jobs: ClassVar[JobBoard]
    """Their jobs (`sheaf.jobs`), which the mounted job routes answer too."""

    def __init__(self) -> None:
        show_sheaf_logs()

    @bentoml.on_startup  # type: ignore[untyped-decorator]
    async def announce_when_ready(self) -> None:
        self.announcing = asyncio.ensure_future(_announce_when_ready(self.deployments))

    @bentoml.on_startup  # type: ignore[untyped-decorator]
    async def start_jobs(self) -> None:
        await self.jobs.start()

    @bentoml.on_shutdown  # type: ignore[untyped-decorator]
    async def stop_jobs(self) -> None:
        await self.jobs.stop()


async def _announce_when_ready(deployments: list[bentoml.Service[Any]]) -> None:
    """One log line once every deployment has loaded, with the URLs to use."""
    while not await all_ready(deployments):
        await asyncio.sleep(0.5)
    base = _listening_url()
    routes = ", ".join(f"{base}/{deployment.name}/predict" for deployment in deployments)
    logger.info(
        "sheaf: every deployment is ready; playground at %s/ui ; Swagger at %s/ ; predict at %s", base, base, routes
    )


def contract_middlewares(deployments: list[bentoml.Service[Any]]) -> list[tuple[type, dict[str, Any]]]:
    """The entry service's ASGI middlewares, outermost first: shutdown bounds, the API key, the 404
    for unknown deployments, the 413 for oversized bodies and the 422 for invalid ones. Also sets
    the deadlines on slow clients' headers and bodies, for the uvicorn server this worker starts next.

    Its settings come from `sheaf.yaml`: an error stops `bentoml serve` at import, before any worker."""
    folder = config_dir()
    try:
        server = load_server_config(folder)
        key = auth.api_key(server.auth, str(folder / SERVER_CONFIG_FILE))
    except ConfigError as exc:
        raise SystemExit(f"sheaf: config error: {exc}") from None
    slow_clients.install(server.client_timeouts.headers_s, server.client_timeouts.body_s)
    names = [deployment.name for deployment in deployments]
    limits = {
        f"/{deployment.name}/{route}": int(_config(deployment).max_body_mb * 1024 * 1024)
        for deployment in deployments
        for route in ("predict", "stream", "batch", "jobs")
    }
    contract = frozenset(limits)
    # The OpenAI routes name their deployment inside the body: they get the largest limit.
    largest = max(limits.values(), default=0)
    limits.update(
        {f"{openai_api.PREFIX}{route}": largest for route in (*openai_api.JSON_ROUTES, *openai_api.FORM_ROUTES)}
    )
    forms = frozenset(f"{openai_api.PREFIX}{route}" for route in openai_api.FORM_ROUTES)
    # A SIGTERM bounds every request; a caller without the key gets nothing else to run.
    middlewares: list[tuple[type, dict[str, Any]]] = [(shutdown.Drain, {"grace_s": server.shutdown_grace_s})]
    if key is not None:
        middlewares.append((auth.APIKey, {"key": key, "open_paths": auth.open_paths(server.auth, names)}))
    middlewares += [
        (ValidationErrorsAs422, {"paths": contract}),
        (UnknownDeployments, {"deployments": names}),
        (RequestBodies, {"limits": limits, "forms": forms}),
    ]
    return middlewares


def _config(deployment: bentoml.Service[Any]) -> DeploymentConfig:
    config: DeploymentConfig | None = deployment.inner.deployment_config
    if config is None:
        raise RuntimeError(f"deployment {deployment.name} is not configured")
    return config


class Lane:
    """The entry service's side of one deployment: admission, the request's deadline, the call
    to the deployment's process (which batches), and the relay of its streams."""

    def __init__(self, deployment: bentoml.Service[Any]) -> None:
        self.deployment = deployment
        self.name = deployment.name
        self.config = _config(deployment)
        self.gate = Gate(self.config.limits)
        self.request_type: type[BaseRequest[Any]] = get_type_hints(deployment.inner.predict.func)["request"]
        """What the deployment's `predict` takes, as its service declares it."""

    async def predict(self, request: BaseRequest[ResponseT], ctx: bentoml.Context) -> ResponseT:
        answer = await self.answer(request, ctx.request)
        ctx.response.status_code = answer.status
        ctx.response.metadata.update(self.retry_after(answer.status))
        # The answer's body is already the client's JSON, sent as it is; the route's return
        # annotation (the response model) is there for the schema.
        return cast(ResponseT, Response(answer.body, media_type="application/json"))

    async def answer(self, request: BaseRequest[Any], client: Request) -> upstream.Answer:
        """The deployment's answer to one request, its status and JSON body undecoded; or the entry
        service's own (503 when full, 504 past the deadline, 502 when the deployment fails)."""
        with self.gate.predicts(1) as admitted:
            if not admitted:
                return _answer(self.gate.full("predict requests"))
            budget = self.config.timeout_for(request.timeout_s)
            try:
                answer = await unless_disconnected(
                    client,
                    self._upstream(
                        budget,
                        lambda left, fresh: upstream.predict(self.deployment, request, left, fresh),
                        request.request_id,
                    ),
                )
            except ClientGone:  # nobody reads the answer; leaving closes the call to the deployment
                return _answer(error_outcome(499, "the client closed the connection"))
        return _answer(answer) if isinstance(answer, dict) else answer

    async def batch(self, requests: Sequence[BaseRequest[Any] | InvalidItem], ctx: bentoml.Context) -> list[Outcome]:
        outcomes = await self.outcomes(requests, ctx.request)
        if isinstance(outcomes, list):
            return outcomes
        return cast(list[Outcome], _response(ctx, outcomes, self.config))  # the whole call refused

    async def outcomes(
        self, requests: Sequence[BaseRequest[Any] | InvalidItem], client: Request
    ) -> list[Outcome] | Outcome:
        """One outcome per request, in order, from one call to the deployment; or one outcome that
        refuses the whole call (too many requests, the deployment full, the client gone)."""
        limit = self.config.batching.max_batch_size
        if len(requests) > limit:
            problem = f"at most {limit} requests per call (this deployment's max_batch_size), got {len(requests)}"
            return error_outcome(422, [{"loc": ["body"], "msg": problem, "type": "too_long"}])
        outcomes: list[Outcome | None] = [r.outcome() if isinstance(r, InvalidItem) else None for r in requests]
        valid = [r for r in requests if not isinstance(r, InvalidItem)]
        if not valid:
            return cast(list[Outcome], outcomes)
        with self.gate.predicts(len(valid)) as admitted:
            if not admitted:
                return self.gate.full("predict requests")
            budget = self.config.timeout_for(*(request.timeout_s for request in valid))
            try:
                answers = await unless_disconnected(
                    client,
                    self._upstream(
                        budget,
                        lambda left, fresh: upstream.batch(self.deployment, valid, left, fresh),
                        f"a list of {len(valid)}",
                    ),
                )
            except ClientGone:
                return error_outcome(499, "the client closed the connection")
        answered = iter([answers] * len(valid) if isinstance(answers, dict) else answers)
        return [outcome or next(answered) for outcome in outcomes]

    def retry_after(self, status: int) -> dict[str, str]:
        """Every 429 and 503 says when to come back."""
        return _retry_after(status, self.config)

    async def _upstream(self, budget: float, call: Callable[[float, bool], Awaitable[T]], label: str) -> T | Outcome:
        """`call`'s answer (given the seconds left, and whether to use a new connection), or the
        outcome that the entry service answers instead: 504 past `budget`, or the deployment's
        failure. A broken connection is tried once more over a new one: when a replica dies, the
        pool may still hold other connections to it."""
        deadline = time.monotonic() + budget
        for attempt in (1, 2):
            try:
                return await call(deadline - time.monotonic(), attempt == 2)
            except TimeoutError:
                return error_outcome(504, f"no answer within the deadline of {budget:g} s")
            except Exception as exc:  # the deployment refused, or a pooled connection to it broke
                status = getattr(exc, "status", None)
                kind = type(exc).__name__
                logger.warning("%s predict %s failed upstream (try %d): %s: %s", self.name, label, attempt, kind, exc)
                if status is None and attempt == 1:
                    continue  # predicts are safe to send again
                return error_outcome(status or 502, f"deployment {self.name}: {exc}")
        raise AssertionError("unreachable")

    async def stream(self, request: BaseRequest[Any], ctx: bentoml.Context) -> AsyncGenerator[str, None]:
        async with aclosing(self.relay(request)) as chunks:
            async for chunk in chunks:
                if isinstance(chunk, Refused):
                    yield _http_error(ctx, chunk.status, chunk.body, self.config)
                    return
                yield chunk

    async def relay(self, request: BaseRequest[Any]) -> AsyncGenerator[str | Refused, None]:
        """The deployment's SSE frames for `request`, relayed by `_relay`; or, before any frame,
        one `Refused`: the plain HTTP error to answer instead of a stream."""
        with self.gate.stream() as admitted:
            if not admitted:
                full = self.gate.full("streams")
                yield Refused(full["status"], full["body"])
                return
            frames = upstream.stream(self.deployment, request)
            async with aclosing(_relay(frames, self.config, self.config.timeout_for(request.timeout_s))) as relayed:
                async for chunk in relayed:
                    yield chunk


class Refused(NamedTuple):
    """A stream refused before it began: the status and JSON body to answer instead."""

    status: int
    body: dict[str, Any]


class Gate:
    """Admission to one deployment: predicts pending and streams open, each under its limit.

    Each entry-service process counts its own (it is one worker), so plain counters are exact and
    a refusal is at once; with N entry-service replicas a deployment admits up to N times the
    limits, which the README's "Replicas" says.
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


class InvalidItem:
    """A `/batch` item that failed validation; it is answered with its own 422."""

    def __init__(self, error: ValidationError) -> None:
        self.errors = error.errors(include_url=False, include_context=False, include_input=False)

    def outcome(self) -> Outcome:
        detail = [{"loc": ["body", *error["loc"]], "msg": error["msg"], "type": error["type"]} for error in self.errors]
        return error_outcome(422, detail)


def _invalid_item_kept(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    try:
        return handler(value)
    except ValidationError as exc:
        return InvalidItem(exc)


RequestT = TypeVar("RequestT", bound=BaseRequest[Any])
T = TypeVar("T")
BatchItem = Annotated[RequestT, WrapValidator(_invalid_item_kept)]
"""A `/batch` item: validated on its own, so that an invalid one is its own 422 outcome, not the call's."""


def _answer(outcome: Outcome) -> upstream.Answer:
    return upstream.Answer(outcome["status"], bytes(JSONResponse(outcome["body"]).body))


def _response(ctx: bentoml.Context, outcome: Outcome, config: DeploymentConfig) -> JSONResponse:
    # An API that takes `ctx` answers with ctx's status and headers, whatever the response says.
    ctx.response.status_code = outcome["status"]
    ctx.response.metadata.update(_retry_after(outcome["status"], config))
    return JSONResponse(outcome["body"])


def _retry_after(status: int, config: DeploymentConfig) -> dict[str, str]:
    """Every 429 and 503 says when to come back."""
    return {"retry-after": str(config.limits.retry_after_s)} if status in (429, 503) else {}


async def _relay(
    frames: AsyncGenerator[str, None], config: DeploymentConfig, budget: float
) -> AsyncGenerator[str | Refused, None]:
    """Forward a deployment's SSE frames whole, as they arrive, on the entry service's own clock.

    Before anything is sent, an error frame carrying `status` becomes a plain HTTP error
    (`Refused`), and the deadline a 504. Once the deployment has accepted the request (`: accepted`) or sent an
    event, the stream is 200: quiet spells get heartbeats and the deadline an `error` event,
    whatever the deployment does (it may be frozen). A broken or truncated upstream still ends
    the stream with one `error` event. Leaving (deadline, client gone) closes the upstream
    response, which cancels the deployment's stream.
    """
    chunks: asyncio.Queue[str | BaseException | None] = asyncio.Queue()

    async def pump() -> None:
        try:
            async for chunk in frames:
                chunks.put_nowait(chunk)
        except Exception as exc:
            chunks.put_nowait(exc)
        else:
            chunks.put_nowait(None)
        finally:
            await frames.aclose()

    pumping = asyncio.create_task(pump())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget
    frames_in = FrameRelay()
    started = finished = False
    last_sent = loop.time()  # heartbeats count from what the client last got, not from what came in
    try:
        while not finished:
            until = min(deadline, last_sent + config.heartbeat_s) if started else deadline
            try:
                # wait_for cancels only its own get(), never the pump reading the deployment.
                chunk = await asyncio.wait_for(chunks.get(), until - loop.time())
            except TimeoutError:
                if loop.time() < deadline:
                    last_sent = loop.time()
                    yield HEARTBEAT
                    continue
                detail = f"no result within the deadline of {budget:g} s"
                if not started:
                    yield Refused(504, {"detail": detail})
                    return
                yield encode_event({"type": "error", "done": True, "error": detail, "code": "deadline_exceeded"})
                return
            if chunk is None:
                break
            if isinstance(chunk, BaseException):
                raise chunk
            complete = frames_in.feed(chunk)
            if not complete:
                continue
            last = frames_in.last_event(complete)
            if last is None:  # comments only: the deployment's heartbeats (ours replace them) or its acceptance
                if not started and ACCEPTED in complete:
                    started, last_sent = True, loop.time()
                    yield ACCEPTED
                continue
            if not started and last["type"] == "error" and "status" in last:
                yield Refused(last["status"], last["body"])
                return
            started, finished, last_sent = True, last["done"], loop.time()
            yield complete
    except Exception as exc:
        logger.exception("relaying a stream failed")
        if not started:
            yield Refused(502, {"detail": f"deployment failed: {type(exc).__name__}: {exc}"})
            return
        yield encode_event(error_event(exc, code="upstream_error"))
        return
    finally:
        pumping.cancel()
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


def _listening_url() -> str:
    """Where this worker listens: BentoML hands it the listening socket as `--fd N`."""
    args = sys.argv
    fd = int(args[args.index("--fd") + 1]) if "--fd" in args else None
    if fd is None:
        return "http://127.0.0.1:3000"
    with socket.socket(fileno=os.dup(fd)) as listening:
        address = listening.getsockname()
    if isinstance(address, str):  # a Unix socket
        return f"http+unix://{address}"
    host, port = address[:2]
    return f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"


def tracing_settings() -> dict[str, Any]:
    """The entry service's `tracing` setting. With no exporter in BentoML's config, spans go nowhere,
    yet its middleware still builds three per request (about 0.3 ms of CPU): then it builds none.
    Set `tracing.exporter_type` in the BentoML config (`BENTOML_CONFIG`) and every request is traced."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    exporter = BentoMLContainer.config.tracing.exporter_type.get()
    return {} if exporter else {"excluded_urls": [".*"]}


def probes(served: list[bentoml.Service[Any]], more: Sequence[Route] = ()) -> Starlette:
    """GET routes: each deployment's probes, `/docs` (Swagger is BentoML's index page), and `more`
    (the job routes)."""

    deployments = {deployment.name: deployment for deployment in served}

    async def health(request: Request) -> JSONResponse:
        # Liveness of the deployment's process: it answers, loaded or not, within a short timeout.
        name = request.url.path.split("/")[1]
        try:
            await upstream.alive(deployments[name])
        except Exception as exc:  # frozen, dead, or restarting
            detail = f"deployment {name} does not answer: {type(exc).__name__}: {exc}".rstrip(": ")
            return JSONResponse({"status": "unavailable", "detail": detail}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> JSONResponse:
        name = request.url.path.split("/")[1]
        outcome = await _readiness(name, deployments[name])
        return JSONResponse(outcome["body"], status_code=outcome["status"])

    async def docs(request: Request) -> RedirectResponse:
        return RedirectResponse("/")

    routes = [Route(f"/{name}/health", health, methods=["GET"]) for name in deployments]
    routes += [Route(f"/{name}/ready", ready, methods=["GET"]) for name in deployments]
    routes.append(Route("/docs", docs, methods=["GET"]))
    return Starlette(routes=[*routes, *more])


async def _readiness(name: str, deployment: bentoml.Service[Any]) -> Outcome:
    try:
        return await upstream.ready(deployment)
    except upstream.UpstreamError as exc:  # it answered: loading, or failed to load
        return Outcome(status=exc.status, body=exc.body)
    except Exception as exc:  # the deployment's process is not up (yet)
        return error_outcome(503, f"deployment {name} unreachable: {type(exc).__name__}")


async def all_ready(deployments: list[bentoml.Service[Any]]) -> bool:
    """Whether every deployment has loaded its model."""
    outcomes = await asyncio.gather(*(_readiness(d.name, d) for d in deployments))
    return all(outcome["status"] == 200 for outcome in outcomes)
