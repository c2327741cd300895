"""BentoML glue for one deployment: a backend plus its config becomes a BentoML service.

The service is internal: the gateway (`sheaf.gateway`) faces clients. It offers

- `predict_batch`, batchable: BentoML's adaptive batching merges the gateway's single
  requests into one model call. Each request gets its own outcome,
  `{"status": int, "body": dict}`, so one request's error never fails its batch-mates.
- `stream`: SSE frames as the backend yields events. A failure before the first event is
  sent as an error event that also carries `status` and `body`, which the gateway turns
  into a plain HTTP error; a failure after it ends the stream with an `error` event.
- `ready`: whether the model has loaded.

This module imports no model code: the backend is imported and loaded inside the worker.
"""

import asyncio
import importlib
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any, TypeVar

import bentoml

from sheaf.api.base import BaseRequest
from sheaf.api.events import ResultEvent
from sheaf.backends.base import Backend
from sheaf.config import DeploymentConfig, config_dir, load_config
from sheaf.exceptions import InvalidRequest
from sheaf.logs import show_sheaf_logs
from sheaf.streaming import encode_event, error_event, iterate_in_thread

logger = logging.getLogger("sheaf.service")

F = TypeVar("F", bound=Callable[..., Any])

Outcome = dict[str, Any]
"""`{"status": 200, "body": response}` or `{"status": 4xx/5xx, "body": {"detail": ...}}`."""


def failure(exc: BaseException) -> Outcome:
    if isinstance(exc, InvalidRequest):
        return {"status": exc.status_code, "body": {"detail": exc.detail()}}
    return {"status": 500, "body": {"detail": f"{type(exc).__name__}: {exc}"}}


def _import_backend(path: str) -> type[Backend[Any, Any]]:
    module, _, name = path.partition(":")
    backend: type[Backend[Any, Any]] = getattr(importlib.import_module(module), name)
    return backend


def deployment_service(
    config_name: str, *, request_model: type[BaseRequest[Any]], backend: str
) -> bentoml.Service[Any] | None:
    """The BentoML service for `<config dir>/<config_name>.yaml`, or None when that file is absent.

    `backend` is an import string (`module:Class`); it is imported only inside the worker
    process, so that importing the service module stays cheap (no torch).
    """
    path = config_dir() / f"{config_name}.yaml"
    if not path.exists():
        return None
    config = load_config(path)
    request_model_ = request_model

    class Deployment:
        request_model = request_model_

        def __init__(self) -> None:
            show_sheaf_logs()
            self.config: DeploymentConfig = config
            self.backend = _import_backend(config.backend or backend)(config)
            self.loaded = threading.Event()
            self.load_error: str | None = None
            # Load off the start-up path: health answers at once and ready says when the model is in.
            threading.Thread(target=self._load, name=f"load-{config.name}", daemon=True).start()

        def _load(self) -> None:
            started = time.perf_counter()
            try:
                self.backend.load()
            except Exception as exc:
                self.load_error = f"{type(exc).__name__}: {exc}"
                logger.exception("deployment %s failed to load", config.name)
            else:
                self.loaded.set()
                logger.info("deployment %s loaded in %.1f s", config.name, time.perf_counter() - started)

        def _unavailable(self) -> Outcome | None:
            if self.loaded.is_set():
                return None
            detail = f"model failed to load: {self.load_error}" if self.load_error else "model is loading"
            return {"status": 503, "body": {"detail": detail}}

        @bentoml.api(
            batchable=True,
            max_batch_size=config.batching.max_batch_size,
            max_latency_ms=config.batching.max_latency_ms,
        )
        @typed(requests=list[request_model])  # type: ignore[valid-type]
        async def predict_batch(self, requests: list[BaseRequest[Any]]) -> list[Outcome]:
            if unavailable := self._unavailable():
                return [unavailable] * len(requests)
            try:
                outcomes = await asyncio.to_thread(self.backend.predict_batch, requests)
            except Exception as exc:  # the model call itself failed: every request of it gets the error
                logger.exception("batch of %d failed on %s", len(requests), config.name)
                return [failure(exc)] * len(requests)
            if len(outcomes) != len(requests):
                mismatch = RuntimeError(f"backend answered {len(outcomes)} outcomes for {len(requests)} requests")
                return [failure(mismatch)] * len(requests)
            return [_outcome(outcome) for outcome in outcomes]

        @bentoml.api
        @typed(request=request_model)
        async def stream(self, request: BaseRequest[Any]) -> AsyncGenerator[str, None]:
            if unavailable := self._unavailable():
                yield encode_event({"type": "error", "done": True, "error": "unavailable", **unavailable})
                return
            started = False
            try:
                events = iterate_in_thread(lambda cancel: self.backend.stream(request, cancel))
                async with aclosing(events):
                    async for event in events:
                        started = True
                        yield encode_event(event)
                        if isinstance(event, ResultEvent):
                            return
                raise RuntimeError("the backend ended the stream without a result")
            except Exception as exc:
                if started:
                    logger.exception("stream %s failed after it began", request.request_id)
                    yield encode_event(error_event(exc))
                else:
                    yield encode_event({**error_event(exc).model_dump(), **failure(exc)})

        @bentoml.api
        async def ready(self) -> dict[str, Any]:
            if unavailable := self._unavailable():
                return unavailable
            return {"status": 200, "body": {"status": "ready", "model": config.name}}

    Deployment.__name__ = Deployment.__qualname__ = f"{config.name.title()}Deployment"
    return bentoml.service(name=config.name, traffic={"timeout": config.timeout_s})(Deployment)


def typed(**annotations: Any) -> Callable[[F], F]:
    """Give an API method its deployment's request type, which BentoML reads from the
    annotations to validate bodies and write the schema (a type only known at run time)."""

    def annotate(func: F) -> F:
        func.__annotations__.update(annotations)
        return func

    return annotate


def _outcome(outcome: Any) -> Outcome:
    if isinstance(outcome, BaseException):
        return failure(outcome)
    return {"status": 200, "body": outcome.model_dump(mode="json")}
