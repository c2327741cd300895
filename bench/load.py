"""Latency at concurrency 1, closed-loop throughput, and open-loop load on `/{name}/predict`."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import psutil

RUNS = 3
WARMUP = 30  # sequential requests first, so that lazy set-up (connections, caches) is not timed
SAMPLES = 60  # sequential requests per latency run
SECONDS = 3.0  # per throughput point
LOAD_SECONDS = 5.0  # per open-loop rate, at least
LOAD_REQUESTS = 20  # per open-loop rate, at least (slow deployments get a longer step)
LOAD_STEPS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)  # open-loop rates, as fractions of the closed-loop best
KEEPALIVE_S = 3.0  # below the servers' keep-alive (uvicorn's 5 s)
SLOWDOWN = 10  # an open-loop rate holds while p99 < SLOWDOWN x the unloaded p50


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def latency_ms(*calls: Callable[[], object]) -> list[tuple[float, float]]:
    """p50 and p99 in milliseconds of each call, each the median over `RUNS` runs after a warm-up.

    The calls take turns, sample by sample, so that a machine that drifts faster or slower
    meanwhile (a shared VM does) shifts them alike and their difference holds."""
    for _ in range(WARMUP):
        for call in calls:
            call()
    runs: list[list[tuple[float, float]]] = []
    for _ in range(RUNS):
        times: list[list[float]] = [[] for _ in calls]
        for _ in range(SAMPLES):
            for call, taken in zip(calls, times, strict=True):
                started = time.perf_counter()
                call()
                taken.append((time.perf_counter() - started) * 1000)
        runs.append([(percentile(taken, 0.5), percentile(taken, 0.99)) for taken in times])
    return [
        (statistics.median(run[i][0] for run in runs), statistics.median(run[i][1] for run in runs))
        for i in range(len(calls))
    ]


async def throughput(
    url: str, name: str, body: dict[str, Any], concurrency: int, path: str | None = None, seconds: float = SECONDS
) -> float:
    """Requests per second with `concurrency` clients each sending as soon as its last answer came,
    to `path` (`/{name}/predict` unless given), for `seconds` a run."""
    return (await closed_loop(url, name, body, concurrency, path=path, seconds=seconds)).rate


@dataclass
class ClosedLoop:
    rate: float  # requests per second, the median of `RUNS` runs
    cpu_ms: float  # the server's CPU per request (its process and workers), the median; 0 when not asked


async def closed_loop(
    url: str,
    name: str,
    body: dict[str, Any],
    concurrency: int,
    *,
    server_pid: int = 0,
    path: str | None = None,
    seconds: float = SECONDS,
) -> ClosedLoop:
    """`throughput`, and the CPU that the server `server_pid` spent per request meanwhile: on a
    shared machine the rate drifts with its neighbours, CPU per request much less."""
    server = psutil.Process(server_pid) if server_pid else None
    async with predicts(url, name, body, connections=concurrency, timeout_s=300, path=path) as post:

        async def worker(until: float) -> int:
            done = 0
            while time.perf_counter() < until:
                if await post() != 200:
                    raise RuntimeError(f"{name} predict failed under load")
                done += 1
            return done

        await asyncio.gather(*(worker(time.perf_counter() + 0.5) for _ in range(concurrency)))  # warm-up
        rates, cpu_ms = [], []
        for _ in range(RUNS):
            cpu_before = _cpu_s(server)
            started = time.perf_counter()
            done = sum(await asyncio.gather(*(worker(started + seconds) for _ in range(concurrency))))
            rates.append(done / (time.perf_counter() - started))
            cpu_ms.append((_cpu_s(server) - cpu_before) * 1000 / done)
    return ClosedLoop(statistics.median(rates), statistics.median(cpu_ms))


def _cpu_s(server: psutil.Process | None) -> float:
    if server is None:
        return 0.0
    processes = [server, *server.children(recursive=True)]
    return sum(sum(p.cpu_times()[:2]) for p in processes if p.is_running())


@asynccontextmanager
async def predicts(
    url: str, name: str, body: dict[str, Any], *, connections: int, timeout_s: float, path: str | None = None
) -> AsyncIterator[Callable[[], Awaitable[int]]]:
    """Send a predict of `body`, answer its status; at most `connections` at once (0: no limit).

    The body is encoded once: the load generator shares the cores with the server, so it
    spends as little of them as it can."""
    data, headers = json.dumps(body).encode(), {"content-type": "application/json"}
    # Idle connections are dropped before uvicorn's 5 s keep-alive closes them: reusing one just as
    # the server closes it is a "Server disconnected" that no server did wrong.
    connector = aiohttp.TCPConnector(limit=connections, keepalive_timeout=KEEPALIVE_S)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(timeout_s)) as session:

        async def post() -> int:
            async with session.post(path or f"/{name}/predict", data=data, headers=headers) as response:
                await response.read()
                return response.status

        yield post


@dataclass
class LoadStep:
    rate: float  # requests per second sent
    p99_ms: float
    errors: int
    sent: int

    def holds(self, unloaded_p50_ms: float) -> bool:
        return self.errors == 0 and self.p99_ms < SLOWDOWN * unloaded_p50_ms


async def open_loop(url: str, name: str, body: dict[str, Any], rate: float) -> LoadStep:
    """Send at `rate` on a fixed schedule, whether or not earlier answers have come."""
    count = max(LOAD_REQUESTS, round(rate * LOAD_SECONDS))
    latencies: list[float] = []
    errors = 0
    async with predicts(url, name, body, connections=0, timeout_s=60) as post:

        async def one(at: float) -> None:
            nonlocal errors
            await asyncio.sleep(at - time.perf_counter())
            started = time.perf_counter()
            try:
                status = await post()
            except (aiohttp.ClientError, TimeoutError):
                errors += 1
                return
            errors += status != 200
            latencies.append((time.perf_counter() - started) * 1000)

        start = time.perf_counter() + 0.1
        await asyncio.gather(*(one(start + i / rate) for i in range(count)))
    return LoadStep(rate, percentile(latencies, 0.99) if latencies else float("inf"), errors, count)


async def load_ladder(url: str, name: str, body: dict[str, Any], best: float, unloaded_p50_ms: float) -> list[LoadStep]:
    """Rising open-loop rates, up to the first that does not hold."""
    steps = []
    for fraction in LOAD_STEPS:
        steps.append(await open_loop(url, name, body, best * fraction))
        print(f"{name} open loop {steps[-1]}")
        if not steps[-1].holds(unloaded_p50_ms):
            break
        await asyncio.sleep(1.0)  # let the queue drain between steps
    return steps
