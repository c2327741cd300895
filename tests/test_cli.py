"""The `sheaf` command line against a real server, run as a subprocess the way a user runs it."""

import base64
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from sheaf import SheafClient, TextGenerationRequest
from tests.conftest import Server, free_port, speak

FLUX = {"prompt": "a red fox in snow", "height": 32, "width": 64, "num_inference_steps": 3, "seed": 7}
TEXT = {"prompt": "once upon a time", "max_new_tokens": 12, "temperature": 0, "seed": 3}


def sheaf(
    server: Server | str, cwd: Path, *args: str, body: dict[str, Any] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    url = server if isinstance(server, str) else server.url
    extra = ["--json", json.dumps(body)] if body is not None else []
    command = [sys.executable, "-m", "sheaf.cli", "--url", url, *args, *extra]
    done = subprocess.run(command, cwd=cwd, input=stdin and stdin.encode(), capture_output=True, timeout=180)
    # Decoded here, not with text=True, whose universal newlines would turn the progress bar's \r into \n.
    return subprocess.CompletedProcess(command, done.returncode, done.stdout.decode(), done.stderr.decode())


@pytest.fixture(scope="module")
def hello(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("speech") / "hello.wav"
    speak("hello world", path)
    return path


def test_predict_flux_writes_a_png_named_after_the_request(server: Server, tmp_path: Path) -> None:
    done = sheaf(server, tmp_path, "predict", "flux", body={**FLUX, "request_id": "abcdef123456"})
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "wrote flux-abcdef12.png"
    with Image.open(tmp_path / "flux-abcdef12.png") as image:
        assert (image.format, image.size) == ("PNG", (64, 32))
    command = [sys.executable, "-m", "sheaf.cli", "--url", server.url, "predict", "flux", "-o", "-"]
    to_stdout = subprocess.run([*command, "--json", json.dumps(FLUX)], cwd=tmp_path, capture_output=True, timeout=180)
    assert to_stdout.returncode == 0, to_stdout.stderr
    assert to_stdout.stdout == (tmp_path / "flux-abcdef12.png").read_bytes()  # the same seed: the same image


def test_predict_textgen_writes_the_text_the_client_gets(server: Server, tmp_path: Path) -> None:
    with SheafClient(server.url) as client:
        expected = client.predict("textgen", TextGenerationRequest.model_validate(TEXT)).text
    done = sheaf(server, tmp_path, "predict", "textgen", "-o", "out.txt", body=TEXT)
    assert done.returncode == 0, done.stderr
    assert "wrote out.txt" in done.stderr
    assert (tmp_path / "out.txt").read_text() == expected
    from_stdin = sheaf(server, tmp_path, "predict", "textgen", "--json", "-", "-o", "-", stdin=json.dumps(TEXT))
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert from_stdin.stdout == expected + "\n"


def test_predict_whisper_transcribes_an_audio_file(server: Server, tmp_path: Path, hello: Path) -> None:
    done = sheaf(server, tmp_path, "predict", "whisper", "--audio", str(hello), "-o", "a.txt", body={"beam_size": 1})
    assert done.returncode == 0, done.stderr
    assert "hello" in (tmp_path / "a.txt").read_text().lower()


def test_predict_forecast_writes_json_from_a_request_file(server: Server, tmp_path: Path) -> None:
    (tmp_path / "request.json").write_text(json.dumps({"history": [float(i % 7) for i in range(64)], "horizon": 6}))
    done = sheaf(server, tmp_path, "predict", "forecast", "--json", "@request.json", "-o", "forecast.json")
    assert done.returncode == 0, done.stderr
    answer = json.loads((tmp_path / "forecast.json").read_text())
    assert answer["model_type"] == "time_series"
    assert len(answer["mean"]) == answer["horizon"] == 6


def test_stream_flux_draws_a_progress_bar_then_writes_the_png(server: Server, tmp_path: Path) -> None:
    done = sheaf(server, tmp_path, "stream", "flux", "-o", "fox.png", body=FLUX)
    assert done.returncode == 0, done.stderr
    bars = done.stderr.split("\n")[0].split("\r")[1:]
    assert bars == [f"flux [{'#' * (20 * s // 3)}{'-' * (20 - 20 * s // 3)}] {s}/3" for s in (1, 2, 3)]
    assert "wrote fox.png" in done.stderr
    with Image.open(tmp_path / "fox.png") as image:
        assert image.size == (64, 32)


def test_stream_textgen_prints_the_same_text_as_predict(server: Server, tmp_path: Path) -> None:
    predicted = sheaf(server, tmp_path, "predict", "textgen", "-o", "-", body=TEXT)
    streamed = sheaf(server, tmp_path, "stream", "textgen", body=TEXT)
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == predicted.stdout
    assert streamed.stdout.strip()


def test_stream_whisper_prints_one_line_per_segment(server: Server, tmp_path: Path, hello: Path) -> None:
    done = sheaf(server, tmp_path, "stream", "whisper", "--audio", str(hello), body={"beam_size": 1})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines and all(re.fullmatch(r"\[\d+\.\d\d → \d+\.\d\d\] .*", line) for line in lines), lines
    assert "hello" in done.stdout.lower()


def test_stream_events_are_json_lines_ending_with_the_result(server: Server, tmp_path: Path) -> None:
    done = sheaf(server, tmp_path, "stream", "flux", "--events", body=FLUX)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [event["type"] for event in events] == ["progress"] * 3 + ["result"]
    assert events[-1]["seed"] == 7 and events[-1]["image_b64"]
    assert not list(tmp_path.iterdir())  # --events writes no file


def test_stream_events_with_an_output_writes_the_png_too(server: Server, tmp_path: Path) -> None:
    done = sheaf(server, tmp_path, "stream", "flux", "--events", "-o", "fox.png", body=FLUX)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert [event["type"] for event in events] == ["progress"] * 3 + ["result"]
    assert done.stderr.strip() == "wrote fox.png"
    assert (tmp_path / "fox.png").read_bytes() == base64.b64decode(events[-1]["image_b64"])
    # stdout carries the events: the image cannot go there too.
    to_stdout = sheaf(server, tmp_path, "stream", "flux", "--events", "-o", "-", body=FLUX)
    assert (to_stdout.returncode, to_stdout.stdout) == (2, "")
    assert to_stdout.stderr == "error: --events prints the events on stdout: give -o FILE, not -o -\n"


@pytest.mark.parametrize("command", ["predict", "stream"])
def test_a_server_refusal_is_an_error_line_and_exit_1(server: Server, tmp_path: Path, command: str) -> None:
    done = sheaf(server, tmp_path, command, "flux", body={**FLUX, "adapters": ["nope"]})
    assert done.returncode == 1
    assert done.stderr.startswith("error: 422 adapters: "), done.stderr
    assert "Traceback" not in done.stderr


def test_an_invalid_request_is_refused_before_sending(tmp_path: Path) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing is sent: the request never gets that far
    done = sheaf(nobody, tmp_path, "predict", "flux", body={**FLUX, "height": 7})
    assert done.returncode == 2
    assert done.stderr.startswith("error: invalid request: height: "), done.stderr
    assert len(done.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--json", "{not json"], "not valid JSON"),
        (["--json", "[1, 2]"], "JSON object"),
        (["--json", "@missing.json"], "cannot read missing.json"),
    ],
)
def test_bad_json_is_a_usage_error(tmp_path: Path, args: list[str], message: str) -> None:
    done = sheaf(f"http://127.0.0.1:{free_port()}", tmp_path, "predict", "textgen", *args)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and message in done.stderr, done.stderr


def test_an_unknown_deployment_needs_a_model_type(server: Server, tmp_path: Path) -> None:
    done = sheaf(server, tmp_path, "predict", "mine", body={"prompt": "hi"})
    assert done.returncode == 2
    assert "model_type" in done.stderr
    typed = sheaf(server, tmp_path, "predict", "mine", body={"model_type": "text_generation", "prompt": "hi"})
    assert typed.returncode == 1
    assert typed.stderr == "error: 404 no deployment named 'mine'; these exist: flux, forecast, textgen, whisper\n"


def test_an_unreachable_server_is_exit_1(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for command in ("predict", "stream"):
        done = sheaf(url, tmp_path, command, "textgen", body=TEXT)
        assert done.returncode == 1
        assert done.stderr.startswith(f"error: cannot reach {url}: "), done.stderr
    assert sheaf(url, tmp_path, "ready", "textgen").returncode == 1


def test_health_and_ready_print_the_probe_answers(server: Server, tmp_path: Path) -> None:
    health = sheaf(server, tmp_path, "health", "textgen")
    assert (health.returncode, json.loads(health.stdout)) == (0, {"status": "ok"})
    ready = sheaf(server, tmp_path, "ready", "whisper")
    assert (ready.returncode, json.loads(ready.stdout)) == (0, {"status": "ready", "model": "whisper"})
    assert sheaf(server, tmp_path, "ready", "nosuch").returncode == 1


def test_a_stream_failing_midway_ends_its_line_then_the_error(server: Server, tmp_path: Path) -> None:
    done = sheaf(server, tmp_path, "stream", "flux", body={**FLUX, "model_name": "fail-mid-stream"})
    assert done.returncode == 1
    assert done.stderr.endswith("2/3\nerror: stream failed: InjectedFault: injected after two events\n"), done.stderr
    assert not list(tmp_path.iterdir())
