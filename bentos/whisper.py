"""Transcription: faster-whisper, segments streamed as they decode."""

from collections.abc import AsyncGenerator
from typing import Annotated

import bentoml

from sheaf.api import TranscriptionRequest, TranscriptionResponse
from sheaf.options import WhisperOptions
from sheaf.outcomes import Outcome
from sheaf.service import JSON, DeploymentService, deployment_config, service_settings

CONFIG = deployment_config("whisper", WhisperOptions)  # configs/whisper.yaml; None: not served


@bentoml.service(**service_settings(CONFIG))
class Whisper(DeploymentService):
    deployment_config = CONFIG
    backend = "sheaf.backends.whisper:WhisperBackend"

    @bentoml.api
    async def predict(self, request: TranscriptionRequest) -> TranscriptionResponse:
        return await self.answer_one(request)

    @bentoml.api
    async def batch(self, requests: list[TranscriptionRequest]) -> Annotated[list[Outcome], JSON]:
        return await self.answer(requests)

    @bentoml.api
    async def check(self, request: TranscriptionRequest) -> Annotated[Outcome, JSON]:
        return await self.checked(request)

    @bentoml.api
    async def stream(self, request: TranscriptionRequest) -> AsyncGenerator[str, None]:
        async for frame in self.frames(request):
            yield frame
