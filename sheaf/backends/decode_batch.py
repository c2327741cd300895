"""Continuous batching for a causal LM: rows that decode together over one KV cache, joining and
leaving at any token boundary.

A joining row is prefilled on its own (with the other rows joining at the same step), then its
cache is left-padded to the batch's length, or the batch's to its, and stacked under the others.
The padding is masked out and each row keeps its own positions, so a row decodes as it would
alone, up to the rounding of a different batch shape. Rows that finish are dropped from the
cache at once, and so is padding no row needs any more.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel
from transformers.cache_utils import DynamicLayer


class DecodeBatch:
    """The rows decoding in one model, in order: `add` prefills new ones, `step` decodes one token
    for every row, `keep` drops the others."""

    def __init__(self, model: PreTrainedModel, pad_id: int) -> None:
        self._model = model
        self._pad_id = pad_id
        self._cache: DynamicCache | None = None
        self._mask = torch.zeros((0, 0), dtype=torch.long, device=model.device)
        self._lengths: list[int] = []  # real tokens in each row's cache: its next position

    def __len__(self) -> int:
        return len(self._lengths)

    @property
    def can_join(self) -> bool:
        """Whether rows can join after the first `add`: only a plain cache can be padded and stacked
        (a sliding-window or quantized one cannot)."""
        return self._cache is None or _plain_layers(self._cache) is not None

    @torch.inference_mode()
    def add(self, prompts: Sequence[list[int]]) -> torch.Tensor:
        """Prefill `prompts` as new rows after the current ones; each one's next-token logits (float32)."""
        width = max(map(len, prompts))
        ids = [[self._pad_id] * (width - len(prompt)) + prompt for prompt in prompts]
        mask = [[0] * (width - len(prompt)) + [1] * len(prompt) for prompt in prompts]
        device = self._model.device
        input_ids = torch.tensor(ids, device=device)
        attention_mask = torch.tensor(mask, device=device)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self._model.config)
        out = self._model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
        )
        self._stack(cache, attention_mask)
        self._lengths += [len(prompt) for prompt in prompts]
        return _last_logits(out)

    @torch.inference_mode()
    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        """Decode `tokens` (one per row, in order); every row's next-token logits (float32)."""
        assert self._cache is not None and len(tokens) == len(self._lengths)
        device = self._model.device
        self._mask = torch.cat([self._mask, torch.ones((len(tokens), 1), dtype=torch.long, device=device)], dim=1)
        out = self._model(
            input_ids=torch.tensor([[token] for token in tokens], device=device),
            attention_mask=self._mask,
            position_ids=torch.tensor([[length] for length in self._lengths], device=device),
            cache=self._cache,
            use_cache=True,
        )
        self._lengths = [length + 1 for length in self._lengths]
        return _last_logits(out)

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (indices, in order); the rest leave the batch."""
        if list(rows) == list(range(len(self._lengths))):
            return
        self._lengths = [self._lengths[row] for row in rows]
        if not rows:
            self._cache, self._mask = None, self._mask[:0, :0]
            return
        assert self._cache is not None
        index = torch.tensor(list(rows), device=self._mask.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        unused = int((self._mask.sum(dim=0) > 0).int().argmax())  # leading columns that are padding in every row
        layers = _plain_layers(self._cache)
        if unused > 0 and layers is not None:
            self._mask = self._mask[:, unused:]
            for layer in layers:
                keys, values = _states(layer)
                layer.keys, layer.values = keys[:, :, unused:], values[:, :, unused:]

    def _stack(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        if self._cache is None:
            self._cache, self._mask = cache, mask
            return
        ours, new = _plain_layers(self._cache), _plain_layers(cache)
        if ours is None or new is None:
            raise RuntimeError("rows cannot join this model's cache")
        width = max(self._mask.shape[1], mask.shape[1])
        for mine, theirs in zip(ours, new, strict=True):
            (keys, values), (their_keys, their_values) = _states(mine), _states(theirs)
            mine.keys = torch.cat([_left_pad(keys, width), _left_pad(their_keys, width)])
            mine.values = torch.cat([_left_pad(values, width), _left_pad(their_values, width)])
        self._mask = torch.cat([_left_pad(self._mask, width), _left_pad(mask, width)])


def _left_pad(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """`tensor` with zeros before its sequence dimension (a cache's last but one, a mask's last) up to `width`."""
    dim = -2 if tensor.dim() == 4 else -1
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    return F.pad(tensor, (0, 0, missing, 0) if dim == -2 else (missing, 0))


def _plain_layers(cache: DynamicCache) -> list[DynamicLayer] | None:
    """The cache's layers when each one is a plain growing cache (initialised), else None."""
    layers = [layer for layer in cache.layers if type(layer) is DynamicLayer and layer.keys is not None]
    return layers if len(layers) == len(cache.layers) else None


def _states(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    assert layer.keys is not None and layer.values is not None  # `_plain_layers` only gives initialised ones
    return layer.keys, layer.values


def _last_logits(out: Any) -> torch.Tensor:
    logits: torch.Tensor = out.logits[:, -1, :]
    return logits.float()
