"""Each built-in backend's `options:` section of a deployment config.

They live apart from the backends so that start-up can validate every config, with errors
naming the file and key, before any model code (torch) is imported.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sheaf.api.diffusion import AdapterWeight
from sheaf.config import ModelSource


class TextGenerationOptions(BaseModel):
    """`options:` of a text generation deployment."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens_limit: int = Field(1024, ge=1, description="Requests asking for more new tokens get 422.")


class AdapterSpec(BaseModel):
    """One LoRA adapter of a deployment, loaded once at start."""

    model_config = ConfigDict(extra="forbid")

    # peft keeps adapters in module dicts, whose keys may not contain dots.
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="What requests call it in `adapters`.")
    source: ModelSource
    weight: AdapterWeight = Field(1.0, description="Its weight when a request gives none: from -10 to 10.")


class FluxOptions(BaseModel):
    """`options:` of a FLUX deployment."""

    model_config = ConfigDict(extra="forbid")

    adapters: list[AdapterSpec] = []
    default_adapters: list[str] = Field([], description="Applied when a request's `adapters` is null.")
    max_pixels: int = Field(1024 * 1024, ge=64, description="Requests with more pixels (height x width) get 422.")
    preview_max_side: int = Field(128, ge=8, description="Longest side of a stream's preview images.")
    max_sequence_length: int = Field(
        512, ge=16, le=512, description="T5 prompt tokens; FLUX.1-schnell was trained with 256."
    )
    mixed_adapter_batches: bool = Field(
        True,
        description="Requests with different adapter selections share one pipeline call, each sample with its "
        "own adapters (per-sample LoRA); false groups them by selection, one call per selection.",
    )
    batch_invariant: bool = Field(
        True,
        description="Multiply one sample at a time so a seed's image never depends on its batch; "
        "false trades that for batch throughput (about 25% here on CPU).",
    )

    @model_validator(mode="after")
    def _defaults_are_configured(self) -> FluxOptions:
        names = [adapter.name for adapter in self.adapters]
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names must be unique, got: {', '.join(names)}")
        unknown = [name for name in self.default_adapters if name not in names]
        if unknown:
            raise ValueError(
                f"default_adapters names {', '.join(unknown)}, not among the configured adapters "
                f"({', '.join(names) or 'none'})"
            )
        if len(set(self.default_adapters)) != len(self.default_adapters):
            raise ValueError("default_adapters must not name an adapter twice")
        return self


class WhisperOptions(BaseModel):
    """`options:` of a speech-to-text deployment."""

    model_config = ConfigDict(extra="forbid")

    max_audio_seconds: float = Field(
        600,
        gt=0,
        description="Longer clips get 422, before any decoding. The default keeps a clip to a minute or two of a "
        "small CPU worker: 5 minutes of speech took tiny.en 24 s batched, 57 s sequentially (as streams decode) "
        "on 2 busy cores.",
    )
    compute_type: str = Field("int8", description="CTranslate2 compute type: int8, float16, default ...")
    batched: bool | None = Field(
        None, description="Decode a batch in one BatchedInferencePipeline call; null takes the measured default."
    )


class ForecastOptions(BaseModel):
    """`options:` of a forecasting deployment."""

    model_config = ConfigDict(extra="forbid")

    max_horizon: int = Field(
        1024,
        ge=1,
        description="Requests asking for more steps get 422. Beyond the model's own `horizon_length`, "
        "each further `horizon_length` steps cost one more batched model call.",
    )
    max_history: int = Field(
        16384,
        ge=1,
        description="Requests with a longer `history` get 422. The model reads only the last "
        "`context_length` values of any history.",
    )
