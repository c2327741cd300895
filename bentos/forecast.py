"""Forecasting: TimesFM over a given history, or one looked up in the feature store."""

from collections.abc import AsyncGenerator
from typing import Annotated

import bentoml

from sheaf.api import ForecastRequest, ForecastResponse
from sheaf.options import ForecastOptions
from sheaf.outcomes import Outcome
from sheaf.service import JSON, DeploymentService, deployment_config, service_settings

CONFIG = deployment_config("forecast", ForecastOptions)  # configs/forecast.yaml; None: not served


@bentoml.service(**service_settings(CONFIG))
class Forecast(DeploymentService):
    deployment_config = CONFIG
    backend = "sheaf.backends.forecast:ForecastBackend"

    @bentoml.api
    async def predict(self, request: ForecastRequest) -> ForecastResponse:
        return await self.answer_one(request)

    @bentoml.api
    async def batch(self, requests: list[ForecastRequest]) -> Annotated[list[Outcome], JSON]:
        return await self.answer(requests)

    @bentoml.api
    async def check(self, request: ForecastRequest) -> Annotated[Outcome, JSON]:
        return await self.checked(request)

    @bentoml.api
    async def stream(self, request: ForecastRequest) -> AsyncGenerator[str, None]:
        async for frame in self.frames(request):
            yield frame
