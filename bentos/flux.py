"""Diffusion: a FLUX pipeline with LoRA adapters, progress streamed step by step."""

from collections.abc import AsyncGenerator
from typing import Annotated

import bentoml

from sheaf.api import DiffusionRequest, DiffusionResponse
from sheaf.options import FluxOptions
from sheaf.outcomes import Outcome
from sheaf.service import JSON, DeploymentService, deployment_config, service_settings

CONFIG = deployment_config("flux", FluxOptions)  # configs/flux.yaml; None: not served


@bentoml.service(**service_settings(CONFIG))
class Flux(DeploymentService):
    deployment_config = CONFIG
    backend = "sheaf.backends.flux:FluxBackend"

    @bentoml.api
    async def predict(self, request: DiffusionRequest) -> DiffusionResponse:
        return await self.answer_one(request)

    @bentoml.api
    async def batch(self, requests: list[DiffusionRequest]) -> Annotated[list[Outcome], JSON]:
        return await self.answer(requests)

    @bentoml.api
    async def check(self, request: DiffusionRequest) -> Annotated[Outcome, JSON]:
        return await self.checked(request)

    @bentoml.api
    async def stream(self, request: DiffusionRequest) -> AsyncGenerator[str, None]:
        async for frame in self.frames(request):
            yield frame
