"""Past one machine: two replicas of textgen, each a server of its own, behind one round-robin address
(as a Kubernetes Service puts them), and the entry service pointed at that address by BentoML's own
dependency mapping. Load spreads and batches on each; a dropped stream stops on the replica that
ran it. And two entry services whose deployments share the predict cache in Redis."""

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from sheaf import upstream
from sheaf.cache import RedisCache
from sheaf.streaming import SSEDecoder
from tests.conftest import (
    Server,
    leave_stream_after,
    predict_at_once,
    serve,
    start_server,
    stop_server,
    wait_until_ready,
    worker_pids,
)
from tests.redis_server import RedisServer
from tests.round_robin import RoundRobin

PROMPT = {"model_type": "text_generation", "prompt": "the quick brown fox", "max_new_tokens": 16}


@dataclass
class Replicas:
    entry: Server
    replicas: list[Server]
    processes: list[Any]
    proxy: RoundRobin
    configs: Path

    def answered(self, replica: int, pattern: str) -> list[tuple[str, ...]]:
        """The `textgen predict` log lines of one replica whose request id matches `pattern`."""
        logged = rf"textgen predict request_id=({pattern}) status=(\d+) batch=(\d+)"
        return re.findall(logged, self.replicas[replica].log_text())


@pytest.fixture(scope="module")
def two_replicas(tiny_lm: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    configs = tmp_path_factory.mktemp("two-textgens")
    (configs / "textgen.yaml").write_text(
        f'name: textgen\nmodel: {{path: "{tiny_lm}"}}\nbatching: {{max_batch_size: 8}}\n'
        "limits: {max_pending: 256, max_streams: 32}\nheartbeat_s: 0.3\noptions: {max_new_tokens_limit: 30000}\n"
    )
    env = {"SHEAF_CACHE_DIR": str(configs / "cache")}
    started = [start_server(configs, configs / f"replica-{i}.log", env, service="textgen") for i in range(2)]
    processes = [process for process, _ in started]  # a test that restarts a replica puts its new process here
    try:
        for process, replica in started:
            wait_until_ready(process, replica)
        ports = [int(replica.url.rsplit(":", 1)[1]) for _, replica in started]
        with RoundRobin(ports).running() as proxy:
            depends = {"textgen": proxy.url}
            for entry in serve(configs, configs / "sheaf.log", env, ("textgen",), service="sheaf", depends=depends):
                yield Replicas(entry, [r for _, r in started], processes, proxy, configs)
    finally:
        for process in processes:
            stop_server(process)


def test_load_spreads_over_both_replicas_each_batches_and_answers_equal_solo_runs(two_replicas: Replicas) -> None:
    bodies = [{**PROMPT, "prompt": f"story {i} begins", "request_id": f"spread-{i}"} for i in range(32)]
    with httpx.Client(base_url=two_replicas.entry.url, timeout=60) as client:
        solo = [client.post("/textgen/predict", json={**b, "request_id": f"solo-{i}"}) for i, b in enumerate(bodies)]
    assert [r.status_code for r in solo] == [200] * len(bodies)

    responses = predict_at_once(two_replicas.entry, "textgen", bodies, connections=16)
    assert [r.status_code for r in responses] == [200] * len(bodies)
    assert [r.json()["text"] for r in responses] == [r.json()["text"] for r in solo]
    answered = [two_replicas.answered(i, r"spread-\d+") for i in (0, 1)]
    assert sorted(rid for lines in answered for rid, _, _ in lines) == sorted(f"spread-{i}" for i in range(32))
    for replica, lines in enumerate(answered):
        assert lines, f"replica {replica} got none of the load"
        assert max(int(batch) for _, _, batch in lines) > 1, f"replica {replica} never batched: {lines}"


def test_a_dropped_stream_stops_on_the_replica_that_ran_it(two_replicas: Replicas) -> None:
    body = {**PROMPT, "request_id": "dropped-on-a-replica", "max_new_tokens": 30000}
    leave_stream_after(two_replicas.entry, "textgen", body, events=3)
    cancelled = r"stream dropped-on-a-replica cancelled after (\d+) tokens"
    deadline = time.monotonic() + 30
    while not (logs := [re.search(cancelled, r.log_text()) for r in two_replicas.replicas]) or not any(logs):
        assert time.monotonic() < deadline, "no replica stopped generating"
        time.sleep(0.1)
    (ran,) = [i for i, match in enumerate(logs) if match]
    assert int(logs[ran].group(1)) < 30000  # type: ignore[union-attr]
    assert "dropped-on-a-replica" not in two_replicas.replicas[1 - ran].log_text()


class Streamed(threading.Thread):
    """A long stream read on a thread: its events, and when the last one came."""

    def __init__(self, url: str, request_id: str) -> None:
        super().__init__(daemon=True)
        self.url, self.request_id = url, request_id
        self.events: list[dict[str, Any]] = []
        self.ended_at = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        body = {**PROMPT, "request_id": self.request_id, "max_new_tokens": 30000, "timeout_s": 60}
        decoder = SSEDecoder()
        with httpx.stream("POST", f"{self.url}/textgen/stream", json=body, timeout=90) as response:
            for chunk in response.iter_raw():
                self.events.extend(decoder.feed(chunk))
                if self.stop.is_set() or (self.events and self.events[-1]["done"]):
                    break
        self.ended_at = time.monotonic()


def test_a_killed_replica_fails_only_its_callers_and_rejoins_after_a_restart(two_replicas: Replicas) -> None:
    cluster, proxy = two_replicas, two_replicas.proxy
    time.sleep(upstream.KEEPALIVE_S + 1)  # the entry's idle connections gone: each stream opens its own
    streams = [Streamed(cluster.entry.url, f"kill-stream-{i}") for i in range(4)]
    for stream in streams:
        stream.start()
    deadline = time.monotonic() + 30
    while not (all(len(s.events) >= 2 for s in streams) and all(proxy.open[port] for port in proxy.replicas)):
        counts = {s.request_id: len(s.events) for s in streams}
        assert time.monotonic() < deadline, f"streams not all going on both replicas: {counts}, open: {proxy.open}"
        time.sleep(0.05)

    # Predicts in flight as well, each with a deadline of 20 s.
    bodies = [{**PROMPT, "request_id": f"during-{i}", "max_new_tokens": 32, "timeout_s": 20} for i in range(8)]
    results: list[httpx.Response] = []
    loading = threading.Thread(target=lambda: results.extend(predict_at_once(cluster.entry, "textgen", bodies)))
    loading.start()
    time.sleep(0.3)
    killed_at = time.monotonic()
    killed = cluster.processes[1]
    workers = worker_pids(cluster.replicas[1], "textgen")  # in sessions of their own: killed one by one
    assert workers
    for pid in [killed.pid, *workers]:  # the server and its worker, as when their node dies
        os.kill(pid, signal.SIGKILL)
    killed.wait()

    loading.join(60)
    assert not loading.is_alive(), "predicts hung after a replica died"
    assert {r.status_code for r in results} <= {200, 502, 503}, [(r.status_code, r.text) for r in results]
    assert all(r.elapsed.total_seconds() < 25 for r in results)

    time.sleep(3)
    for stream in streams:
        stream.stop.set()
    for stream in streams:
        stream.join(30)
        assert not stream.is_alive(), f"{stream.request_id} hung"
    broken = [s for s in streams if s.events[-1]["type"] == "error"]
    alive = [s for s in streams if s.events[-1]["type"] != "error"]
    assert broken and alive, [s.events[-1] for s in streams]
    for stream in broken:
        assert stream.events[-1]["code"] == "upstream_error", stream.events[-1]
        assert stream.ended_at - killed_at < 10
    for stream in alive:  # the other replica's streams went on generating
        assert stream.events[-1]["type"] == "token"

    after = [{**PROMPT, "request_id": f"after-{i}"} for i in range(8)]
    answered = predict_at_once(cluster.entry, "textgen", after)
    failures = [line for line in cluster.entry.log_text().splitlines() if "failed upstream" in line]
    routed = {"connections": proxy.connections, "refused": proxy.refused, "dropped": proxy.dropped}
    assert [r.status_code for r in answered] == [200] * len(after), ([r.text for r in answered], failures, routed)
    assert len(cluster.answered(0, r"after-\d+")) == len(after)

    # Restarted on the same port, the replica takes load again.
    port = proxy.replicas[1]
    process, replica = start_server(
        cluster.configs,
        cluster.configs / "replica-1-again.log",
        {"SHEAF_CACHE_DIR": str(cluster.configs / "cache")},
        service="textgen",
        port=port,
    )
    cluster.processes[1], cluster.replicas[1] = process, replica
    wait_until_ready(process, replica)
    again = [{**PROMPT, "prompt": f"again {i}", "request_id": f"again-{i}"} for i in range(32)]
    assert [r.status_code for r in predict_at_once(cluster.entry, "textgen", again, connections=16)] == [200] * 32
    assert cluster.answered(1, r"again-\d+"), "the restarted replica got none of the load"


def test_two_entry_services_share_cache_hits_through_redis_and_ride_out_its_restart(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    (tmp_path / "forecast.yaml").write_text(
        'name: forecast\nmodel: {build: "tiny.timesfm:build_tiny_timesfm"}\n'
        f"cache: {{backend: redis, url: 'redis://{redis_server.address}/0', ttl_s: 600}}\n"
    )
    env = {"SHEAF_CACHE_DIR": str(tmp_path / "cache")}
    started = [start_server(tmp_path, tmp_path / f"stack-{i}.log", env) for i in range(2)]
    try:
        for process, stack in started:
            wait_until_ready(process, stack, ("forecast",))
        one, other = (stack.url for _, stack in started)
        history = [float(i % 7) for i in range(48)]

        def hit(url: str, request_id: str, horizon: int = 4) -> bool:
            body = {"model_type": "time_series", "history": history, "horizon": horizon, "request_id": request_id}
            response = httpx.post(f"{url}/forecast/predict", json=body, timeout=30)
            assert response.status_code == 200, response.text
            assert response.json()["request_id"] == request_id
            return bool(response.json()["metadata"]["cache_hit"])

        assert not hit(one, "first")
        assert hit(other, "second")  # what one replica computed, the other answers from Redis

        redis_server.stop()
        during = time.monotonic()
        assert [hit(url, f"down-{i}", horizon=6) for i, url in enumerate([one, other] * 3)] == [False] * 6
        assert time.monotonic() - during < 10  # misses, without waiting on the Redis that is gone

        redis_server.start()  # back, and empty (no persistence)
        time.sleep(RedisCache.BACK_OFF_S + 0.5)  # each replica tries Redis again once its back-off has passed
        assert not hit(one, "back-a", horizon=8)
        assert hit(other, "back-b", horizon=8)
        assert "predict cache: Redis lookup failed" in started[0][1].log_text()
    finally:
        for process, _ in started:
            stop_server(process)
