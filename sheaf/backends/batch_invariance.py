"""Batch invariance: a request's result the same whether it runs alone or inside a batch."""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def per_sample_linears(module: torch.nn.Module) -> None:
    """Make every linear layer under `module` multiply one sample at a time.

    A matrix product's rounding depends on which kernel the library picks, and it picks by
    shape: the same row multiplied among more rows can come out a bit different. Alone, a
    request's products have one sample's shape; computed per sample, so do they in a batch.
    """
    for layer in module.modules():
        if type(layer) is torch.nn.Linear:  # exactly: a subclass's own forward may do more than multiply
            layer.forward = types.MethodType(_linear_per_sample, layer)  # type: ignore[method-assign]


def _linear_per_sample(layer: torch.nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    if inputs.dim() < 2 or inputs.shape[0] == 1:
        return F.linear(inputs, layer.weight, layer.bias)
    return torch.cat([F.linear(inputs[row : row + 1], layer.weight, layer.bias) for row in range(inputs.shape[0])])
