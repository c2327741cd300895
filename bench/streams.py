"""Stream delivery and cancellation, measured against the moments `bench.stamped` writes down.

- delivery: time to the first event, and for every event the delay from the backend handing
  it over (`emit`) to this client holding it decoded (the first event apart: it comes with
  the response headers of both hops);
- cancellation: this client drops the connection after a few events; the time from then to
  the backend's model work having stopped (`stop`), how many events the backend still
  produced after the drop, and for scale the longest step of a stream left to run;
- concurrent streams: completed streams per second with N clients each opening its next
  stream as soon as its last one ended, and at each N the first event's latency and the
  later events' delay.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from bench.load import KEEPALIVE_S, RUNS, SECONDS, percentile
from sheaf.streaming import SSEDecoder

STREAMS = 10  # per delivery run
CANCELS = 5
EVENTS_BEFORE_DROP = 2


class Stamps:
    """The stamp file: per request id, its `emit` times by event index, and its `stop` time."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, dict[str, Any]]:
        found: dict[str, dict[str, Any]] = defaultdict(lambda: {"emit": {}, "stop": None})
        for line in self.path.read_text().splitlines() if self.path.exists() else []:
            request_id, kind, index, at = line.split()
            if kind == "emit":
                found[request_id]["emit"][int(index)] = float(at)
            else:
                found[request_id]["stop"] = float(at)
        return found

    def wait_for_stop(self, request_id: str, timeout_s: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while (stamps := self.read().get(request_id)) is None or stamps["stop"] is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{request_id}: the backend did not stop within {timeout_s} s")
            time.sleep(0.05)
        return stamps


@dataclass
class Delivery:
    events: int  # per stream
    first_event_ms: float  # request sent -> first event decoded, median over streams
    first_delay_ms: float  # emit -> decoded for the first event (it carries the response headers too)
    later_delay_p50_ms: float  # emit -> decoded, over every later event of every stream
    later_delay_p99_ms: float


@dataclass
class Cancellation:
    stop_ms: float  # median over runs of connection dropped -> model work stopped
    step_ms: float  # the median gap between events of a stream run to its end: one step, token or window
    longest_step_ms: float  # and its longest gap
    events_after_drop: int  # the most events the backend produced after any drop


def received(client: httpx.Client, name: str, body: dict[str, Any], drop_after: int | None = None) -> list[float]:
    """Monotonic times at which each event arrived decoded, until the end or `drop_after` events."""
    times: list[float] = []
    decoder = SSEDecoder()
    with client.stream("POST", f"/{name}/stream", json=body) as response:
        response.raise_for_status()
        for chunk in response.iter_raw():
            now = time.monotonic()
            times += [now] * len(decoder.feed(chunk))
            if drop_after is not None and len(times) >= drop_after:
                break  # leaving the block closes the connection mid-stream
    return times


def delivery(url: str, name: str, body: dict[str, Any], stamps: Stamps) -> Delivery:
    firsts, first_delays, delays, counts = [], [], [], []
    with httpx.Client(base_url=url, timeout=300) as client:
        received(client, name, {**body, "request_id": f"warm-{name}"})
        for i in range(STREAMS):
            request_id = f"delivery-{name}-{i}"
            sent = time.monotonic()
            times = received(client, name, {**body, "request_id": request_id})
            emitted = stamps.wait_for_stop(request_id)["emit"]
            firsts.append((times[0] - sent) * 1000)
            first_delays.append((times[0] - emitted[0]) * 1000)
            delays += [(at - emitted[index]) * 1000 for index, at in enumerate(times) if index]
            counts.append(len(times))
    return Delivery(
        round(statistics.median(counts)),
        statistics.median(firsts),
        statistics.median(first_delays),
        percentile(delays, 0.5) if delays else math.nan,
        percentile(delays, 0.99) if delays else math.nan,
    )


def cancellation(url: str, name: str, body: dict[str, Any], stamps: Stamps) -> Cancellation:
    stops, after = [], []
    with httpx.Client(base_url=url, timeout=300) as client:
        # One stream run to its end: the gaps between its events are the backend's steps.
        received(client, name, {**body, "request_id": f"whole-{name}"})
        emitted = sorted(stamps.wait_for_stop(f"whole-{name}")["emit"].values())
        steps_ms = [(b - a) * 1000 for a, b in itertools.pairwise(emitted)]
        for i in range(CANCELS):
            request_id = f"cancel-{name}-{i}"
            received(client, name, {**body, "request_id": request_id}, drop_after=EVENTS_BEFORE_DROP)
            dropped = time.monotonic()
            found = stamps.wait_for_stop(request_id)
            stops.append((found["stop"] - dropped) * 1000)
            after.append(sum(at > dropped for at in found["emit"].values()))
    return Cancellation(statistics.median(stops), statistics.median(steps_ms), max(steps_ms), max(after))


@dataclass
class Concurrent:
    rate: float  # completed streams per second, the median of `RUNS` runs
    first_event_ms: float  # stream opened -> first event decoded, median over the streams
    later_delay_p50_ms: float  # emit -> decoded, over every later event of every stream


async def concurrent_streams(
    url: str, name: str, body: dict[str, Any], concurrency: int, stamps: Stamps, seconds: float = SECONDS
) -> Concurrent:
    """Closed-loop streams: `concurrency` clients, each opening its next stream as its last one ends,
    for `seconds` a run."""
    numbers = itertools.count()
    arrivals: dict[str, tuple[float, list[float]]] = {}  # request id -> (opened, events decoded)
    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=KEEPALIVE_S)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(300)) as session:

        async def one(timed: bool) -> None:
            request_id = f"concurrent-{name}-{concurrency}-{next(numbers)}"
            decoder, times = SSEDecoder(), []
            opened = time.monotonic()
            async with session.post(f"/{name}/stream", json={**body, "request_id": request_id}) as response:
                if response.status != 200:
                    raise RuntimeError(f"{name} stream failed under load: {response.status}")
                async for chunk in response.content.iter_any():
                    times += [time.monotonic()] * len(decoder.feed(chunk))
            if timed:
                arrivals[request_id] = (opened, times)

        async def worker(until: float, timed: bool) -> int:
            done = 0
            while time.perf_counter() < until:
                await one(timed)
                done += 1
            return done

        await asyncio.gather(*(worker(time.perf_counter() + 0.5, False) for _ in range(concurrency)))  # warm-up
        rates = []
        for _ in range(RUNS):
            started = time.perf_counter()
            done = sum(await asyncio.gather(*(worker(started + seconds, True) for _ in range(concurrency))))
            rates.append(done / (time.perf_counter() - started))
    found = stamps.read()
    firsts = [(times[0] - opened) * 1000 for opened, times in arrivals.values() if times]
    delays = [
        (at - found[request_id]["emit"][index]) * 1000
        for request_id, (_, times) in arrivals.items()
        for index, at in enumerate(times)
        if index and index in found[request_id]["emit"]
    ]
    return Concurrent(
        statistics.median(rates),
        statistics.median(firsts),
        percentile(delays, 0.5) if delays else math.nan,
    )
