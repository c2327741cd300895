"""The API key (`sheaf.yaml` `auth:`): real servers with a forecast deployment on a tiny TimesFM."""

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import BENTOML, ROOT, Server, serve

KEY = secrets.token_urlsafe(24)
FORECAST = 'name: forecast\nmodel: {build: "tiny.timesfm:build_tiny_timesfm"}\n'
BODY = {"model_type": "time_series", "history": [float(i % 7) for i in range(64)], "horizon": 4}
PROBES = ("/forecast/health", "/forecast/ready", "/livez", "/readyz", "/healthz")


def config_set(folder: Path, sheaf_yaml: str) -> Path:
    folder.mkdir()
    (folder / "forecast.yaml").write_text(FORECAST)
    (folder / "sheaf.yaml").write_text(sheaf_yaml)
    return folder


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The key from SHEAF_API_KEY; probes and /metrics open, the defaults."""
    root = tmp_path_factory.mktemp("auth-open-probes")
    configs = config_set(root / "configs", "auth: {required: true}\n")
    env = {"SHEAF_API_KEY": KEY, "SHEAF_CACHE_DIR": str(root / "cache")}
    yield from serve(configs, root / "server.log", env=env, ready=("forecast",))


@pytest.fixture(scope="module")
def closed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The key from a variable of its own; probes and /metrics closed too."""
    root = tmp_path_factory.mktemp("auth-closed")
    configs = config_set(
        root / "configs", "auth: {api_key_env: SHEAF_TEST_KEY, open_probes: false, open_metrics: false}\n"
    )
    env = {"SHEAF_TEST_KEY": KEY, "SHEAF_CACHE_DIR": str(root / "cache")}
    yield from serve(configs, root / "server.log", env=env, ready=("forecast",), headers=bearer(KEY))


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def assert_refused(response: httpx.Response, challenge: str = "Bearer") -> None:
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == challenge
    assert response.headers["content-type"] == "application/json"
    assert "forecast" not in response.text


def test_without_the_key_a_route_is_401(guarded: Server) -> None:
    response = httpx.post(f"{guarded.url}/forecast/predict", json=BODY, timeout=30)
    assert_refused(response)
    assert response.json() == {"detail": "missing API key: send `Authorization: Bearer <key>`"}


WRONG = {
    "another key": "Bearer wrong",
    "the key and more": f"Bearer {KEY}x",
    "part of the key": f"Bearer {KEY[:-1]}",
    "another scheme": f"Basic {KEY}",
    "no scheme": KEY,
    "no key": "Bearer",
}


@pytest.mark.parametrize("authorization", WRONG.values(), ids=WRONG)
def test_a_wrong_key_is_401(guarded: Server, authorization: str) -> None:
    response = httpx.post(
        f"{guarded.url}/forecast/predict", json=BODY, headers={"authorization": authorization}, timeout=30
    )
    assert_refused(response, 'Bearer error="invalid_token"')
    assert response.json() == {"detail": "invalid API key"}


def test_the_right_key_is_served(guarded: Server) -> None:
    with httpx.Client(base_url=guarded.url, headers=bearer(KEY), timeout=60) as client:
        assert client.post("/forecast/predict", json=BODY).status_code == 200
        lower_scheme = client.post("/forecast/predict", json=BODY, headers={"authorization": f"bearer {KEY}"})
        assert lower_scheme.status_code == 200
        with client.stream("POST", "/forecast/stream", json=BODY) as stream:
            assert stream.status_code == 200
            assert '"type": "result"' in stream.read().decode()
        assert client.post("/forecast/batch", json=[BODY, BODY]).status_code == 200


def test_unknown_routes_are_401_without_the_key_and_404_with_it(guarded: Server) -> None:
    """A 404 to a caller without the key would tell which deployments exist."""
    for path in ("/nothing/predict", "/nothing/health", "/docs", "/schema.json", "/forecast/nothing"):
        assert_refused(httpx.get(f"{guarded.url}{path}", timeout=30))
    assert httpx.get(f"{guarded.url}/nothing/predict", headers=bearer(KEY), timeout=30).status_code == 404
    assert httpx.get(f"{guarded.url}/schema.json", headers=bearer(KEY), timeout=30).status_code == 200


def test_probes_and_metrics_are_open_by_default(guarded: Server) -> None:
    for path in (*PROBES, "/metrics"):
        assert httpx.get(f"{guarded.url}{path}", timeout=30).status_code == 200, path


def test_probes_and_metrics_closed_by_config_ask_for_the_key(closed: Server) -> None:
    for path in (*PROBES, "/metrics"):
        assert_refused(httpx.get(f"{closed.url}{path}", timeout=30))
        assert httpx.get(f"{closed.url}{path}", headers=bearer(KEY), timeout=30).status_code == 200, path


def test_a_key_from_a_variable_of_its_own(closed: Server) -> None:
    assert_refused(httpx.post(f"{closed.url}/forecast/predict", json=BODY, timeout=30))
    response = httpx.post(f"{closed.url}/forecast/predict", json=BODY, headers=bearer(KEY), timeout=60)
    assert response.status_code == 200, response.text


def start(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """`bentoml serve` of the production set, which refuses before it loads any model, or an import of it."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SHEAF_CONFIG") and k != "SHEAF_API_KEY"}
    return subprocess.run(
        [BENTOML, "serve", "bentos.gateway:Sheaf", "--host", "127.0.0.1", "--port", "1", "--working-dir", str(ROOT)],
        cwd=cwd,
        env={**environ, "BENTOML_HOME": str(cwd / "home"), "SHEAF_CONFIG_SET": "production", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_production_set_refuses_to_start_without_the_key(tmp_path: Path) -> None:
    done = start({}, tmp_path)
    assert done.returncode != 0
    assert done.stderr.strip() == (
        f"sheaf: config error: {ROOT / 'configs' / 'production' / 'sheaf.yaml'}: auth.required is true "
        "but SHEAF_API_KEY is unset or empty: set it to the API key"
    )
    assert start({"SHEAF_API_KEY": "  "}, tmp_path).stderr.strip() == done.stderr.strip()


def test_the_production_set_validates_with_the_key() -> None:
    """Only the import: serving the production set would load its large models."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SHEAF_CONFIG")}
    env = {**environ, "SHEAF_CONFIG_SET": "production", "SHEAF_API_KEY": KEY}
    done = subprocess.run(
        [sys.executable, "-c", "import bentos.gateway"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_the_client_and_the_cli_send_the_key(guarded: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    from sheaf import ClientError, ForecastRequest, SheafClient

    request = ForecastRequest(history=BODY["history"], horizon=4)
    monkeypatch.delenv("SHEAF_API_KEY", raising=False)
    with SheafClient(guarded.url) as client, pytest.raises(ClientError) as refused:
        client.predict("forecast", request)
    assert refused.value.status_code == 401
    with SheafClient(guarded.url, api_key=KEY) as client:
        assert len(client.predict("forecast", request).mean) == 4
    monkeypatch.setenv("SHEAF_API_KEY", KEY)  # the default, for the client and so for the CLI
    with SheafClient(guarded.url) as client:
        assert client.ready("forecast")["status"] == "ready"
    cli = [str(Path(sys.executable).parent / "sheaf"), "--url", guarded.url, "predict", "forecast", "-o", "-"]
    done = subprocess.run([*cli, "--json", json.dumps(BODY)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
