"""Forecasting with TimesFM (transformers' `TimesFmModelForPrediction`): a whole batch per model call.

A batch of series of different lengths, frequencies and horizons runs as one model call. The model
left-pads every series to its own fixed `context_length` (and keeps only the last `context_length`
values of a longer one), masks the padding and normalises each row by that row's own statistics, so
a row's forecast does not depend on the other rows of its batch: batched and alone give the same
numbers (checked in tests/backends/test_forecast.py). Nothing here pads to the batch's longest series.

Horizons: one model call forecasts `horizon_length` steps (128 for the released checkpoints). A longer
horizon is decoded autoregressively, as TimesFM's own decode loop does: the mean forecast so far is
appended to the context and the model runs again. Each round is one batched call for every request
still short of its horizon, so a batch costs ceil(longest horizon / horizon_length) calls, and a
request's rounds are the same whichever batch it is in. `options.max_horizon` caps the rounds.

Frequency: TimesFM's own buckets, those its checkpoints were trained with (`timesfm.freq_map`):
minutes, hours and days are high (0), weeks and months medium (1); quarters and years (2) are
not in the contract.

Uncertainty: the model has one head per quantile level in `config.quantiles` (0.1 ... 0.9). At
each step the head values are sorted, since untrained or uncalibrated heads may cross, and a
quantile function never decreases (monotone rearrangement). Levels between two heads are linearly
interpolated; levels outside the outermost heads extend the outermost segment linearly (its slope is
never negative, so the result stays monotone). Samples are drawn from that same piecewise-linear
distribution by inverse transform, independently at each step (TimesFM gives marginals only), with a
generator seeded from the request's content (its series, horizon, frequency and `num_samples`, not its
`request_id`): the same request gets the same paths on every call, in any batch, on any device.
"""

from __future__ import annotations

import hashlib
import logging
import math
import struct
import threading
import time
from collections.abc import Sequence
from typing import Any

import torch
from transformers import TimesFmModelForPrediction

from sheaf.api.forecast import ForecastRequest, ForecastResponse
from sheaf.backends.base import BatchBackend, Cancelled, elapsed_ms, loaded, torch_device
from sheaf.config import DeploymentConfig
from sheaf.exceptions import InvalidRequest
from sheaf.options import ForecastOptions
from sheaf.weights import weights_location

logger = logging.getLogger("sheaf.backends.forecast")

# TimesFM's frequency indicator, as its `freq_map` assigns it to pandas frequency strings.
FREQUENCY_BUCKETS: dict[str, int] = {"1min": 0, "5min": 0, "15min": 0, "1h": 0, "1d": 0, "1W": 1, "1M": 1}


MAX_ABS_VALUE = 1e30
QUICK_CHECK_VALUES = 2048
"""Histories up to this long are checked on the event loop (about 0.1 µs a value)."""


_Series = tuple[ForecastRequest, list[float]]
"""A request that passed every check, with the values to forecast."""


def _finite(response: ForecastResponse) -> bool:
    values = [*response.mean, *(v for vs in (response.quantiles or {}).values() for v in vs)]
    values += [v for path in response.samples or [] for v in path]
    return all(math.isfinite(value) for value in values)


