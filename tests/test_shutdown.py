"""SIGTERM ends the whole server within its grace period, long requests in flight or not,
after a deployment worker was killed and restarted too (a real server, textgen on a tiny model)."""

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from sheaf.shutdown import GRACE_S
from tests.conftest import Server, serve

EXIT_WITHIN_S = GRACE_S + 10  # the grace, then the deployments' own shutdown
LONG = {"model_type": "text_generation", "prompt": "once upon a time", "max_new_tokens": 25000}


def deployment_worker(server: Server, name: str) -> psutil.Process | None:
    for process in psutil.Process(server.pid).children(recursive=True):
        command = process.cmdline()
        if "--service-name" in command and command[command.index("--service-name") + 1] == name:
            return process
    return None


def kill_and_wait_for_restart(server: Server, name: str) -> None:
    """kill -9 the deployment's worker, then wait for BentoML's new one to be ready."""
    old = deployment_worker(server, name)
    assert old is not None
    old.kill()
    old.wait(10)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        new = deployment_worker(server, name)
        if new is not None and new.pid != old.pid:
            try:
                if httpx.get(f"{server.url}/{name}/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
        time.sleep(0.3)
    raise AssertionError(f"{name} did not come back after kill -9:\n{server.log_text()[-3000:]}")


def sigterm(server: Server, wait_s: float) -> float:
    """SIGTERM the process group leader, `bentoml serve`, as an orchestrator does: the seconds until
    it and every worker have exited."""
    processes = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
    start = time.monotonic()
    os.kill(server.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(processes, timeout=wait_s)
    took = time.monotonic() - start
    assert not alive, (f"{took:.0f} s after SIGTERM", [process.cmdline()[-8:] for process in alive])
    return took


class Stream(threading.Thread):
    """A long textgen stream, read to its end: its events, once the first has arrived."""

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.url = f"{server.url}/textgen/stream"
        self.begun = threading.Event()
        self.events: list[dict[str, Any]] = []
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", self.url, json=LONG, timeout=120) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(json.loads(line.removeprefix("data: ")))
                        self.begun.set()
        except BaseException as exc:
            self.failure = exc
            self.begun.set()


class Predict(threading.Thread):
    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.url = f"{server.url}/textgen/predict"
        self.response: httpx.Response | None = None

    def run(self) -> None:
        self.response = httpx.post(self.url, json=LONG, timeout=120)


def test_sigterm_after_a_worker_restart_ends_the_server_within_the_grace(tiny_lm: Path, tmp_path: Path) -> None:
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "textgen.yaml").write_text(
        f'name: textgen\nmodel: {{path: "{tiny_lm}"}}\noptions: {{max_new_tokens_limit: 30000}}\n'
    )
    servers = serve(configs, tmp_path / "server.log", ready=("textgen",))
    server = next(servers)
    try:
        kill_and_wait_for_restart(server, "textgen")
        streams = [Stream(server) for _ in range(2)]
        predict = Predict(server)
        for thread in (*streams, predict):
            thread.start()
        for stream in streams:
            assert stream.begun.wait(60), server.log_text()[-3000:]
            assert stream.failure is None, stream.failure
        time.sleep(1)  # the predict is in its batch

        took = sigterm(server, wait_s=EXIT_WITHIN_S + 30)
        assert took <= EXIT_WITHIN_S, took
        assert took >= GRACE_S - 1, took  # the requests had their grace

        for thread in (*streams, predict):
            thread.join(10)
        for stream in streams:
            assert stream.failure is None, stream.failure
            assert stream.events[-1] == {
                "type": "error",
                "done": True,
                "error": "the server is shutting down",
                "code": "shutting_down",
            }
            assert all(event["type"] == "token" for event in stream.events[:-1])
        assert predict.response is not None
        assert predict.response.status_code == 503, predict.response.text
        assert predict.response.headers["retry-after"] == "1"
    finally:
        next(servers, None)  # SIGKILLs whatever is left


def test_a_client_that_left_mid_body_does_not_hold_the_shutdown(tmp_path: Path) -> None:
    """BentoML waits `traffic.timeout` (here 330 s) for an answer to a request whose route answered nothing."""
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "forecast.yaml").write_text('name: forecast\nmodel: {build: "tiny.timesfm:build_tiny_timesfm"}\n')
    servers = serve(
        configs, tmp_path / "server.log", env={"SHEAF_CACHE_DIR": str(tmp_path / "cache")}, ready=("forecast",)
    )
    server = next(servers)
    try:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            head = b"POST /forecast/predict HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 1000\r\n\r\n"
            sock.sendall(head + b'{"model_type": "time_series", "hist')
            time.sleep(1)  # the route is reading the body
        time.sleep(1)  # and has seen its client leave
        assert httpx.get(f"{server.url}/forecast/ready", timeout=10).status_code == 200
        assert sigterm(server, wait_s=60) <= 10
    finally:
        next(servers, None)
