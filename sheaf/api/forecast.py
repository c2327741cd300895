"""The `time_series` contract: forecasting a series, given or looked up in the feature store."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from sheaf.api.base import BaseRequest, BaseResponse
from sheaf.api.feature_ref import FeatureRef

Frequency = Literal["1min", "5min", "15min", "1h", "1d", "1W", "1M"]


class ForecastResponse(BaseResponse):
    model_type: Literal["time_series"] = "time_series"
    mean: list[float]
    quantiles: dict[str, list[float]] | None = Field(None, description='Keys like "0.1"; null unless asked for.')
    samples: list[list[float]] | None = Field(None, description="`num_samples` paths; null unless asked for.")
    horizon: int
    frequency: Frequency


class ForecastRequest(BaseRequest[ForecastResponse]):
    response_model = ForecastResponse

    model_type: Literal["time_series"] = "time_series"
    history: list[float] | list[list[float]] | None = Field(
        None, description="Past values, oldest first: one per step, or rows of several. Give this or `feature_ref`."
    )
    feature_ref: FeatureRef | None = Field(None, description="Where the server looks the history up instead.")
    target_index: int = Field(0, ge=0, description="Which column of `history` rows to forecast.")
    horizon: int = Field(24, gt=0, le=10_000)
    frequency: Frequency = "1h"
    output_mode: Literal["mean", "quantiles", "samples"] = "mean"
    # A plain default (pydantic copies it for each request) is in the JSON schema; a factory is not.
    quantile_levels: list[float] = Field([0.1, 0.5, 0.9])
    num_samples: int = Field(20, ge=1, le=1000)

    @field_validator("quantile_levels")
    @classmethod
    def _levels_in_range(cls, levels: list[float]) -> list[float]:
        if not levels or any(not 0.0 < level < 1.0 for level in levels):
            raise ValueError("give at least one level, each between 0 and 1")
        return levels

    @model_validator(mode="after")
    def _history_or_feature_ref(self) -> ForecastRequest:
        if (self.history is None) == (self.feature_ref is None):
            raise ValueError("give exactly one of `history` and `feature_ref`")
        if self.history is not None:
            if not self.history:
                raise ValueError("`history` must hold at least one value")
            rows = [row for row in self.history if isinstance(row, list)]
            if rows and any(len(row) <= self.target_index for row in rows):
                raise ValueError("`target_index` is outside the rows of `history`")
        return self

    def features_wanted(self) -> FeatureRef | None:
        return self.feature_ref

    def with_features(self, values: list[float] | list[list[float]]) -> ForecastRequest:
        return self.model_copy(update={"history": values, "feature_ref": None})

    def series(self) -> list[float]:
        """The values to forecast: `history` itself, or its `target_index` column."""
        assert self.history is not None, "feature_ref is resolved before the backend runs"
        return [row[self.target_index] if isinstance(row, list) else row for row in self.history]