class ForecastBackend(BatchBackend[ForecastRequest, ForecastResponse, _Series]):
    options_model = ForecastOptions

    def __init__(self, config: DeploymentConfig) -> None:
        super().__init__(config)
        self._options: ForecastOptions = self.options()
        self._model: TimesFmModelForPrediction | None = None
        self._head_levels = torch.empty(0, dtype=torch.float64)

    @property
    def model(self) -> TimesFmModelForPrediction:
        return loaded(self._model)

    # -- loading -----------------------------------------------------------------------------

    def load(self) -> None:
        started = time.perf_counter()
        weights = self._weights_location()
        model = TimesFmModelForPrediction.from_pretrained(weights, dtype=getattr(torch, self.config.dtype))
        model.to(torch_device(self.config.device))  # type: ignore[arg-type]  # transformers wraps `to` untyped
        model.eval()  # type: ignore[no-untyped-call]
        self._head_levels = _head_levels(model.config.quantiles)
        self._model = model
        logger.info(
            "loaded %s from %s on %s in %.1f s", self.config.name, weights, model.device, elapsed_ms(started) / 1000
        )

    def _weights_location(self) -> str:
        """A folder or hub id that from_pretrained reads; a builder's weights are built once into the cache."""
        location = weights_location(self.config.model)
        if location is None:
            raise ValueError("a forecasting deployment takes its model from `path`, `hub` or `build`, not `package`")
        return location

    # -- requests ----------------------------------------------------------------------------

    def quick_check(self, request: ForecastRequest) -> bool:
        return len(request.history or ()) <= QUICK_CHECK_VALUES

    def prepare(self, request: ForecastRequest) -> _Series:
        return request, self._series(request)

    def predict(self, prepared: Sequence[_Series], cancel: threading.Event) -> list[ForecastResponse | Exception]:
        context_length = int(self.model.config.context_length)
        rows = [
            _Forecast(request, series, context_length, FREQUENCY_BUCKETS[request.frequency])
            for request, series in prepared
        ]
        metadata: dict[str, Any] = {"batch_size": len(rows)}
        started = time.perf_counter()
        try:
            metadata["model_calls"] = self._decode(rows, cancel)
        except Cancelled:
            raise
        except Exception as exc:  # the model call failed for every row in it; invalid rows keep their own error
            logger.exception("forecast failed for a batch of %d", len(rows))
            return [exc] * len(rows)
        metadata["inference_ms"] = elapsed_ms(started)
        return [self._outcome(item, metadata) for item in rows]

    def _outcome(self, item: _Forecast, metadata: dict[str, Any]) -> ForecastResponse | Exception:
        try:
            response = self._response(item, {**metadata, "history_used": item.history_used})
        except Exception as exc:  # one row's post-processing must not fail the rows beside it
            logger.exception("forecast post-processing failed for %s", item.request.request_id)
            return exc
        if not _finite(response):  # JSON has no NaN: say why here rather than fail to encode the answer
            return InvalidRequest("history", "gives a forecast that is not finite (values too large or too spread)")
        return response

    def _series(self, request: ForecastRequest) -> list[float]:
        """The values to forecast; InvalidRequest when this deployment cannot take the request."""
        if request.history is None:
            # The service resolves `feature_ref` before the backend runs; reaching here means it could not.
            raise InvalidRequest("feature_ref", "was not resolved to a history; send `history` instead")
        limit = self._options.max_horizon
        if request.horizon > limit:
            raise InvalidRequest("horizon", f"{request.horizon} is above this deployment's limit of {limit}")
        limit = self._options.max_history
        if len(request.history) > limit:
            raise InvalidRequest(
                "history", f"holds {len(request.history)} values; this deployment takes at most {limit}"
            )
        if not request.history:
            raise InvalidRequest("history", "must hold at least one value")
        try:
            series = request.series()
        except IndexError:  # a history filled in after validation (by the service) was never checked against it
            raise InvalidRequest("target_index", "is outside the rows of `history`") from None
        if not all(math.isfinite(value) and abs(value) <= MAX_ABS_VALUE for value in series):
            # Larger values overflow the model's float32 scaling and come back as NaN.
            raise InvalidRequest("history", f"must hold finite numbers within ±{MAX_ABS_VALUE:g}")
        return series

    def _decode(self, rows: Sequence[_Forecast], cancel: threading.Event) -> int:
        """Forecast every row: one batched model call per round of `horizon_length` steps; returns the calls made."""
        model = self.model
        horizon_length = int(model.config.horizon_length)
        pending = list(rows)
        calls = 0
        with torch.inference_mode():
            while pending:
                if cancel.is_set():  # checked between rounds, one model call each
                    logger.info("predict batch of %d cancelled after %d model calls", len(rows), calls)
                    raise Cancelled(f"forecast stopped after {calls} model calls")
                output = model(
                    past_values=[row.context.to(device=model.device, dtype=model.dtype) for row in pending],
                    freq=[row.bucket for row in pending],
                )
                calls += 1
                predictions = output.full_predictions
                assert predictions is not None, "TimesFM always returns full_predictions"
                # [rows, horizon_length, 1 + quantile heads]: the mean head first, then one per level.
                chunks = predictions[:, :horizon_length].to(device="cpu", dtype=torch.float64)
                for row, chunk in zip(pending, chunks, strict=True):
                    row.push(chunk)
                pending = [row for row in pending if row.decoded < row.request.horizon]
        return calls

    def _response(self, row: _Forecast, metadata: dict[str, Any]) -> ForecastResponse:
        request = row.request
        output = row.output()
        heads = output[:, 1:]
        quantiles: dict[str, list[float]] | None = None
        samples: list[list[float]] | None = None
        if request.output_mode == "quantiles":
            levels = torch.tensor(request.quantile_levels, dtype=torch.float64).expand(request.horizon, -1)
            values = _quantile_function(self._head_levels, heads, levels)
            quantiles = {_level_key(level): values[:, i].tolist() for i, level in enumerate(request.quantile_levels)}
        elif request.output_mode == "samples":
            generator = torch.Generator().manual_seed(_sample_seed(request, row.series))
            uniform = torch.rand((request.horizon, request.num_samples), generator=generator, dtype=torch.float64)
            samples = _quantile_function(self._head_levels, heads, uniform).T.tolist()
        return ForecastResponse(
            request_id=request.request_id,
            model_name=request.model_name,
            mean=output[:, 0].tolist(),
            quantiles=quantiles,
            samples=samples,
            horizon=request.horizon,
            frequency=request.frequency,
            metadata=metadata,
        )


