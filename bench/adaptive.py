"""`make bench`'s other batcher: deployments whose predicts BentoML's adaptive batching merges
(`@bentoml.api(batchable=True)`), to set against sheaf's own batcher (`bentos/<name>.py`) on
the same load. Same config, same `Deployment`, same model; only the batcher differs.

Served on its own, one service per `bentoml serve`, e.g. `bench.adaptive:TextGenAdaptive`.
"""

from typing import Annotated, Any

import bentoml

from sheaf.api import DiffusionRequest, ForecastRequest, TextGenerationRequest
from sheaf.api.base import BaseRequest
from sheaf.config import DeploymentConfig
from sheaf.deployment import Deployment
from sheaf.options import FluxOptions, ForecastOptions, TextGenerationOptions
from sheaf.outcomes import Outcome
from sheaf.service import JSON, deployment_config, service_settings

MAX_BATCH_SIZE = 32  # as the bench's configs give sheaf's batcher
MAX_LATENCY_MS = 60_000  # BentoML's default: the longest a request may wait for its batch


class Adaptive:
    config: DeploymentConfig | None
    backend: str

    def __init__(self) -> None:
        assert self.config is not None, "served only with its config"
        self.deployment = Deployment(self.config, self.backend)
        self.deployment.start()

    async def answer(self, requests: list[BaseRequest[Any]]) -> list[Outcome]:
        return await self.deployment.predict(requests)

    def __is_ready__(self) -> bool:
        return self.deployment.loaded.is_set()


TEXTGEN = deployment_config("textgen", TextGenerationOptions)
FORECAST = deployment_config("forecast", ForecastOptions)
FLUX = deployment_config("flux", FluxOptions)


@bentoml.service(**service_settings(TEXTGEN))
class TextGenAdaptive(Adaptive):
    config, backend = TEXTGEN, "sheaf.backends.textgen:TextGenerationBackend"

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)  # type: ignore[untyped-decorator]
    async def predict(self, requests: list[TextGenerationRequest]) -> Annotated[list[Outcome], JSON]:
        return await self.answer(list(requests))


@bentoml.service(**service_settings(FORECAST))
class ForecastAdaptive(Adaptive):
    config, backend = FORECAST, "sheaf.backends.forecast:ForecastBackend"

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)  # type: ignore[untyped-decorator]
    async def predict(self, requests: list[ForecastRequest]) -> Annotated[list[Outcome], JSON]:
        return await self.answer(list(requests))


@bentoml.service(**service_settings(FLUX))
class FluxAdaptive(Adaptive):
    config, backend = FLUX, "sheaf.backends.flux:FluxBackend"

    @bentoml.api(batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)  # type: ignore[untyped-decorator]
    async def predict(self, requests: list[DiffusionRequest]) -> Annotated[list[Outcome], JSON]:
        return await self.answer(list(requests))
