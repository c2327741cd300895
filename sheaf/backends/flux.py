"""Image generation with a diffusers FluxPipeline: LoRA adapters per request, batched, streamed.

A predict batch is split into groups that can share one pipeline call: the same size, steps,
guidance and negative prompt. Requests with different adapter selections share a call too
(`mixed_adapter_batches`, on by default): each sample is computed with its own adapters and
weights (`sheaf.backends.mixed_lora`), and the pipeline's global LoRA selection never changes.
With it off, the selection is part of the group, and each group runs under the adapter lock
(`sheaf.lora.AdapterLock`), which applies the group's selection and keeps every other use of
the pipeline out until the call ends: LoRA selection in diffusers is global to the pipeline.

A request's image depends only on the request, never on the batch it shared. Batched float
math alone does not give that on CPU: small matrix products (the timestep and modulation
projections, the image tokens of small images) and small convolutions take other kernels,
with other rounding, when more samples share them. So every matrix product in the
transformer is computed one sample at a time (the same shapes as a request alone), the
prompts are encoded one at a time and the VAE decodes one image at a time; attention, norms,
element-wise math and the scheduler stay batched, as they compute each sample the same way
whatever the batch. The same seed gives the same PNG alone, in any batch, and streamed.

The request's `guidance_scale` is passed to the pipeline as is (guidance-distilled models
such as FLUX.1-dev embed it; schnell ignores it). A non-blank `negative_prompt` turns on true
classifier-free guidance at that same scale, which diffusers applies when it is above 1.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import diffusers
import torch
import torch.nn.functional as F
from PIL import Image

from sheaf.api.diffusion import MAX_ADAPTER_WEIGHT, DiffusionRequest, DiffusionResponse
from sheaf.api.events import ProgressEvent, ResultEvent
from sheaf.backends.base import (
    ADMITTED,
    Arrivals,
    BatchBackend,
    Cancelled,
    Emit,
    EveryEvent,
    elapsed_ms,
    loaded,
    torch_device,
)
from sheaf.backends.batch_invariance import per_sample_linears
from sheaf.backends.images import crop_center, png_b64
from sheaf.backends.mixed_lora import MixedAdapters, MixedAdaptersUnsupported
from sheaf.backends.prompt_limit import PromptLimit
from sheaf.config import DeploymentConfig, ModelSource
from sheaf.exceptions import InvalidRequest
from sheaf.lora import AdapterLock, LockWaitCancelled, Selection
from sheaf.options import FluxOptions
from sheaf.weights import weights_location

logger = logging.getLogger("sheaf.backends.flux")

# diffusers' annotations do not describe its pipelines (their loader mixins and most signatures are
# untyped), so the pipeline is handled as `Any` here rather than through a type that would mislead.
_diffusers: Any = diffusers

_SEED_BITS = 63
QUICK_CHECK_CHARS = 1000
"""Prompts up to this long (negative prompt included) are checked on the event loop: the T5 and CLIP
tokenizers take about 0.6 µs a character."""


@dataclass(frozen=True)
class _Shape:
    """What requests must share to run in one pipeline call (with the adapter selection)."""

    height: int
    width: int
    steps: int
    guidance_scale: float
    negative_prompt: str


@dataclass
class _Job:
    """A validated request: its adapter selection, the seed it runs with and its texts as they are encoded."""

    request: DiffusionRequest
    selection: Selection
    seed: int
    prompt: str
    negative_prompt: str

    @property
    def shape(self) -> _Shape:
        request = self.request
        return _Shape(
            request.height, request.width, request.num_inference_steps, request.guidance_scale, self.negative_prompt
        )

    @property
    def key(self) -> _GroupKey:
        return self.shape, self.selection


_GroupKey = tuple[_Shape, Selection]
StepCallback = Callable[[int, torch.Tensor], None]
"""Called after each denoising step with the 0-based step index and the packed latents."""


class FluxBackend(BatchBackend[DiffusionRequest, DiffusionResponse, _Job]):
    options_model = FluxOptions

    def __init__(self, config: DeploymentConfig) -> None:
        super().__init__(config)
        self._options: FluxOptions = self.options()
        self._default_weights = {adapter.name: adapter.weight for adapter in self._options.adapters}
        self._pipe: Any = None  # a diffusers FluxPipeline
        self._adapters: AdapterLock | None = None
        self._mixed: MixedAdapters | None = None  # per-sample LoRA, when on and the adapters allow it
        self._prompts: PromptLimit | None = None  # set by load(), from the T5 tokenizer

    @property
    def pipe(self) -> Any:
        return loaded(self._pipe, "the pipeline")

    @property
    def adapters(self) -> AdapterLock:
        """The lock every use of the pipeline holds; it also applies each run's adapter selection."""
        return loaded(self._adapters, "the pipeline")

    # -- loading -----------------------------------------------------------------------------

    def load(self) -> None:
        started = time.perf_counter()
        weights = _location(self.config.model)
        pipe = _diffusers.FluxPipeline.from_pretrained(weights, dtype=getattr(torch, self.config.dtype))
        pipe.to(torch_device(self.config.device))
        pipe.set_progress_bar_config(disable=True)  # a bar per call would flood the server log
        for adapter in self._options.adapters:
            pipe.load_lora_weights(_location(adapter.source), adapter_name=adapter.name)
        if self._options.batch_invariant:
            # After the adapters: their LoRA layers hold linear layers too, and must be covered.
            per_sample_linears(pipe.transformer)
        self._prompts = PromptLimit(pipe.tokenizer_2, self._options.max_sequence_length)
        self._pipe = pipe
        self._adapters = AdapterLock(self._apply_selection, deployment=self.config.name)
        if self._options.mixed_adapter_batches and self._options.adapters:
            try:
                self._mixed = MixedAdapters([pipe.transformer, pipe.text_encoder])
            except MixedAdaptersUnsupported as exc:
                logger.warning(
                    "%s: adapters grouped by selection: per-sample LoRA cannot take %s", self.config.name, exc
                )
            else:
                with self.adapters.hold(()):  # the layers' own LoRA off, for good: the hooks add each sample's
                    pass
        logger.info(
            "loaded %s from %s with %d adapter(s)%s on %s in %.1f s",
            self.config.name,
            weights,
            len(self._options.adapters),
            " (mixed batches)" if self._mixed else "",
            pipe.device,
            elapsed_ms(started) / 1000,
        )

    def _apply_selection(self, selection: Selection) -> None:
        """Make `selection` the pipeline's LoRA state; the lock calls it, so nothing else runs meanwhile."""
        pipe = self.pipe
        if not selection:
            pipe.disable_lora()  # off outright: an empty selection never inherits the last one
            return
        pipe.enable_lora()
        pipe.set_adapters([name for name, _ in selection], [weight for _, weight in selection])

    # -- requests ----------------------------------------------------------------------------

    def selection(self, request: DiffusionRequest) -> Selection:
        """The request's adapters with their weights, sorted by name; InvalidRequest for ones not configured."""
        names = self._options.default_adapters if request.adapters is None else request.adapters
        unknown = [name for name in names if name not in self._default_weights]
        if unknown:
            configured = ", ".join(self._default_weights) or "no adapters"
            raise InvalidRequest("adapters", f"unknown adapter {unknown[0]!r}; this deployment has: {configured}")
        if len(set(names)) != len(names):
            raise InvalidRequest("adapters", "must not name an adapter twice")
        if request.adapter_weights is None:
            weights = [self._default_weights[name] for name in names]
        elif len(request.adapter_weights) != len(names):
            raise InvalidRequest(
                "adapter_weights", f"gives {len(request.adapter_weights)} weights for {len(names)} adapters"
            )
        else:
            weights = list(request.adapter_weights)
        for weight in weights:  # the contract checks a parsed request; this one may have been built otherwise
            if not (math.isfinite(weight) and abs(weight) <= MAX_ADAPTER_WEIGHT):
                raise InvalidRequest(
                    "adapter_weights",
                    f"must be a finite number from {-MAX_ADAPTER_WEIGHT:g} to {MAX_ADAPTER_WEIGHT:g}; got {weight}",
                )
        return tuple(sorted(zip(names, weights, strict=True)))

    def predict(self, jobs: Sequence[_Job], cancel: threading.Event) -> list[DiffusionResponse | Exception]:
        outcomes: dict[int, DiffusionResponse | Exception] = {}
        for key, members in self._groups(jobs):
            group = [jobs[index] for index in members]
            run = self._run_group(key, group, [cancel] * len(group))
            if run.cancelled:
                raise Cancelled(f"denoising stopped after {run.steps} of {key[0].steps} steps")
            outcomes.update(zip(members, run.results(), strict=True))
        return [outcomes[index] for index in range(len(jobs))]

    def stream_batch(
        self,
        requests: Sequence[DiffusionRequest],
        cancels: Sequence[threading.Event],
        emit: Emit,
        arrivals: Arrivals | None = None,  # never given: flux does not join running calls
        streaming: Sequence[bool] | None = None,
    ) -> None:
        """Each group of compatible requests in one denoising loop: a progress event per step for each
        of its streams still listening, a preview for those that asked, then each one's image."""
        jobs, indices = self.prepare_streams(requests, emit)
        for index in indices:
            emit(index, ADMITTED)  # the adapter lock may keep it waiting: say at once that it is accepted
        for key, members in self._groups(jobs):
            where = [indices[member] for member in members]

            def progress(row: int, event: ProgressEvent, where: list[int] = where) -> None:
                emit(where[row], event)

            watching = [streaming is None or streaming[i] for i in where]  # a predict gets no progress or previews
            run = self._run_group(
                key, [jobs[member] for member in members], [cancels[i] for i in where], progress, watching
            )
            for row, (index, result) in enumerate(zip(where, run.outcomes, strict=True)):
                if result is None:  # its client left (or every one of the group did)
                    steps = run.left[row] or run.steps
                    logger.info("stream %s cancelled after %d steps", requests[index].request_id, steps)
                else:
                    emit(index, result if isinstance(result, Exception) else ResultEvent(response=result))

    def _groups(self, jobs: Sequence[_Job]) -> list[tuple[_GroupKey, list[int]]]:
        """The indices of `jobs` that can share one pipeline call, by group: those whose adapter
        selection is active first, then the rest by selection, for the fewest adapter swaps."""
        groups: dict[_GroupKey, list[int]] = {}
        for index, job in enumerate(jobs):
            # Mixed: one call takes every selection, and the pipeline's own selection stays off (`()`).
            key = (job.shape, ()) if self._mixed else job.key
            groups.setdefault(key, []).append(index)
        active = self.adapters.active
        return sorted(groups.items(), key=lambda item: (item[0][1] != active, item[0][1]))

    def _run_group(
        self,
        key: _GroupKey,
        group: list[_Job],
        cancels: Sequence[threading.Event],
        progress: Callable[[int, ProgressEvent], None] | None = None,
        watching: Sequence[bool] | None = None,
    ) -> _GroupRun:
        """One pipeline call for `group`, stopped within a step once every cancel is set. With
        `progress`, each step's event goes to every job still listening that is `watching` (all by default)."""
        shape, selection = key
        everyone_gone = EveryEvent(cancels)
        run = _GroupRun([None] * len(group), [0] * len(group))

        def on_step(index: int, latents: torch.Tensor) -> None:
            run.steps = index + 1
            if everyone_gone.is_set():
                self.pipe._interrupt = True  # the pipeline skips every later step, and `_generate` decodes nothing
                return
            if progress is None:
                return
            for row, (job, cancel) in enumerate(zip(group, cancels, strict=True)):
                every = job.request.preview_every
                if cancel.is_set():
                    run.left[row] = run.left[row] or run.steps
                elif watching is None or watching[row]:
                    preview = self._preview(latents[row : row + 1], shape) if every and run.steps % every == 0 else None
                    progress(row, ProgressEvent(step=run.steps, total_steps=shape.steps, preview_b64=preview))

        images: list[Image.Image | None] = []  # stays empty when cancelled
        elapsed = 0.0
        try:
            if not everyone_gone.is_set():  # hold() looks at cancel only while it waits
                with self.adapters.hold(selection, everyone_gone):
                    started = time.perf_counter()
                    images = self._generate(group, shape, on_step, cancels)
                    elapsed = elapsed_ms(started)
        except LockWaitCancelled:
            pass
        except Exception as exc:  # this group's call failed: its requests get the error, other groups still run
            logger.exception("pipeline call failed for a group of %d", len(group))
            run.outcomes = [exc] * len(group)
            return run
        if all(image is None for image in images):  # none made (interrupted, or nobody left to see one)
            logger.info("group of %d cancelled after %d of %d steps", len(group), run.steps, shape.steps)
            run.outcomes = [None] * len(group)
            return run
        metadata = {"batch_size": len(group), "inference_ms": elapsed}
        run.outcomes = [
            None if image is None else self._response(job, image, {**metadata, "adapters": dict(job.selection)})
            for job, image in zip(group, images, strict=True)
        ]
        return run

    def quick_check(self, request: DiffusionRequest) -> bool:
        return len(request.prompt) + len(request.negative_prompt) <= QUICK_CHECK_CHARS

    def prepare(self, request: DiffusionRequest) -> _Job:
        pixels = request.height * request.width
        if pixels > self._options.max_pixels:
            raise InvalidRequest(
                "height",
                f"{request.width}x{request.height} is {pixels} pixels; this deployment's limit is "
                f"{self._options.max_pixels}",
            )
        prompts = loaded(self._prompts, "the tokenizer")
        prompt = prompts.text("prompt", request.prompt)
        negative_prompt = prompts.text("negative_prompt", request.negative_prompt).strip()
        seed = request.seed if request.seed is not None else secrets.randbits(_SEED_BITS)
        return _Job(request, self.selection(request), seed, prompt, negative_prompt)

    # -- the pipeline (only ever called under the adapter lock) --------------------------------

    def _generate(
        self, jobs: Sequence[_Job], shape: _Shape, on_step: StepCallback, cancels: Sequence[threading.Event]
    ) -> list[Image.Image | None]:
        """One pipeline call for all jobs; each image comes out at exactly the requested size, but
        None for a job whose cancel is set by then (nobody would see it), and none when interrupted."""
        pipe = self.pipe
        height, width = self._model_size(shape.height), self._model_size(shape.width)
        selections = [job.selection for job in jobs]
        with torch.inference_mode():
            embeds, pooled = self._encode([job.prompt for job in jobs], selections)
            guidance: dict[str, Any] = {}
            if shape.negative_prompt and shape.guidance_scale > 1.0:  # diffusers ignores it at or below 1
                negative, negative_pooled = self._encode([shape.negative_prompt] * len(jobs), selections)
                guidance = {
                    "negative_prompt_embeds": negative,
                    "negative_pooled_prompt_embeds": negative_pooled,
                    "true_cfg_scale": shape.guidance_scale,
                }

            def callback(_: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
                on_step(index, tensors["latents"])
                return {}  # the latents go on unchanged

            with self._per_sample(selections):
                latents = pipe(
                    prompt_embeds=embeds,
                    pooled_prompt_embeds=pooled,
                    height=height,
                    width=width,
                    num_inference_steps=shape.steps,
                    guidance_scale=shape.guidance_scale,
                    # One generator per image, on the CPU: each image's noise is its seed's alone, on any device.
                    generator=[torch.Generator("cpu").manual_seed(job.seed) for job in jobs],
                    output_type="latent",
                    callback_on_step_end=callback,
                    max_sequence_length=self._options.max_sequence_length,
                    **guidance,
                ).images
            if pipe.interrupt:
                return []
            return [
                None
                if cancels[row].is_set()
                else crop_center(self._decode(latents[row : row + 1], height, width), shape.width, shape.height)
                for row in range(len(jobs))
            ]

    def _model_size(self, side: int) -> int:
        """FLUX works in 2x2 patches of latents: sides round up to that multiple, and the image is cropped back."""
        multiple = int(self.pipe.vae_scale_factor) * 2
        return math.ceil(side / multiple) * multiple

    def _encode(self, prompts: Sequence[str], selections: Sequence[Selection]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings, one prompt at a time (each with its own adapters, when mixed): encoded alone
        or among others, a prompt gives the same numbers."""
        pipe = self.pipe
        encoded = []
        for prompt, selection in zip(prompts, selections, strict=True):
            with self._per_sample([selection]):
                encoded.append(
                    pipe.encode_prompt(
                        prompt=prompt,
                        prompt_2=None,
                        device=pipe._execution_device,
                        max_sequence_length=self._options.max_sequence_length,
                    )
                )
        return torch.cat([item[0] for item in encoded]), torch.cat([item[1] for item in encoded])

    def _per_sample(self, selections: Sequence[Selection]) -> AbstractContextManager[None]:
        """Row i of what runs within computed with `selections[i]` (mixed batches; else nothing to do)."""
        return self._mixed.rows(selections) if self._mixed else nullcontext()

    def _decode(self, packed: torch.Tensor, height: int, width: int, scale: float = 1.0) -> Image.Image:
        """One image from its packed latents; `scale` < 1 shrinks the latents first, for a cheap preview."""
        pipe = self.pipe
        vae = pipe.vae
        latents = pipe._unpack_latents(packed, height, width, pipe.vae_scale_factor)
        if scale < 1.0:
            size = (max(1, round(latents.shape[-2] * scale)), max(1, round(latents.shape[-1] * scale)))
            latents = F.interpolate(latents, size=size, mode="area")
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        pixels = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        images: list[Image.Image] = pipe.image_processor.postprocess(pixels, output_type="pil")
        return images[0]

    def _preview(self, packed: torch.Tensor, shape: _Shape) -> str:
        """A small PNG of the image so far: latents shrunk to the preview's size, then decoded."""
        height, width = self._model_size(shape.height), self._model_size(shape.width)
        side = self._options.preview_max_side
        scale = min(1.0, side / max(height, width))
        with torch.inference_mode():
            image = self._decode(packed[:1], height, width, scale)
        # Crop away what rounding to the model's size added, in proportion, then fit the longest side.
        image = crop_center(
            image, round(shape.width * image.width / width), round(shape.height * image.height / height)
        )
        fit = min(1.0, side / max(shape.width, shape.height))
        size = (max(1, round(shape.width * fit)), max(1, round(shape.height * fit)))
        if image.size != size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        return png_b64(image)

    def _response(self, job: _Job, image: Image.Image, metadata: dict[str, Any]) -> DiffusionResponse:
        request = job.request
        return DiffusionResponse(
            request_id=request.request_id,
            model_name=request.model_name,
            image_b64=png_b64(image),
            height=request.height,
            width=request.width,
            seed=job.seed,
            metadata=metadata,
        )


@dataclass
class _GroupRun:
    """What one pipeline call came to: per job its response, its failure, or None once its
    client had gone (no image was made for it)."""

    outcomes: list[DiffusionResponse | Exception | None]
    left: list[int]
    """Per job, the steps done when the pipeline first saw its cancel set (0: not seen during a step)."""
    steps: int = 0  # denoising steps done

    @property
    def cancelled(self) -> bool:
        return all(outcome is None for outcome in self.outcomes) and bool(self.outcomes)

    def results(self) -> list[DiffusionResponse | Exception]:
        """The outcomes of a call that was not cancelled (a predict group shares one cancel)."""
        return [Cancelled("its callers are gone") if outcome is None else outcome for outcome in self.outcomes]


def _location(source: ModelSource) -> str:
    """A folder or hub id that diffusers reads: a `build` source is built once into the cache."""
    location = weights_location(source)
    if location is None:
        raise ValueError("a FLUX model or adapter source must give `path`, `hub` or `build`")
    return location