class _Forecast:
    """One request through the decode rounds: its context (its history, then its own forecast) and the output."""

    def __init__(self, request: ForecastRequest, series: list[float], context_length: int, bucket: int) -> None:
        self.request = request
        self.series = series
        self.bucket = bucket
        self.context_length = context_length
        # Only what the model reads: a long history need not travel to the device whole.
        self.context = torch.tensor(series[-context_length:], dtype=torch.float64)
        self.history_used = len(self.context)
        self.decoded = 0
        self._chunks: list[torch.Tensor] = []

    def push(self, chunk: torch.Tensor) -> None:
        """Take one round's output ([horizon_length, 1 + heads]); its mean path extends the context for the next."""
        self._chunks.append(chunk[: self.request.horizon - self.decoded])
        self.decoded += len(self._chunks[-1])
        self.context = torch.cat([self.context, chunk[:, 0]])[-self.context_length :]

    def output(self) -> torch.Tensor:
        """[horizon, 1 + heads]: the mean, then one column per quantile head."""
        return torch.cat(self._chunks)


def _quantile_function(head_levels: torch.Tensor, heads: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Values at `levels` ([steps, n]) of each step's distribution, given its heads ([steps, k]) at
    `head_levels` ([k], ascending): sorted heads, linear between them, the outermost segments extended."""
    values = heads.sort(dim=-1).values  # monotone rearrangement: crossing heads are put back in order
    levels = levels.contiguous()  # an expanded or transposed view: searchsorted would copy it anyway, with a warning
    if len(head_levels) == 1:
        return values.expand(levels.shape)
    upper = torch.searchsorted(head_levels, levels).clamp(1, len(head_levels) - 1)
    lower = upper - 1
    low, high = values.gather(-1, lower), values.gather(-1, upper)
    weight = (levels - head_levels[lower]) / (head_levels[upper] - head_levels[lower])  # outside [0, 1] at the ends
    return low + weight * (high - low)


def _head_levels(quantiles: Sequence[float]) -> torch.Tensor:
    levels = sorted(float(level) for level in quantiles)
    if not levels or len(set(levels)) != len(levels) or not all(0.0 < level < 1.0 for level in levels):
        raise ValueError(f"the model's quantile levels must be distinct and between 0 and 1, got {list(quantiles)}")
    return torch.tensor(levels, dtype=torch.float64)


def _sample_seed(request: ForecastRequest, series: list[float]) -> int:
    """A seed from what defines the sample paths, so the same request draws the same paths wherever it runs."""
    digest = hashlib.sha256(struct.pack(f"<{len(series)}d", *series))
    digest.update(f"|{request.frequency}|{request.horizon}|{request.num_samples}".encode())
    return int.from_bytes(digest.digest()[:8], "little") >> 1  # 63 bits: within what manual_seed takes


def _level_key(level: float) -> str:
    return repr(float(level))  # shortest round-trip form: 0.1 -> "0.1"
