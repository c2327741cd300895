"""`/v1/images/generations` on a diffusion deployment: OpenAI's request as `n` sheaf
`DiffusionRequest`s, run as one batch, and their images as OpenAI's `ImagesResponse` (b64_json)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sheaf.api import DiffusionRequest
from sheaf.openai_api.errors import bad_parameter, parsed

EXTENSIONS = ("negative_prompt", "num_inference_steps", "guidance_scale", "adapters", "adapter_weights")
"""sheaf's own diffusion fields, taken when a request carries them (`extra_body` in the `openai` package)."""

_SIZE = re.compile(r"^(\d+)x(\d+)$")


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    prompt: str
    n: int | None = Field(None, ge=1)
    size: str | None = None
    response_format: str | None = None
    seed: int | None = Field(None, ge=0, description="An extension: image i of the batch gets seed + i.")

    @field_validator("size")
    @classmethod
    def _width_by_height(cls, size: str | None) -> str | None:
        if size not in (None, "auto") and not _SIZE.match(size):
            raise ValueError("must be WIDTHxHEIGHT in pixels, such as 512x512")
        return size

    @field_validator("response_format")
    @classmethod
    def _base64_only(cls, response_format: str | None) -> str | None:
        if response_format not in (None, "b64_json"):
            raise ValueError("only `b64_json` is supported: this server hosts no image URLs")
        return response_format

    @classmethod
    def parse(cls, body: Any) -> ImageRequest:
        return parsed(cls, body)

    def to_sheaf(self, request_id: str, max_batch_size: int) -> list[DiffusionRequest]:
        count = self.n or 1
        if count > max_batch_size:
            raise bad_parameter("n", f"at most {max_batch_size} images per request (the deployment's max_batch_size)")
        fields: dict[str, Any] = {"prompt": self.prompt}
        if self.size not in (None, "auto"):
            width, height = (int(side) for side in self.size.split("x"))
            fields.update(width=width, height=height)
        fields.update({key: value for key, value in (self.model_extra or {}).items() if key in EXTENSIONS})
        return [
            parsed(
                DiffusionRequest,
                {**fields, "request_id": f"{request_id}-{i}", "seed": None if self.seed is None else self.seed + i},
                {"width": "size", "height": "size"},
            )
            for i in range(count)
        ]


def images_response(answers: list[dict[str, Any]], created: int) -> dict[str, Any]:
    first = answers[0]
    return {
        "created": created,
        "data": [
            {"b64_json": answer["image_b64"], "revised_prompt": None, "seed": answer["seed"]} for answer in answers
        ],
        "output_format": "png",
        "size": f"{first['width']}x{first['height']}",
        "sheaf": {"request_ids": [answer["request_id"] for answer in answers], **first.get("metadata", {})},
    }
