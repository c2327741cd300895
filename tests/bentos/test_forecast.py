"""The forecast deployment end to end: Feast lookups on predict and stream, the predict cache,
and a real Redis online store that goes away and comes back."""

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sheaf.api import FeatureRef
from sheaf.feature_demo import create_demo_repo, demo_series, write_history
from sheaf.streaming import SSEDecoder
from tests.conftest import Server, free_port, predict_at_once, serve

BASE: dict[str, Any] = {"model_type": "time_series", "horizon": 12, "frequency": "1h"}
REF = {"feature_view": "series_history", "feature_name": "values", "entity_key": "series_id"}


def ref(entity: str, **fields: str) -> dict[str, str]:
    return {**REF, "entity_value": entity, **fields}


def predict(server: Server, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}/forecast/predict", json={**BASE, **body}, timeout=60)


def stream(server: Server, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}/forecast/stream", json={**BASE, **body}, timeout=60)


def stream_events(server: Server, body: dict[str, Any]) -> list[dict[str, Any]]:
    response = stream(server, body)
    assert response.status_code == 200, response.text
    return SSEDecoder().feed(response.content)


def test_a_feature_ref_forecasts_the_history_it_names(server: Server) -> None:
    by_ref = predict(server, {"feature_ref": ref("temperature")}).json()
    by_history = predict(server, {"history": demo_series("temperature")}).json()
    assert by_ref["mean"] == pytest.approx(by_history["mean"], rel=1e-6)
    assert by_ref["metadata"]["feature"] == "series_history:values"
    assert by_ref["metadata"]["feature_entity"] == "series_id=temperature"
    (result,) = stream_events(server, {"feature_ref": ref("temperature")})  # no stream override: one result
    assert result["type"] == "result"
    assert result["mean"] == pytest.approx(by_history["mean"], rel=1e-6)
    assert result["metadata"]["feature"] == "series_history:values"


@pytest.mark.parametrize(
    ("feature_ref", "status", "named"),
    [
        (ref("temperature", feature_view="nope"), 422, "nope:values"),
        (ref("temperature", feature_name="nope"), 422, "series_history:nope"),
        (ref("no-such-series"), 404, "series_id=no-such-series"),
        (ref("temperature", feature_name="unit"), 422, "series_history:unit"),  # a string, not numbers
    ],
)
def test_lookup_errors_come_before_any_event(
    server: Server, feature_ref: dict[str, str], status: int, named: str
) -> None:
    for response in (predict(server, {"feature_ref": feature_ref}), stream(server, {"feature_ref": feature_ref})):
        assert response.status_code == status, response.text
        assert response.headers["content-type"].startswith("application/json")
        (detail,) = response.json()["detail"]  # every lookup failure names the field
        assert detail["loc"] == ["body", "feature_ref"]
        assert detail["type"] == {422: "value_error", 404: "feature_not_found"}[status]
        assert named in detail["msg"]


def test_history_and_feature_ref_together_are_refused(server: Server) -> None:
    response = predict(server, {"history": [1.0, 2.0], "feature_ref": ref("sales")})
    assert response.status_code == 422
    assert "feature_ref" in response.text


def test_mixed_horizons_share_one_batch_and_match_their_answers_alone(server: Server) -> None:
    bodies = [{**BASE, "history": demo_series("traffic")[: 50 + 7 * i], "horizon": 1 + 5 * i} for i in range(12)]
    alone = [predict(server, body).json()["mean"] for body in bodies]
    batched = [{**body, "model_name": "batched"} for body in bodies]  # not the cached answers of the runs alone

    answers = [response.json() for response in predict_at_once(server, "forecast", batched)]
    assert [len(answer["mean"]) for answer in answers] == [body["horizon"] for body in bodies]
    assert [answer["horizon"] for answer in answers] == [body["horizon"] for body in bodies]
    assert max(answer["metadata"]["batch_size"] for answer in answers) > 1
    for answer, mean in zip(answers, alone, strict=True):
        assert answer["mean"] == pytest.approx(mean, rel=1e-5)


