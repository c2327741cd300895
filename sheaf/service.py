"""The base of every deployment's BentoML service (`bentos/<name>.py`), and its settings.

A deployment service holds the model. Its process batches the predicts and streams it
receives (`sheaf.deployment`, one batch in the model at a time), so that N replicas of it batch
independently; the entry service (`sheaf.gateway`) only routes and relays. A service file
(`bentos/flux.py` reads top to bottom) reads its config with `deployment_config`, declares
`@bentoml.service(**service_settings(config))` on a `DeploymentService` subclass naming its
backend, and hands each typed API call to `answer_one`, `answer` or `frames`.

This module imports no model code: the backend is imported and loaded inside the worker.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import Annotated, Any, ClassVar, cast

import bentoml
import pydantic_core
from bentoml.validators import ContentType
from pydantic import BaseModel
from starlette.responses import Response

from sheaf.api.base import BaseRequest, ResponseT
from sheaf.batching import QueueFull
from sheaf.config import ConfigError, DeploymentConfig, config_dir, load_config
from sheaf.deployment import Deployment
from sheaf.disconnects import ClientGone, unless_disconnected
from sheaf.logs import show_sheaf_logs
from sheaf.outcomes import OUTCOME_STATUS, Outcome, error_outcome

TIMEOUT_MARGIN_S = 30.0
# Named, so that BentoML does not build the output's JSON schema on every response to learn it.
JSON = ContentType("application/json")
# Any instance reads the request in flight (BentoML keeps it in a context variable).
_context = bentoml.Context()


def deployment_config(name: str, options: type[BaseModel] | None = None) -> DeploymentConfig | None:
    """`<config dir>/<name>.yaml`, validated (its `options:` too), or None when that file is absent
    (the deployment is not served then). A bad file stops start-up with its one-line message."""
    try:
        path = config_dir() / f"{name}.yaml"
        config = load_config(path, options) if path.exists() else None
    except ConfigError as exc:
        raise SystemExit(f"sheaf: config error: {exc}") from None
    if config is not None and config.name != name:  # the routes are this service's: /{name}/...
        raise SystemExit(f"sheaf: config error: {path}: name: must be {name!r}, the deployment it configures")
    return config


def service_settings(config: DeploymentConfig | None) -> dict[str, Any]:
    """`@bentoml.service(...)` arguments for a deployment."""
    if config is None:  # declared, never served
        return {}
    return {
        "name": config.name,
        "workers": config.workers,
        "resources": config.resources.model_dump(exclude_none=True),
        # Past the deadlines that sheaf enforces itself (504), so that BentoML's never cuts in first.
        "traffic": {"timeout": config.timeout_s + TIMEOUT_MARGIN_S},
        # The entry service logs, counts and traces each request; doing it again per hop costs CPU and
        # says nothing new. (sheaf's own series, `sheaf.metrics`, are recorded here all the same.)
        "logging": {"access": {"enabled": False}},
        "metrics": {"enabled": False},
        "tracing": {"excluded_urls": [".*"]},
    }


class DeploymentService:
    """What every deployment service does around its backend: load it, batch its predicts and streams."""

    deployment_config: ClassVar[DeploymentConfig | None]
    """None when the deployment is not configured, and so not served."""
    backend: ClassVar[str]
    """The backend class as an import string (`module:Class`), imported only in the worker."""

    def __init__(self) -> None:
        show_sheaf_logs()
        config = self.deployment_config
        if config is None:
            raise RuntimeError(f"{type(self).__name__} has no config: it should not be served")
        self.deployment = Deployment(config, self.backend)
        self.deployment.start()

    async def answer_one(self, request: BaseRequest[ResponseT]) -> ResponseT:
        """The request's outcome: its body as the client gets it, its status in a header, so that the
        entry service relays both undecoded. BentoML sends a Response as it is; the API's return
        annotation (the response model) is there for the schema."""
        (outcome,) = await self.answer([request])
        body = pydantic_core.to_json(outcome["body"], inf_nan_mode="null")
        status = {OUTCOME_STATUS: str(outcome["status"])}
        return cast(ResponseT, Response(body, media_type="application/json", headers=status))

    async def answer(self, requests: Sequence[BaseRequest[Any]]) -> list[Outcome]:
        """One outcome per request, in order, from one model call shared with other callers'
        requests; a list stays whole. A caller that leaves is never sent, or, once sent, stops
        the model call when it was the last one waiting on it."""
        config = self.deployment.config
        if len(requests) > config.batching.max_batch_size:
            limit = config.batching.max_batch_size
            return [error_outcome(422, f"at most {limit} requests per call, got {len(requests)}")] * len(requests)
        try:
            return await unless_disconnected(_context.request, self.deployment.submit(requests))
        except QueueFull as exc:
            retry = config.limits.retry_after_s
            busy = error_outcome(503, f"deployment {config.name} is busy: {exc}; retry after {retry} s")
            return [busy] * len(requests)
        except ClientGone:  # nobody reads the answer
            return [error_outcome(499, "the client closed the connection")] * len(requests)

    async def frames(self, request: BaseRequest[Any]) -> AsyncGenerator[str, None]:
        """The request's SSE frames as the backend yields events."""
        async with aclosing(self.deployment.stream(request)) as frames:
            async for frame in frames:
                yield frame

    async def checked(self, request: BaseRequest[Any]) -> Outcome:
        """The request's refusal before the model runs, or 200 (each service's `check` API)."""
        return await self.deployment.check(request)

    @bentoml.api
    async def ready(self) -> Annotated[Outcome, JSON]:
        return self.deployment.ready()

    def __is_ready__(self) -> bool:
        """BentoML's `/readyz` (and the entry service's, which asks its dependencies): the model is in."""
        return self.deployment.loaded.is_set()
