"""The entry service: every configured deployment behind one host and port.

Each route hands its call to the deployment's `sheaf.gateway.Lane`, which admits it, bounds
it by its deadline and sends it to the deployment's process (where predicts are batched).
A deployment whose config is absent from the active config set is not served: its routes
class is left out of `Sheaf`. Adding a backend is a service module, a config and a routes class.
"""

from collections.abc import AsyncGenerator, Sequence
from typing import Any

import bentoml

from bentos.flux import Flux
from bentos.forecast import Forecast
from bentos.textgen import TextGen
from bentos.whisper import Whisper
from sheaf.api import (
    DiffusionRequest,
    DiffusionResponse,
    ForecastRequest,
    ForecastResponse,
    TextGenerationRequest,
    TextGenerationResponse,
    TranscriptionRequest,
    TranscriptionResponse,
)
from sheaf.api.jobs import JobAccepted
from sheaf.arbiter import private_control_sockets
from sheaf.config import check_config_dir
from sheaf.gateway import BatchItem, Gateway, Lane, contract_middlewares, probes, tracing_settings
from sheaf.job_routes import job_board, job_routes, submit
from sheaf.metrics import own_multiprocess_dir
from sheaf.openai_api import PREFIX as OPENAI_PREFIX
from sheaf.openai_api.routes import openai_app
from sheaf.outcomes import Outcome
from sheaf.service import TIMEOUT_MARGIN_S
from sheaf.ui import ui_app

# Before `bentoml serve` starts its servers: a metrics folder of this server's own (BentoML's
# default is shared by every server on the machine), and no unauthenticated control port.
own_multiprocess_dir()
private_control_sockets()


class FluxRoutes(Gateway):
    flux = bentoml.depends(Flux)

    @bentoml.api(route="/flux/predict")
    async def flux_predict(self, request: DiffusionRequest, /, ctx: bentoml.Context) -> DiffusionResponse:
        return await self.lanes["flux"].predict(request, ctx)

    @bentoml.api(route="/flux/stream")
    async def flux_stream(self, request: DiffusionRequest, /, ctx: bentoml.Context) -> AsyncGenerator[str, None]:
        async for chunk in self.lanes["flux"].stream(request, ctx):
            yield chunk

    @bentoml.api(route="/flux/jobs")
    async def flux_jobs(self, request: DiffusionRequest, /, ctx: bentoml.Context) -> JobAccepted:
        return await submit(self.jobs, "flux", request, ctx)  # type: ignore[no-any-return]

    @bentoml.api(route="/flux/batch")
    async def flux_batch(self, requests: list[BatchItem[DiffusionRequest]], /, ctx: bentoml.Context) -> list[Outcome]:
        return await self.lanes["flux"].batch(requests, ctx)


class ForecastRoutes(Gateway):
    forecast = bentoml.depends(Forecast)

    @bentoml.api(route="/forecast/predict")
    async def forecast_predict(self, request: ForecastRequest, /, ctx: bentoml.Context) -> ForecastResponse:
        return await self.lanes["forecast"].predict(request, ctx)

    @bentoml.api(route="/forecast/stream")
    async def forecast_stream(self, request: ForecastRequest, /, ctx: bentoml.Context) -> AsyncGenerator[str, None]:
        async for chunk in self.lanes["forecast"].stream(request, ctx):
            yield chunk

    @bentoml.api(route="/forecast/jobs")
    async def forecast_jobs(self, request: ForecastRequest, /, ctx: bentoml.Context) -> JobAccepted:
        return await submit(self.jobs, "forecast", request, ctx)  # type: ignore[no-any-return]

    @bentoml.api(route="/forecast/batch")
    async def forecast_batch(
        self, requests: list[BatchItem[ForecastRequest]], /, ctx: bentoml.Context
    ) -> list[Outcome]:
        return await self.lanes["forecast"].batch(requests, ctx)


