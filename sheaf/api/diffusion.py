"""The `diffusion` contract."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from sheaf.api.base import BaseRequest, BaseResponse

MAX_ADAPTER_WEIGHT = 10.0
# Past a few units LoRA only saturates the image, and past float32's range it is NaN: a black image.
AdapterWeight = Annotated[float, Field(ge=-MAX_ADAPTER_WEIGHT, le=MAX_ADAPTER_WEIGHT, allow_inf_nan=False)]


class DiffusionResponse(BaseResponse):
    model_type: Literal["diffusion"] = "diffusion"
    image_b64: str = Field(description="The image as a base64 PNG.")
    height: int
    width: int
    seed: int = Field(description="The seed actually used: send it back to get the same image.")


class DiffusionRequest(BaseRequest[DiffusionResponse]):
    response_model = DiffusionResponse

    model_type: Literal["diffusion"] = "diffusion"
    prompt: str = Field(description="What to draw; not blank.")
    negative_prompt: str = ""
    height: int = Field(512, ge=8, le=4096, multiple_of=8)
    width: int = Field(512, ge=8, le=4096, multiple_of=8)
    num_inference_steps: int = Field(4, ge=1, le=200)
    guidance_scale: float = Field(0.0, ge=0.0, le=50.0)
    seed: int | None = Field(None, ge=0, lt=2**63, description="Null: the server picks one and returns it.")
    adapters: list[str] | None = Field(
        None, description="LoRA adapters to apply. Null: the deployment's default; []: none at all."
    )
    adapter_weights: list[AdapterWeight] | None = Field(
        None, description="One weight per adapter, a finite number from -10 to 10; null: their defaults."
    )
    preview_every: int = Field(0, ge=0, le=200, description="Stream only: a preview image every N steps; 0: none.")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("must not be blank")
        return prompt

    @model_validator(mode="after")
    def _weights_match_adapters(self) -> DiffusionRequest:
        if self.adapter_weights is not None and len(self.adapter_weights) != len(self.adapters or []):
            raise ValueError("`adapter_weights` must give one weight per adapter in `adapters`")
        if self.adapters is not None and len(set(self.adapters)) != len(self.adapters):
            raise ValueError("`adapters` must not name an adapter twice")
        return self
