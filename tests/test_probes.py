"""Probes that orchestrators can trust: readiness waits for every model, and says so once in the log."""

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import Server, serve


@pytest.fixture(scope="module")
def loading(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """textgen loaded, forecast loading until the gate file appears."""
    configs = tmp_path_factory.mktemp("loading")
    (configs / "textgen.yaml").write_text(f'model: {{path: "{tiny_lm}"}}\n')
    (configs / "forecast.yaml").write_text(
        'backend: tests.faults:GatedLoadForecast\nmodel: {build: "tiny.timesfm:build_tiny_timesfm"}\n'
    )
    gate = configs / "gate"
    env = {"SHEAF_CACHE_DIR": str(configs / "cache"), "SHEAF_TEST_LOAD_GATE": str(gate)}
    for server in serve(configs, configs / "server.log", env=env, ready=("textgen",)):
        yield server, gate


def test_readyz_waits_for_every_deployment_and_the_log_says_when_all_are_in(loading: tuple[Server, Path]) -> None:
    server, gate = loading
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.get("/forecast/ready").status_code == 503
        assert client.get("/forecast/health").status_code == 200  # alive while it loads
        assert client.get("/readyz").status_code == 503
        assert "every deployment is ready" not in server.log_text()
        gate.touch()
        deadline = time.monotonic() + 60
        while client.get("/forecast/ready").status_code != 200:
            assert time.monotonic() < deadline, server.log_text()[-2000:]
            time.sleep(0.2)
        assert client.get("/readyz").status_code == 200
    deadline = time.monotonic() + 5
    while "every deployment is ready" not in server.log_text():
        assert time.monotonic() < deadline, server.log_text()[-2000:]
        time.sleep(0.1)
    (line,) = [line for line in server.log_text().splitlines() if "every deployment is ready" in line]
    assert f"{server.url}/textgen/predict" in line and f"{server.url}/forecast/predict" in line
    assert re.search(rf"playground at {re.escape(server.url)}/ui\b", line), line
