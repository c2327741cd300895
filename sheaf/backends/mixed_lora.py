"""Per-sample LoRA: each sample of a batch computed with its own adapters and weights.

diffusers' `set_adapters` picks one selection for the whole pipeline, so requests with
different selections could not share a call. Here the PEFT layers' own LoRA path stays off
(`disable_lora`), and a forward hook on every LoRA layer adds, to each sample's row of the
base layer's output, `lora_B(lora_A(dropout(x))) * weight * alpha / r` for each adapter of
that sample's selection, in the selection's order (by name), as PEFT adds them. A sample
with no adapters gets the base layer alone. The rows' selections are set for one call at a
time (`rows`). PEFT's own mixed-batch path (`adapter_names`) takes one adapter per sample at
one shared weight, which is not enough for `[a, b]` with weights.

Computed one sample at a time (`per_sample_linears`), a sample's numbers are the same alone
or in any mixed batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer

from sheaf.lora import Selection


class MixedAdaptersUnsupported(Exception):
    """The pipeline holds LoRA layers that per-sample LoRA cannot reproduce (DoRA, merged, not linear)."""


class MixedAdapters:
    """Per-sample LoRA over the LoRA layers under `modules` (a pipeline's transformer and text encoders)."""

    def __init__(self, modules: Sequence[torch.nn.Module]) -> None:
        self.layers: list[LoraLinear] = []
        for module in modules:
            for layer in module.modules():
                if not isinstance(layer, BaseTunerLayer):
                    continue
                if not isinstance(layer, LoraLinear) or type(layer) is not LoraLinear:  # exactly: not a subclass
                    raise MixedAdaptersUnsupported(f"a {type(layer).__name__} layer (only LoRA linear layers are)")
                if layer.merged or any(layer.lora_variant.values()):
                    raise MixedAdaptersUnsupported("a merged or DoRA adapter")
                self.layers.append(layer)
        self._rows: list[Selection] | None = None
        for layer in self.layers:
            layer.register_forward_hook(self._add_deltas)

    @contextmanager
    def rows(self, selections: Sequence[Selection]) -> Iterator[None]:
        """Within the block, the batch's row i is computed with `selections[i]` (one call at a time)."""
        self._rows = list(selections)
        try:
            yield
        finally:
            self._rows = None

    def _add_deltas(self, layer: torch.nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        rows = self._rows
        if rows is None or not any(rows):
            return output
        assert isinstance(layer, LoraLinear)
        inputs = args[0]
        if inputs.shape[0] != len(rows):  # every FLUX linear is batch-first; anything else must not pass silently
            raise RuntimeError(f"a LoRA layer saw {inputs.shape[0]} rows for a batch of {len(rows)}")
        by_selection: dict[Selection, list[int]] = {}
        for row, selection in enumerate(rows):
            if selection:
                by_selection.setdefault(selection, []).append(row)
        for selection, members in by_selection.items():
            whole = len(members) == len(rows)  # one selection for the whole batch: no gather, no scatter
            x, summed = (inputs, output) if whole else (inputs[members], output[members])
            for name, weight in selection:
                if name not in layer.lora_A:  # this adapter leaves this layer alone
                    continue
                down, up = layer.lora_A[name], layer.lora_B[name]
                assert isinstance(down, torch.nn.Linear)
                x_in = layer._cast_input_dtype(layer.lora_dropout[name](x), down.weight.dtype)
                summed = summed + up(down(x_in)) * _scale(layer, name, weight)
            if whole:
                return summed.to(output.dtype)
            output[members] = summed.to(output.dtype)
        return output


def _scale(layer: LoraLinear, name: str, weight: float) -> float:
    """The factor PEFT's `set_scale(name, weight)` would give the adapter, as a Python float."""
    rank = layer.r[name]
    return float(weight * layer.lora_alpha[name] / (math.sqrt(rank) if layer.use_rslora.get(name) else rank))
