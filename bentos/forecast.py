"""Forecasting: TimesFM over a given history, or one looked up in the feature store."""

from sheaf.api import ForecastRequest
from sheaf.options import ForecastOptions
from sheaf.service import deployment_service

Forecast = deployment_service(
    "forecast",  # configs/forecast.yaml
    request_model=ForecastRequest,
    backend="sheaf.backends.forecast:ForecastBackend",
    options=ForecastOptions,
)
