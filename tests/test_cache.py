"""The predict cache: keys ignore request_id, entries expire, the least recently used go first,
and a byte budget bounds what it holds; in Redis, replicas share entries and an outage is a miss."""

import asyncio
import math
import random
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pydantic_core

from sheaf.cache import PredictCache, RedisCache, cache_from_config, cache_key, json_size_at_least
from sheaf.config import Cache
from tests.conftest import Server
from tests.redis_server import RedisServer


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def answer(text: str = "x") -> dict[str, Any]:
    return {"text": text, "metadata": {}}


def test_the_key_ignores_request_id_and_field_order() -> None:
    assert cache_key({"request_id": "a", "x": 1, "y": [1, 2]}) == cache_key({"y": [1, 2], "x": 1, "request_id": "b"})
    assert cache_key({"x": 1}) != cache_key({"x": 2})


def test_entries_expire_after_their_ttl() -> None:
    clock = Clock()
    cache = PredictCache(max_entries=10, ttl_s=5, clock=clock)
    cache.put("k", {"v": 1})
    clock.now = 5
    assert cache.get("k") == {"v": 1}
    clock.now = 5.01
    assert cache.get("k") is None
    assert len(cache) == 0


def test_the_least_recently_used_entry_is_dropped_first() -> None:
    cache = PredictCache(max_entries=2, ttl_s=60, clock=Clock())
    cache.put("a", {"v": "a"})
    cache.put("b", {"v": "b"})
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", {"v": "c"})
    assert cache.get("b") is None
    assert cache.get("a") == {"v": "a"} and cache.get("c") == {"v": "c"}


def test_expired_entries_go_when_an_answer_is_stored_though_nobody_asks_for_them() -> None:
    clock = Clock()
    cache = PredictCache(max_entries=100, ttl_s=60, clock=clock)
    for i in range(20):
        cache.put(f"old-{i}", answer())
    clock.now = 61
    cache.put("new", answer())
    assert len(cache) == 1
    alone = PredictCache(max_entries=100, ttl_s=60, clock=clock)
    alone.put("new", answer())
    assert cache.held_bytes == alone.held_bytes


def test_an_entry_read_often_still_expires_at_its_ttl() -> None:
    clock = Clock()
    cache = PredictCache(max_entries=100, ttl_s=60, clock=clock)
    cache.put("read-often", answer())
    clock.now = 30
    cache.put("later", answer())
    clock.now = 59
    assert cache.get("read-often") is not None  # the most recently used now, but still the oldest
    clock.now = 61
    cache.put("newest", answer())
    assert len(cache) == 2
    assert cache.get("later") is not None and cache.get("newest") is not None


def test_the_byte_budget_drops_the_least_recently_used() -> None:
    one = PredictCache(max_entries=100, ttl_s=60)
    one.put("k0", answer("a" * 1000))
    size = one.held_bytes
    assert size > 1000
    cache = PredictCache(max_entries=100, ttl_s=60, max_bytes=3 * size, max_entry_bytes=size, clock=Clock())
    for key in ("k1", "k2", "k3"):
        assert cache.put(key, answer("a" * 1000))
    assert cache.get("k1") is not None  # k2 is now the least recently used
    assert cache.put("k4", answer("a" * 1000))
    assert cache.get("k2") is None
    assert all(cache.get(key) is not None for key in ("k1", "k3", "k4"))
    assert cache.held_bytes == 3 * size


def test_an_answer_over_max_entry_bytes_is_not_kept() -> None:
    cache = PredictCache(max_entries=100, ttl_s=60, max_bytes=100_000, max_entry_bytes=2_000, clock=Clock())
    assert not cache.put("huge", {"samples": [[0.5] * 1000 for _ in range(1000)]})  # refused unencoded
    # Two characters a float, by the cheap count; nearly twenty, encoded.
    assert not cache.put("long floats", {"mean": [random.random() for _ in range(200)]})
    assert cache.put("small", {"mean": [0.5] * 20})
    assert len(cache) == 1 and cache.get("huge") is None and cache.get("long floats") is None
    assert 0 < cache.held_bytes <= 2_000


def test_a_refused_answer_drops_an_older_answer_to_the_same_request() -> None:
    cache = PredictCache(max_entries=100, ttl_s=60, max_bytes=100_000, max_entry_bytes=2_000, clock=Clock())
    cache.put("k", {"mean": [0.5]})
    assert not cache.put("k", {"mean": [0.5] * 5000})
    assert cache.get("k") is None and cache.held_bytes == 0


def test_the_answer_comes_back_as_it_was_stored_whatever_the_caller_does_with_it() -> None:
    cache = PredictCache(max_entries=10, ttl_s=60, clock=Clock())
    stored = {"mean": [0.1, math.inf, -math.inf], "seed": 2**63 - 1, "text": "héllo", "metadata": {"a": None}}
    cache.put("k", stored)
    first = cache.get("k")
    assert first == stored
    assert first is not None
    first["mean"].append(1.0)
    first["metadata"]["b"] = 1
    assert cache.get("k") == stored
    cache.put("nan", {"mean": [math.nan]})
    nan = cache.get("nan")
    assert nan is not None and math.isnan(nan["mean"][0])


