"""The README's examples, run against the default configs (real SmolLM2 weights) in the built bento."""

import base64
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from sheaf.streaming import SSEDecoder
from tests.conftest import (
    DEPLOYMENTS,
    ROOT,
    Server,
    free_port,
    speak,
    stop_server,
    wait_until_ready,
    write_test_configs,
)

README = (ROOT / "README.md").read_text()


@pytest.fixture(scope="module")
def default_server(bento_server: Server) -> Server:
    """`make serve`'s own configs, served from the bento built from this repo."""
    return bento_server


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def test_readme_opens_with_the_two_set_up_commands() -> None:
    first = blocks("bash")[0]
    assert first.splitlines()[0].startswith("make serve")
    assert first.splitlines()[1].startswith("make test")


def curl_example(name: str) -> str:
    return next(block for block in blocks("bash") if f"127.0.0.1:3000/{name}/" in block)


def run_example(block: str, server: Server, cwd: Path) -> str:
    """Run a README shell example as written, against the test server."""
    script = block.replace("127.0.0.1:3000", server.url.removeprefix("http://"))
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_textgen_example_streams_real_text(default_server: Server, tmp_path: Path) -> None:
    *tokens, result = SSEDecoder().feed(run_example(curl_example("textgen"), default_server, tmp_path))
    assert len(tokens) > 5 and {event["type"] for event in tokens} == {"token"}
    assert result["type"] == "result"
    assert result["text"] == "".join(event["text"] for event in tokens)
    assert "Paris" in result["text"]


def test_textgen_tokens_leave_as_they_are_generated(default_server: Server) -> None:
    words = shlex.split(curl_example("textgen").replace("\\\n", " "))
    body = json.loads(words[words.index("-d") + 1])
    reads: list[list[dict[str, Any]]] = []
    decoder = SSEDecoder()
    with httpx.stream("POST", f"{default_server.url}/textgen/stream", json=body, timeout=120) as response:
        for chunk in response.iter_raw():
            reads.append(decoder.feed(chunk))
    tokens = [event for read in reads for event in read if event["type"] == "token"]
    # Many network reads, not one at the end: the tokens went out while the model was still generating.
    assert len([read for read in reads if read]) > len(tokens) // 2


def test_the_flux_example_streams_progress_then_an_image(default_server: Server, tmp_path: Path) -> None:
    *progress, result = SSEDecoder().feed(run_example(curl_example("flux"), default_server, tmp_path))
    assert [event["step"] for event in progress] == list(range(1, 9))
    assert result["type"] == "result" and (result["width"], result["height"], result["seed"]) == (256, 256, 7)
    assert base64.b64decode(result["image_b64"]).startswith(b"\x89PNG")


def test_the_whisper_example_transcribes_speech(default_server: Server, tmp_path: Path) -> None:
    *segments, result = SSEDecoder().feed(run_example(curl_example("whisper"), default_server, tmp_path))
    assert segments and {event["type"] for event in segments} == {"segment"}
    assert "tomorrow morning" in result["text"].lower()


def test_the_forecast_example_answers_quantiles(default_server: Server, tmp_path: Path) -> None:
    answer = json.loads(run_example(curl_example("forecast"), default_server, tmp_path))
    assert len(answer["mean"]) == 24
    assert set(answer["quantiles"]) == {"0.1", "0.5", "0.9"}
    assert answer["metadata"]["feature"] == "series_history:values"


def test_the_jobs_example_reads_a_log_again_from_after_an_event(default_server: Server, tmp_path: Path) -> None:
    block = next(block for block in blocks("bash") if "/flux/jobs" in block)
    lines = run_example(block, default_server, tmp_path).splitlines()
    assert lines[0] == "id: 8"  # the first event after event 7
    assert lines[-1].startswith('{"job_id":"flux-') and '"status":"succeeded"' in lines[-1]


def test_the_openai_curl_example_transcribes_to_subtitles(default_server: Server, tmp_path: Path) -> None:
    block = next(block for block in blocks("bash") if "/v1/audio/transcriptions" in block)
    subtitles = run_example(block, default_server, tmp_path)
    assert re.match(r"1\n00:00:00,\d{3} --> 00:00:0\d,\d{3}\n", subtitles), subtitles
    assert "tomorrow morning" in subtitles.lower()


def test_the_playground_ships_in_the_bento(default_server: Server) -> None:
    page = httpx.get(f"{default_server.url}/ui/", timeout=10)
    assert page.status_code == 200 and "<script" in page.text
    assert httpx.get(f"{default_server.url}/ui/static/app.js", timeout=10).status_code == 200


def test_the_python_examples_run(default_server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    for code in blocks("python"):
        exec(compile(code.replace("http://127.0.0.1:3000", default_server.url), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "Paris" in printed
    assert "tokens" in printed


def test_the_command_line_examples_run(default_server: Server, tmp_path: Path) -> None:
    block = next(block for block in blocks("bash") if block.startswith("sheaf "))
    speak("Please send me the report by tomorrow morning.", tmp_path / "meeting.wav")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "SHEAF_URL": default_server.url,
    }
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert "8/8" in done.stderr  # the progress bar reached the last step
    with Image.open(tmp_path / "fox.png") as image:
        assert image.size == (256, 256)
    assert "tomorrow morning" in (tmp_path / "meeting.txt").read_text().lower()
    forecast = json.loads(done.stdout[done.stdout.index("{") :])
    assert len(forecast["mean"]) == 4


def test_the_commands_that_serve_each_service_on_its_own_run(tiny_lm: Path, feature_repo: Path, tmp_path: Path) -> None:
    """The "Each service on its own" block as written (on free ports, with the test configs)."""
    block = next(block for block in blocks("bash") if "start-http-server" in block)
    ports = {port: free_port() for port in range(3000, 3005)}
    script = block.replace(".venv/bin/python", sys.executable)
    for port, free in ports.items():
        script = script.replace(f"127.0.0.1:{port}", f"127.0.0.1:{free}").replace(f"--port {port}", f"--port {free}")
    configs = write_test_configs(tmp_path, tiny_lm, feature_repo)
    env = {
        **os.environ,
        "SHEAF_CONFIG_DIR": str(configs),
        "SHEAF_CACHE_DIR": str(configs / "cache"),
        "BENTOML_HOME": str(tmp_path / "bentoml-home"),
    }
    with (tmp_path / "servers.log").open("wb") as log:
        servers = subprocess.Popen(
            ["bash", "-c", f"{script}\nwait"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    entry = Server(f"http://127.0.0.1:{ports[3000]}", tmp_path / "servers.log", servers.pid)
    try:
        wait_until_ready(servers, entry, DEPLOYMENTS)
        body = {"model_type": "text_generation", "prompt": "hello", "max_new_tokens": 4}
        answer = httpx.post(f"{entry.url}/textgen/predict", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        assert httpx.get(f"{entry.url}/readyz", timeout=10).status_code == 200
    finally:
        stop_server(servers)  # the servers are in its session: each stops its workers
