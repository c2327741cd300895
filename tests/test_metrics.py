"""sheaf's own series on the entry service's `/metrics`, recorded inside each deployment's worker."""

import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from sheaf.metrics import FOLDER_PREFIX, remove_stale_folders
from sheaf.streaming import SSEDecoder
from tests.conftest import Server, predict_at_once, serve

TEXT = {"model_type": "text_generation", "prompt": "the quick brown fox", "max_new_tokens": 6}
LONG = {**TEXT, "max_new_tokens": 20000}
IMAGE = {"model_type": "diffusion", "prompt": "a fox", "height": 64, "width": 64, "num_inference_steps": 2}
FEATURE = {
    "model_type": "time_series",
    "horizon": 4,
    "feature_ref": {
        "feature_view": "series_history",
        "feature_name": "values",
        "entity_key": "series_id",
        "entity_value": "traffic",
    },
}


def samples(server: Server) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("sheaf_")
    }


def value(series: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return series.get((name, frozenset(labels.items())), 0.0)


def test_streams_batches_adapters_and_lookups_are_counted(server: Server) -> None:
    before = samples(server)

    with httpx.stream("POST", f"{server.url}/textgen/stream", json=TEXT, timeout=60) as response:
        tokens = sum(chunk.count('"type": "token"') for chunk in response.iter_text())
    with httpx.stream("POST", f"{server.url}/textgen/stream", json=LONG, timeout=60) as response:
        decoder = SSEDecoder()
        for chunk in response.iter_raw():  # past `: accepted` to one event, then the client leaves
            if decoder.feed(chunk):
                break
    for adapters in (["a"], ["b"]):
        httpx.post(f"{server.url}/flux/stream", json={**IMAGE, "adapters": adapters}, timeout=60).raise_for_status()
    httpx.post(f"{server.url}/forecast/predict", json=FEATURE, timeout=60).raise_for_status()

    predict_at_once(server, "textgen", [TEXT] * 4)
    time.sleep(1.0)  # the cancelled stream is counted when its worker notices the client left
    after = samples(server)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("sheaf_stream_events_total", deployment="textgen", type="token") >= tokens + 1
    assert grew("sheaf_stream_events_total", deployment="textgen", type="result") >= 1
    assert grew("sheaf_streams_cancelled_total", deployment="textgen") >= 1
    assert grew("sheaf_stream_events_total", deployment="flux", type="progress") >= 4
    # Mixed adapter batches: ["a"] and ["b"] ran without the pipeline's own selection changing.
    assert grew("sheaf_adapter_swaps_total", deployment="flux") == 0
    assert grew("sheaf_adapter_lock_wait_seconds_count", deployment="flux") >= 2
    assert grew("sheaf_feature_lookup_seconds_count", deployment="forecast") >= 1
    assert grew("sheaf_batch_size_count", deployment="textgen", route="predict") >= 1
    assert grew("sheaf_batch_size_sum", deployment="textgen", route="predict") >= 4
    assert grew("sheaf_batch_size_count", deployment="flux", route="stream") >= 2


def test_an_error_after_the_stream_began_is_counted(server: Server) -> None:
    before = value(samples(server), "sheaf_stream_errors_after_start_total", deployment="textgen")
    with httpx.stream(
        "POST", f"{server.url}/textgen/stream", json={**TEXT, "model_name": "fail-mid-stream"}, timeout=60
    ) as response:
        response.read()
    after = value(samples(server), "sheaf_stream_errors_after_start_total", deployment="textgen")
    assert after == before + 1


def test_logs_carry_the_request_id(server: Server) -> None:
    httpx.post(f"{server.url}/textgen/predict", json={**TEXT, "request_id": "logged-predict"}, timeout=60)
    httpx.post(f"{server.url}/textgen/stream", json={**TEXT, "request_id": "logged-stream"}, timeout=60)
    time.sleep(0.5)
    log = server.log_text()
    assert "textgen predict request_id=logged-predict status=200" in log
    assert "textgen stream request_id=logged-stream events=" in log


def test_each_server_keeps_its_own_counts(tmp_path: Path) -> None:
    # Two servers on one BENTOML_HOME, as every `bentoml serve` of a user is by default.
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "forecast.yaml").write_text(
        """
name: forecast
model: {build: "tiny.timesfm:build_tiny_timesfm"}
batching: {max_batch_size: 4, max_queue_ms: 60000}
"""
    )
    inherited = tmp_path / "inherited"  # Feast sets PROMETHEUS_MULTIPROC_DIR in any process that imports it
    inherited.mkdir()
    env = {
        "BENTOML_HOME": str(tmp_path / "bentoml-home"),
        "SHEAF_CACHE_DIR": str(tmp_path / "cache"),
        "PROMETHEUS_MULTIPROC_DIR": str(inherited),
    }
    body = {"model_type": "time_series", "history": [1.0, 2.0, 3.0, 4.0], "horizon": 2}
    server = contextmanager(serve)

    def predicts(target: Server) -> float:
        return value(samples(target), "sheaf_batch_size_count", deployment="forecast", route="predict")

    def send(target: Server, count: int) -> None:
        for _ in range(count):  # one at a time: a batch each
            httpx.post(f"{target.url}/forecast/predict", json=body, timeout=60).raise_for_status()

    def folders(target: Server) -> list[Path]:
        return list(Path(tempfile.gettempdir()).glob(f"sheaf-metrics-{target.pid}-*"))

    with server(configs, tmp_path / "first.log", env=env, ready=("forecast",)) as first:
        send(first, 3)
        assert predicts(first) == 3
        with server(configs, tmp_path / "second.log", env=env, ready=("forecast",)) as second:
            assert predicts(first) == 3  # the second's start left the first's counts alone
            assert predicts(second) == 0  # and shows none of them
            send(second, 2)
            assert predicts(second) == 2
            assert predicts(first) == 3
            assert len(folders(first)) == 1 and len(folders(second)) == 1
        assert folders(second) == []  # removed when its server stopped
        send(first, 1)
        assert predicts(first) == 4
    assert folders(first) == []


def test_the_folders_of_killed_servers_go_at_the_next_start(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid now names no process
    killed = tmp_path / f"{FOLDER_PREFIX}{gone.pid}-abc"
    running = tmp_path / f"{FOLDER_PREFIX}{os.getpid()}-def"
    unrelated = tmp_path / "sheaf-metrics-notes"
    for folder in (killed, running, unrelated):
        folder.mkdir()
        (folder / "counter_1.db").write_bytes(b"")
    remove_stale_folders(str(tmp_path))
    assert not killed.exists()
    assert running.exists() and unrelated.exists()