def test_the_cheap_count_never_passes_the_encoded_length() -> None:
    values: list[Any] = [
        [],
        {},
        "",
        [1, 2, 3],
        [[1.5, 2.5], [3.25]],
        {"a": [1, "bc", {"d": None}], "e": True, "é": "ü"},
        ["x", [1, [2, [3]]], {}],
        [0.1234567] * 100,
        [{"k": i} for i in range(50)],
    ]
    for value in values:
        assert json_size_at_least(value, 10**9) <= len(pydantic_core.to_json(value)), value
    assert json_size_at_least([[0.5] * 1000] * 1000, 5_000) > 5_000


def test_from_config_takes_the_budgets_in_megabytes() -> None:
    cache = PredictCache.from_config(Cache(enabled=True, max_mb=1, max_entry_mb=0.5))
    assert not cache.put("over", {"text": "a" * 600_000})
    assert cache.put("under", {"text": "a" * 400_000})
    assert cache.put("another", {"text": "b" * 400_000})
    assert cache.put("third", {"text": "c" * 400_000})
    assert len(cache) == 2  # 1.2 MB is over the budget: the least recently used went
    assert cache.held_bytes <= 1024 * 1024


def test_the_deployment_keeps_a_small_answer_and_not_a_large_one(server: Server) -> None:
    # The session server's forecast cache has the default budgets: answers up to 1 MB are kept.
    history = [random.random() for _ in range(32)]
    small = {"model_type": "time_series", "history": history, "horizon": 4, "model_name": str(uuid.uuid4())}
    large = {**small, "horizon": 256, "output_mode": "samples", "num_samples": 300}  # about 1.5 MB of JSON

    def cache_hits(body: dict[str, Any]) -> list[bool]:
        hits = []
        for _ in range(2):
            response = httpx.post(f"{server.url}/forecast/predict", json=body, timeout=120)
            assert response.status_code == 200, response.text
            hits.append(response.json()["metadata"]["cache_hit"])
        return hits

    assert cache_hits(small) == [False, True]
    assert cache_hits(large) == [False, False]


# ---------------------------------------------------------------- in Redis, shared by replicas


def redis_cache(redis_server: RedisServer, deployment: str = "forecast", **settings: Any) -> RedisCache:
    config = Cache(backend="redis", url=f"redis://{redis_server.address}/0", **settings)
    cache = cache_from_config(config, deployment)
    assert isinstance(cache, RedisCache)
    return cache


def test_two_replicas_share_what_either_stored_and_deployments_do_not(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        one, other = redis_cache(redis_server), redis_cache(redis_server)
        assert await one.get_many(["k1", "k2"]) == [None, None]
        assert await one.store("k1", {"mean": [1.5, math.nan]})
        first, missing = await other.get_many(["k1", "k2"])
        assert missing is None
        assert first is not None and first["mean"][0] == 1.5 and math.isnan(first["mean"][1])
        assert await redis_cache(redis_server, "textgen").get_many(["k1"]) == [None]

    asyncio.run(scenario())


def test_redis_entries_expire_and_large_answers_are_not_kept(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        cache = redis_cache(redis_server, ttl_s=0.3, max_entry_mb=0.01)
        assert await cache.store("short-lived", answer())
        assert not await cache.store("large", answer("x" * 20_000))
        assert await cache.get_many(["short-lived", "large"]) == [answer(), None]
        await asyncio.sleep(0.5)
        assert await cache.get_many(["short-lived"]) == [None]

    asyncio.run(scenario())


def test_redis_down_is_a_quick_miss_and_hits_come_back_with_it(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        cache = redis_cache(redis_server)
        assert await cache.store("kept", answer())
        redis_server.stop()
        started = time.monotonic()
        for _ in range(20):  # refused at first, then not even tried while it backs off
            assert await cache.get_many(["kept"]) == [None]
            assert not await cache.store("other", answer())
        assert time.monotonic() - started < 1
        redis_server.start()  # no persistence: back, and empty
        await asyncio.sleep(RedisCache.BACK_OFF_S + 0.1)
        assert await cache.store("kept", answer("again"))
        assert await cache.get_many(["kept"]) == [answer("again")]

    asyncio.run(scenario())


def test_a_slow_redis_is_a_miss_within_the_timeout(tmp_path: Path) -> None:
    # A server that accepts and never answers: what a Redis stalled by a long command looks like.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        cache = cache_from_config(Cache(backend="redis", url=url, timeout_ms=100), "forecast")
        assert cache is not None
        started = time.monotonic()
        assert asyncio.run(cache.get_many(["k"])) == [None]
        assert time.monotonic() - started < 0.5
