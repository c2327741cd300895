"""Text generation: a transformers causal LM, streamed token by token."""

from collections.abc import AsyncGenerator
from typing import Annotated

import bentoml

from sheaf.api import TextGenerationRequest, TextGenerationResponse
from sheaf.options import TextGenerationOptions
from sheaf.outcomes import Outcome
from sheaf.service import JSON, DeploymentService, deployment_config, service_settings

CONFIG = deployment_config("textgen", TextGenerationOptions)  # configs/textgen.yaml; None: not served


@bentoml.service(**service_settings(CONFIG))
class TextGen(DeploymentService):
    deployment_config = CONFIG
    backend = "sheaf.backends.textgen:TextGenerationBackend"

    @bentoml.api
    async def predict(self, request: TextGenerationRequest) -> TextGenerationResponse:
        return await self.answer_one(request)

    @bentoml.api
    async def batch(self, requests: list[TextGenerationRequest]) -> Annotated[list[Outcome], JSON]:
        return await self.answer(requests)

    @bentoml.api
    async def check(self, request: TextGenerationRequest) -> Annotated[Outcome, JSON]:
        return await self.checked(request)

    @bentoml.api
    async def stream(self, request: TextGenerationRequest) -> AsyncGenerator[str, None]:
        async for frame in self.frames(request):
            yield frame