class TextGenRoutes(Gateway):
    textgen = bentoml.depends(TextGen)

    @bentoml.api(route="/textgen/predict")
    async def textgen_predict(self, request: TextGenerationRequest, /, ctx: bentoml.Context) -> TextGenerationResponse:
        return await self.lanes["textgen"].predict(request, ctx)

    @bentoml.api(route="/textgen/stream")
    async def textgen_stream(
        self, request: TextGenerationRequest, /, ctx: bentoml.Context
    ) -> AsyncGenerator[str, None]:
        async for chunk in self.lanes["textgen"].stream(request, ctx):
            yield chunk

    @bentoml.api(route="/textgen/jobs")
    async def textgen_jobs(self, request: TextGenerationRequest, /, ctx: bentoml.Context) -> JobAccepted:
        return await submit(self.jobs, "textgen", request, ctx)  # type: ignore[no-any-return]

    @bentoml.api(route="/textgen/batch")
    async def textgen_batch(
        self, requests: list[BatchItem[TextGenerationRequest]], /, ctx: bentoml.Context
    ) -> list[Outcome]:
        return await self.lanes["textgen"].batch(requests, ctx)


class WhisperRoutes(Gateway):
    whisper = bentoml.depends(Whisper)

    @bentoml.api(route="/whisper/predict")
    async def whisper_predict(self, request: TranscriptionRequest, /, ctx: bentoml.Context) -> TranscriptionResponse:
        return await self.lanes["whisper"].predict(request, ctx)

    @bentoml.api(route="/whisper/stream")
    async def whisper_stream(self, request: TranscriptionRequest, /, ctx: bentoml.Context) -> AsyncGenerator[str, None]:
        async for chunk in self.lanes["whisper"].stream(request, ctx):
            yield chunk

    @bentoml.api(route="/whisper/jobs")
    async def whisper_jobs(self, request: TranscriptionRequest, /, ctx: bentoml.Context) -> JobAccepted:
        return await submit(self.jobs, "whisper", request, ctx)  # type: ignore[no-any-return]

    @bentoml.api(route="/whisper/batch")
    async def whisper_batch(
        self, requests: list[BatchItem[TranscriptionRequest]], /, ctx: bentoml.Context
    ) -> list[Outcome]:
        return await self.lanes["whisper"].batch(requests, ctx)


ROUTES: Sequence[tuple[bentoml.Service[Any], type[Gateway]]] = (
    (Flux, FluxRoutes),
    (Forecast, ForecastRoutes),
    (TextGen, TextGenRoutes),
    (Whisper, WhisperRoutes),
)
CONFIGURED = [(service, routes) for service, routes in ROUTES if service.inner.deployment_config is not None]
SERVED = [service for service, _ in CONFIGURED]
check_config_dir(served=[service.name for service in SERVED])
JOBS = job_board(SERVED)
LANES = {service.name: Lane(service) for service in SERVED}


@bentoml.asgi_app(probes(SERVED, job_routes(JOBS)), path="/", name="probes")
@bentoml.asgi_app(openai_app(LANES), path=OPENAI_PREFIX, name="openai")
@bentoml.asgi_app(ui_app(LANES), path="/ui", name="ui")
# BentoML's timeout only bounds the time to a stream's first byte; sheaf's own deadlines come first.
@bentoml.service(
    name="sheaf",
    traffic={"timeout": max(s.inner.deployment_config.timeout_s for s in SERVED) + TIMEOUT_MARGIN_S},
    tracing=tracing_settings(),
)
class Sheaf(*(routes for _, routes in CONFIGURED)):  # type: ignore[misc]
    """Serves /{name}/predict, /{name}/stream, /{name}/batch, /{name}/jobs, /{name}/health and /{name}/ready
    per deployment, and the OpenAI-compatible /v1 routes over the same lanes."""

    deployments = SERVED
    lanes = LANES
    jobs = JOBS


for middleware, options in contract_middlewares(SERVED):
    Sheaf.add_asgi_middleware(middleware, **options)
