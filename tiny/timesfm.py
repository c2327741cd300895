"""A tiny random TimesFM, built offline in well under a second.

transformers' `TimesFmModelForPrediction` with the real architecture (patched input, causal
decoder, mean and quantile heads, frequency embedding), shrunk to about 160 KB of weights.
The forecasting code that serves it is the code that serves `google/timesfm-2.0-500m-pytorch`;
only the weights are random. Used as a config `build:` source: `tiny.timesfm:build_tiny_timesfm`.
"""

from __future__ import annotations

from pathlib import Path

# Small enough to build and run in milliseconds, large enough that a horizon of a few dozen steps
# takes several decode rounds (HORIZON_LENGTH per model call) and a context holds several patches.
PATCH_LENGTH = 8
CONTEXT_LENGTH = 128
HORIZON_LENGTH = 16


def build_tiny_timesfm(dest: Path, *, seed: int = 0) -> Path:
    """Write a tiny random TimesFmModelForPrediction (`save_pretrained` layout) to `dest`; return `dest`.

    The same seed gives the same weights, so a rebuilt cache answers exactly as the old one did.
    """
    import torch
    from transformers import TimesFmConfig, TimesFmModelForPrediction

    config = TimesFmConfig(
        patch_length=PATCH_LENGTH,
        context_length=CONTEXT_LENGTH,
        horizon_length=HORIZON_LENGTH,
        num_hidden_layers=2,
        hidden_size=32,
        intermediate_size=64,
        head_dim=8,
        num_attention_heads=4,
        # Wider than the default 0.02, so that random forecasts follow the shape of the history and not only
        # its level (tests that compare forecasts of different series then really tell them apart), yet narrow
        # enough that a long autoregressive horizon stays bounded (at 0.2 it grows tenfold per 128 steps).
        initializer_range=0.1,
    )
    with torch.random.fork_rng(devices=[]):  # fixed weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = TimesFmModelForPrediction(config)
    model.save_pretrained(dest)
    return dest
