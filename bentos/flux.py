"""Diffusion: a FLUX pipeline with LoRA adapters, progress streamed step by step."""

from sheaf.api import DiffusionRequest
from sheaf.options import FluxOptions
from sheaf.service import deployment_service

Flux = deployment_service(
    "flux",  # configs/flux.yaml
    request_model=DiffusionRequest,
    backend="sheaf.backends.flux:FluxBackend",
    options=FluxOptions,
)