def test_a_request_that_fails_or_is_refused_late_fails_alone_in_its_batch(server: Server) -> None:
    bodies = [{**BASE, "history": demo_series("sales")[: 40 + 9 * i], "model_name": "isolation"} for i in range(6)]
    bodies[1]["model_name"] = "fail-in-batch"  # forecast with the rest, then it fails
    bodies[4]["horizon"] = 2000  # within the contract, over the deployment's max_horizon
    mates = [0, 2, 3, 5]
    # Alone under another model_name, so that the batch below is not answered from the cache.
    alone = {i: predict(server, {**bodies[i], "model_name": "alone"}).json()["mean"] for i in mates}

    responses = predict_at_once(server, "forecast", bodies)
    assert [r.status_code for r in responses] == [200, 500, 200, 200, 422, 200]
    assert responses[1].json() == {"detail": "InjectedFault: injected for this request"}
    assert responses[4].json()["detail"][0]["loc"] == ["body", "horizon"]
    for i in mates:
        assert responses[i].json()["mean"] == pytest.approx(alone[i], rel=1e-5)
    assert max(responses[i].json()["metadata"]["batch_size"] for i in mates) > 1


def test_quantiles_when_asked(server: Server) -> None:
    answer = predict(server, {"history": demo_series("sales"), "output_mode": "quantiles"}).json()
    assert set(answer["quantiles"]) == {"0.1", "0.5", "0.9"}
    assert all(len(values) == 12 for values in answer["quantiles"].values())
    assert answer["samples"] is None


def test_the_cache_answers_repeats_until_the_feature_changes(server: Server, feature_repo: Path) -> None:
    body = {"feature_ref": ref("sales"), "horizon": 7}
    first = predict(server, {**body, "request_id": "cache-1"}).json()
    second = predict(server, {**body, "request_id": "cache-2"}).json()
    assert first["metadata"]["cache_hit"] is False
    assert second["metadata"]["cache_hit"] is True
    assert second["request_id"] == "cache-2"
    assert second["mean"] == first["mean"]

    (streamed,) = stream_events(server, body)  # streams never read the cache
    assert "cache_hit" not in streamed["metadata"]

    changed = [value * 3 + 50 for value in demo_series("sales")]
    write_history(feature_repo, FeatureRef(**ref("sales")), changed)
    third = predict(server, {**body, "request_id": "cache-3"}).json()
    assert third["metadata"]["cache_hit"] is False
    assert third["mean"] != first["mean"]
    assert third["mean"] == pytest.approx(predict(server, {"history": changed, "horizon": 7}).json()["mean"])


@pytest.fixture(scope="module")
def redis_port() -> int:
    return free_port()


def start_redis(port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 20
    while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout.strip() != b"PONG":
        assert time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.05)
    return process


def stop_redis(process: subprocess.Popen[bytes]) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(10)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory, redis_port: int) -> Iterator[tuple[Server, Path]]:
    """A server whose forecast deployment reads a real Redis online store."""
    redis = start_redis(redis_port)
    configs = tmp_path_factory.mktemp("redis-configs")
    repo = create_demo_repo(configs / "repo", redis=f"127.0.0.1:{redis_port}")
    (configs / "forecast.yaml").write_text(
        f"""
name: forecast
model: {{build: "tiny.timesfm:build_tiny_timesfm"}}
feature_store: {{repo: "{repo}"}}
"""
    )
    try:
        for server in serve(
            configs, configs / "server.log", env={"SHEAF_CACHE_DIR": str(configs)}, ready=("forecast",)
        ):
            yield server, repo
    finally:
        if redis.poll() is None:
            stop_redis(redis)


def test_redis_down_is_502_and_the_deployment_recovers(redis_server: tuple[Server, Path], redis_port: int) -> None:
    server, repo = redis_server
    body = {"feature_ref": ref("traffic")}
    assert predict(server, body).status_code == 200

    subprocess.run(["redis-cli", "-p", str(redis_port), "shutdown", "nosave"], capture_output=True)
    time.sleep(0.2)
    for response in (predict(server, body), stream(server, body)):
        assert response.status_code == 502, response.text
        (detail,) = response.json()["detail"]
        assert (detail["loc"], detail["type"]) == (["body", "feature_ref"], "feature_store_error")
        assert "series_history:values" in detail["msg"]

    restarted = start_redis(redis_port)
    try:
        create_demo_repo(repo, redis=f"127.0.0.1:{redis_port}")  # a Redis without persistence starts empty
        recovered = predict(server, body)
        assert recovered.status_code == 200
        assert len(recovered.json()["mean"]) == 12
    finally:
        stop_redis(restarted)
