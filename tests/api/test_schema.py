"""The served schemas: the Swagger page's OpenAPI shows each nullable field's real type, and
BentoML's generated client, which reads `/schema.json`, sends and receives null and values."""

from typing import Any

import bentoml
import httpx
import pytest

from sheaf.api import DiffusionRequest, ForecastRequest
from sheaf.api.feature_ref import FeatureRef
from tests.conftest import Server

HISTORY = [float(i % 7) for i in range(48)]
TRAFFIC = FeatureRef(
    feature_view="series_history", feature_name="values", entity_key="series_id", entity_value="traffic"
)
IMAGE = {"prompt": "a fox", "height": 64, "width": 64, "num_inference_steps": 2, "seed": 1}


@pytest.fixture(scope="module")
def openapi(server: Server) -> dict[str, Any]:
    spec: dict[str, Any] = httpx.get(f"{server.url}/docs.json", timeout=30).raise_for_status().json()
    return spec


def field(spec: dict[str, Any], route: str, name: str, part: str = "request") -> dict[str, Any]:
    """The schema of one field of a route's request or response body, as the Swagger page shows it."""
    post = spec["paths"][route]["post"]
    body = post["requestBody"] if part == "request" else post["responses"]["200"]
    schema: dict[str, Any] = body["content"]["application/json"]["schema"]["properties"][name]
    return schema


def component(spec: dict[str, Any], ref: str) -> dict[str, Any]:
    assert ref.startswith("#/components/schemas/"), ref
    schema: dict[str, Any] = spec["components"]["schemas"][ref.removeprefix("#/components/schemas/")]
    return schema


def test_forecast_history_and_feature_ref_show_their_types(openapi: dict[str, Any]) -> None:
    history = field(openapi, "/forecast/predict", "history")
    assert history["type"] == "array" and history["items"] == {"type": "number"}
    assert history["nullable"] is True
    feature_ref = field(openapi, "/forecast/predict", "feature_ref")
    assert feature_ref["nullable"] is True
    ref = component(openapi, feature_ref["$ref"])
    assert ref["type"] == "object"
    assert set(ref["properties"]) == {"feature_view", "feature_name", "entity_key", "entity_value"}
    # The component keeps both forms of `history`: values, or rows of values.
    both = component(openapi, "#/components/schemas/ForecastRequest")["properties"]["history"]
    assert both["nullable"] is True
    assert {"type": "array", "items": {"type": "array", "items": {"type": "number"}}} in both["anyOf"]


def test_forecast_answers_show_their_types(openapi: dict[str, Any]) -> None:
    samples = field(openapi, "/forecast/predict", "samples", part="response")
    assert samples["type"] == "array" and samples["items"] == {"type": "array", "items": {"type": "number"}}
    quantiles = field(openapi, "/forecast/predict", "quantiles", part="response")
    assert quantiles["type"] == "object"
    assert quantiles["additionalProperties"] == {"type": "array", "items": {"type": "number"}}
    assert samples["nullable"] is True and quantiles["nullable"] is True


def test_flux_adapters_and_weights_show_their_types(openapi: dict[str, Any]) -> None:
    adapters = field(openapi, "/flux/predict", "adapters")
    assert adapters["type"] == "array" and adapters["items"] == {"type": "string"}
    weights = field(openapi, "/flux/predict", "adapter_weights")
    assert weights["type"] == "array" and weights["items"]["type"] == "number"
    seed = field(openapi, "/flux/predict", "seed")
    assert seed["type"] == "integer" and seed["minimum"] == 0
    assert adapters["nullable"] is True and weights["nullable"] is True and seed["nullable"] is True


def test_no_field_is_null_alone_on_the_swagger_page(openapi: dict[str, Any]) -> None:
    for route, methods in openapi["paths"].items():
        post = methods.get("post")
        if post is None or "requestBody" not in post:
            continue
        for part in (post["requestBody"], post["responses"]["200"]):
            schema = part["content"].get("application/json", {}).get("schema", {})
            for name, prop in schema.get("properties", {}).items():
                assert prop.get("type") != "null", (route, name, prop)


def test_the_generated_client_sends_history_or_feature_ref_and_reads_null_answers(server: Server) -> None:
    with bentoml.SyncHTTPClient(server.url) as client:
        given = client.forecast_predict(ForecastRequest(history=HISTORY, horizon=4).model_dump(mode="json"))
        looked_up = client.forecast_predict(ForecastRequest(feature_ref=TRAFFIC, horizon=4).model_dump(mode="json"))
        quantiles = client.forecast_predict(
            ForecastRequest(history=HISTORY, horizon=4, output_mode="quantiles").model_dump(mode="json")
        )
    assert len(given["mean"]) == 4 and given["quantiles"] is None and given["samples"] is None
    assert len(looked_up["mean"]) == 4 and looked_up["metadata"]["feature_entity"] == "series_id=traffic"
    assert set(quantiles["quantiles"]) == {"0.1", "0.5", "0.9"}
    assert all(len(values) == 4 for values in quantiles["quantiles"].values())


def test_the_generated_client_sends_null_or_listed_adapters(server: Server) -> None:
    with bentoml.SyncHTTPClient(server.url) as client:
        defaults = client.flux_predict(DiffusionRequest(**IMAGE).model_dump(mode="json"))
        chosen = client.flux_predict(
            DiffusionRequest(**IMAGE, adapters=["a"], adapter_weights=[0.5]).model_dump(mode="json")
        )
    assert defaults["image_b64"] and defaults["seed"] == 1
    assert chosen["metadata"]["adapters"] == {"a": 0.5}
