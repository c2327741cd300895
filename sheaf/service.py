"""BentoML glue for one deployment: a `sheaf.deployment.Deployment` served as a BentoML service.

The service is internal: the gateway (`sheaf.gateway`) faces clients. It offers
`predict_batch` (the batches that the gateway's `sheaf.batching` makes), `stream` (SSE
frames) and `ready`. This module imports no model code: the backend is imported and loaded
inside the worker.
"""

from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Annotated, Any, TypeVar

import bentoml
from bentoml.validators import ContentType
from pydantic import BaseModel

from sheaf.api.base import BaseRequest
from sheaf.config import config_dir, load_config
from sheaf.deployment import Deployment
from sheaf.disconnects import cancel_on_disconnect
from sheaf.logs import show_sheaf_logs
from sheaf.outcomes import Outcome

F = TypeVar("F", bound=Callable[..., Any])
TIMEOUT_MARGIN_S = 30.0
# Named, so that BentoML does not build the output's JSON schema on every response to learn it.
JSON = ContentType("application/json")


def deployment_service(
    config_name: str,
    *,
    request_model: type[BaseRequest[Any]],
    backend: str,
    options: type[BaseModel] | None = None,
) -> bentoml.Service[Any] | None:
    """The BentoML service for `<config dir>/<config_name>.yaml`, or None when that file is absent.

    The config, `options` included, is validated here, at start-up (`ConfigError`). `backend`
    is an import string (`module:Class`), imported only inside the worker process, so that
    importing the service module stays cheap (no torch).
    """
    path = config_dir() / f"{config_name}.yaml"
    if not path.exists():
        return None
    config = load_config(path, options)
    request_model_ = request_model

    class Service:
        request_model = request_model_
        deployment_config = config
        config_path = path

        def __init__(self) -> None:
            show_sheaf_logs()
            self.deployment = Deployment(config, backend)
            self.deployment.start()

        @bentoml.api
        @typed(requests=list[request_model])  # type: ignore[valid-type]
        async def predict_batch(
            self, requests: list[BaseRequest[Any]], ctx: bentoml.Context
        ) -> Annotated[list[Outcome], JSON]:
            # The entry service closes the connection once every caller of the batch has gone.
            async with cancel_on_disconnect(ctx.request) as cancel:
                return await self.deployment.predict(requests, cancel)

        @bentoml.api
        @typed(request=request_model)
        async def stream(self, request: BaseRequest[Any]) -> AsyncGenerator[str, None]:
            async with aclosing(self.deployment.stream(request)) as frames:
                async for frame in frames:
                    yield frame

        @bentoml.api
        async def ready(self) -> Annotated[Outcome, JSON]:
            return self.deployment.ready()

        def __is_ready__(self) -> bool:
            """BentoML's `/readyz` (and the entry service's, which asks its dependencies): the model is in."""
            return self.deployment.loaded.is_set()

    Service.__name__ = Service.__qualname__ = f"{config.name.title()}Service"
    resources = config.resources.model_dump(exclude_none=True)
    return bentoml.service(
        name=config.name,
        workers=config.workers,
        resources=resources,
        # Past the deadlines that sheaf enforces itself (504), so that BentoML's never cuts in first.
        traffic={"timeout": config.timeout_s + TIMEOUT_MARGIN_S},
        # The gateway logs and counts each request; doing it again per hop costs CPU and says
        # nothing new. (sheaf's own series, `sheaf.metrics`, are recorded here all the same.)
        logging={"access": {"enabled": False}},
        metrics={"enabled": False},
    )(Service)


def typed(**annotations: Any) -> Callable[[F], F]:
    """Give an API method its deployment's request type, which BentoML reads from the
    annotations to validate bodies and write the schema (a type only known at run time)."""

    def annotate(func: F) -> F:
        func.__annotations__.update(annotations)
        return func

    return annotate
