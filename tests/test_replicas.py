"""Batching beside the model: two replicas of one deployment behind one address each form their
own batches, and every request is answered once, by one of them."""

import asyncio
import re
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sheaf.upstream import KEEPALIVE_S
from tests.conftest import Server, serve

REQUESTS = 192
ROUNDS = 3
CONCURRENCY = 32
LOGGED = re.compile(r"forecast predict request_id=(\S+) status=(\d+) batch=(\d+) worker=(\d+)")
LOADED = re.compile(r"\[service:forecast:(\d+)\] deployment forecast loaded")


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    configs = tmp_path_factory.mktemp("replicas")
    (configs / "forecast.yaml").write_text(
        'name: forecast\nmodel: {build: "tiny.timesfm:build_tiny_timesfm"}\nworkers: 2\nthreads: 1\n'
        "batching: {max_batch_size: 16}\nlimits: {max_pending: 1024}\n"
    )
    env = {"SHEAF_CACHE_DIR": str(configs / "cache")}
    for server in serve(configs, configs / "server.log", env=env, ready=("forecast",)):
        wait_for_both_replicas(server)
        yield server


def wait_for_both_replicas(server: Server) -> None:
    """Ready means one replica answers; a slower one (importing torch on a busy machine) would find
    every kept-alive connection already taken by the first, and get none of the load."""
    deadline = time.monotonic() + 120
    while len(set(LOADED.findall(server.log_text()))) < 2:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the second replica did not load in time:\n{server.log_text()[-3000:]}")
        time.sleep(0.2)


async def predict_all(url: str, tag: str) -> list[httpx.Response]:
    limit = asyncio.Semaphore(CONCURRENCY)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one(i: int) -> httpx.Response:
            body = {"history": [float((i + t) % 24) for t in range(64)], "horizon": 8, "request_id": f"{tag}-{i}"}
            async with limit:
                return await client.post("/forecast/predict", json=body)

        return await asyncio.gather(*(one(i) for i in range(REQUESTS)))


def test_each_replica_batches_what_it_receives_and_nothing_is_lost_or_answered_twice(two_replicas: Server) -> None:
    # The replicas share one listening socket, and whichever accepts first may take nearly every
    # connection the entry service opens at once (asyncio accepts a backlog's worth in one go): a
    # replica left with one connection gets its predicts one at a time and cannot batch. So the load
    # comes in up to ROUNDS rounds, each after the entry service's idle connections have closed (its
    # keep-alive), until both replicas have batched; every round must lose and repeat nothing.
    batches: dict[str, list[int]] = defaultdict(list)
    for round_ in range(ROUNDS):
        tag = f"r{round_}"
        responses = asyncio.run(predict_all(two_replicas.url, tag))
        assert [r.status_code for r in responses] == [200] * REQUESTS
        assert [r.json()["request_id"] for r in responses] == [f"{tag}-{i}" for i in range(REQUESTS)]

        log = Path(two_replicas.log).read_text(errors="replace")
        answered = [match.groups() for match in LOGGED.finditer(log)]
        # This round's requests only (the readiness polls are not predicts): each answered once, by one replica.
        ours = [(rid, int(batch), worker) for rid, status, batch, worker in answered if rid.startswith(f"{tag}-")]
        assert sorted(rid for rid, _, _ in ours) == sorted(f"{tag}-{i}" for i in range(REQUESTS))
        for _, batch, worker in ours:
            batches[worker].append(batch)
        if len(batches) == 2 and all(max(sizes) > 1 for sizes in batches.values()):
            break
        time.sleep(KEEPALIVE_S + 1)
    assert len(batches) == 2, f"one replica took all the load: {dict(batches)}"
    for worker, sizes in batches.items():
        assert max(sizes) > 1, f"replica {worker} never batched in {ROUNDS} rounds: {sizes}"
