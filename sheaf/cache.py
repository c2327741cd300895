"""The predict cache, keyed on the request without its `request_id`: an LRU with a time to live
and a byte budget in each replica's memory (`PredictCache`), or Redis, shared by every replica
(`RedisCache`). Both answer `get_many` and `store`, which the deployment awaits.

The key is taken after Feast resolution, so a new feature value makes a new key. Only
successful answers are kept, and only those no larger than `max_entry_bytes`. Streams never
use it.

An answer is kept as its JSON encoding: what the budget counts is then the memory the replica
really holds (Python objects for the same floats take about twice as much), and a caller that
changes the answer it got cannot change the one kept. Expired entries go whenever an answer is
stored, whether or not anyone asks for them again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import pydantic_core

from sheaf.config import Cache, env_expanded

logger = logging.getLogger("sheaf")

_NOT_KEYED = {"request_id", "timeout_s"}  # fields that do not change the answer
_MB = 1024 * 1024


def cache_key(request: dict[str, Any]) -> str:
    """The request as canonical JSON, without the fields that differ between identical requests."""
    return json.dumps({k: v for k, v in request.items() if k not in _NOT_KEYED}, sort_keys=True, separators=(",", ":"))


def json_size_at_least(value: Any, limit: int) -> int:
    """A lower bound of the length of `value`'s JSON encoding, counted only until it passes `limit`.

    It visits containers, not numbers: a list whose first item is not a container counts two
    characters an item (the item and its comma), so a million-float answer is found too large
    in microseconds, without encoding it.
    """
    if isinstance(value, str):
        return len(value) + 2
    if isinstance(value, dict):
        total = 1  # the braces, less the comma that the last item lacks
        for key, item in value.items():
            total += len(str(key)) + 4 + json_size_at_least(item, limit - total)
            if total > limit:
                break
        return total
    if isinstance(value, list):
        if not value or not isinstance(value[0], (list, dict, str)):
            return 2 * len(value) + 1
        total = 1
        for item in value:
            total += 1 + json_size_at_least(item, limit - total)
            if total > limit:
                break
        return total
    return 1


class PredictCache:
    def __init__(
        self,
        max_entries: int,
        ttl_s: float,
        max_bytes: int = 64 * _MB,
        max_entry_bytes: int = _MB,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_entries = max_entries
        self._ttl_s = ttl_s
        self._max_bytes = max_bytes
        self._max_entry_bytes = min(max_entry_bytes, max_bytes)
        self._clock = clock
        # The same entries twice: by last use, for the budget, and by age, for the time to live.
        self._by_use: OrderedDict[str, bytes] = OrderedDict()
        self._by_age: OrderedDict[str, float] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: Cache) -> PredictCache:
        return cls(
            max_entries=config.max_entries,
            ttl_s=config.ttl_s,
            max_bytes=int(config.max_mb * _MB),
            max_entry_bytes=int(config.max_entry_mb * _MB),
        )

    async def get_many(self, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        return [self.get(key) for key in keys]

    async def store(self, key: str, body: dict[str, Any]) -> bool:
        return self.put(key, body)

    @property
    def held_bytes(self) -> int:
        """The memory the entries hold: their keys and encoded answers."""
        return self._bytes

    def get(self, key: str) -> dict[str, Any] | None:
        """A fresh copy of the answer kept under `key`, or None when none is, or it has expired."""
        with self._lock:
            stored_at = self._by_age.get(key)
            if stored_at is None:
                return None
            if self._clock() - stored_at > self._ttl_s:
                self._drop(key)
                return None
            self._by_use.move_to_end(key)
            encoded = self._by_use[key]
        answer: dict[str, Any] = pydantic_core.from_json(encoded)
        return answer

    def put(self, key: str, body: dict[str, Any]) -> bool:
        """Keep `body` under `key` unless it is larger than `max_entry_bytes`; whether it was kept."""
        if len(key) + json_size_at_least(body, self._max_entry_bytes) > self._max_entry_bytes:
            return self._refuse(key)
        encoded = pydantic_core.to_json(body, inf_nan_mode="constants")  # NaN stays NaN: from_json reads it back
        size = _size(key, encoded)
        if size > self._max_entry_bytes:
            return self._refuse(key)
        with self._lock:
            self._drop(key)
            self._drop_expired()
            while self._by_use and (len(self._by_use) >= self._max_entries or self._bytes + size > self._max_bytes):
                self._drop(next(iter(self._by_use)))  # the least recently used
            self._by_use[key] = encoded
            self._by_age[key] = self._clock()
            self._bytes += size
        return True

    def _refuse(self, key: str) -> bool:
        with self._lock:
            self._drop(key)  # an older answer to the same request is no better kept than this one
            self._drop_expired()
        return False

    def _drop_expired(self) -> None:
        expired_before = self._clock() - self._ttl_s
        while self._by_age:
            oldest, stored_at = next(iter(self._by_age.items()))
            if stored_at >= expired_before:
                break
            self._drop(oldest)

    def _drop(self, key: str) -> None:
        encoded = self._by_use.pop(key, None)
        if encoded is not None:
            del self._by_age[key]
            self._bytes -= _size(key, encoded)

    def __len__(self) -> int:
        return len(self._by_use)


def _size(key: str, encoded: bytes) -> int:
    return sys.getsizeof(key) + sys.getsizeof(encoded)


class RedisCache:
    """The predict cache in Redis, so that every replica of a deployment answers what any of them
    computed. Redis is a cache, never a dependency: when it is down or slow (past `timeout_ms`) a
    lookup is a miss and a store is skipped, and after a failure Redis is left alone for
    `BACK_OFF_S`, so that a request never waits on a Redis that is gone. Entries expire after
    `ttl_s` (Redis's own expiry); Redis's `maxmemory` policy bounds the rest.
    """

    BACK_OFF_S = 1.0

    def __init__(self, url: str, deployment: str, ttl_s: float, max_entry_bytes: int, timeout_s: float) -> None:
        from redis.asyncio import Redis  # the `features` extra brings it; only this backend needs it
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self._redis = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),  # redis-py retries by default: a miss now beats a hit later
        )
        self._prefix = f"sheaf:predict:{deployment}:"
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._max_entry_bytes = max_entry_bytes
        self._timeout_s = timeout_s
        self._down_until = 0.0

    @classmethod
    def from_config(cls, config: Cache, deployment: str) -> RedisCache:
        assert config.url is not None  # the config requires it for this backend
        return cls(
            env_expanded("cache.url", config.url),
            deployment,
            config.ttl_s,
            int(config.max_entry_mb * _MB),
            config.timeout_ms / 1000,
        )

    def _name(self, key: str) -> str:
        return self._prefix + hashlib.sha256(key.encode()).hexdigest()

    async def get_many(self, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        """The answers kept under `keys` (None where there is none), in one round trip."""
        if not keys or time.monotonic() < self._down_until:
            return [None] * len(keys)
        try:
            async with asyncio.timeout(self._timeout_s):
                found = await self._redis.mget([self._name(key) for key in keys])
        except Exception as exc:  # down, slow or refusing: misses
            self._failed("lookup", exc)
            return [None] * len(keys)
        return [None if value is None else pydantic_core.from_json(value) for value in found]

    async def store(self, key: str, body: dict[str, Any]) -> bool:
        """Keep `body` under `key` for `ttl_s`, unless it is larger than `max_entry_bytes`."""
        if time.monotonic() < self._down_until:
            return False
        if json_size_at_least(body, self._max_entry_bytes) > self._max_entry_bytes:
            return False
        encoded = pydantic_core.to_json(body, inf_nan_mode="constants")
        if len(encoded) > self._max_entry_bytes:
            return False
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._redis.set(self._name(key), encoded, px=self._ttl_ms)
        except Exception as exc:
            self._failed("store", exc)
            return False
        return True

    def _failed(self, what: str, exc: Exception) -> None:
        if time.monotonic() >= self._down_until + self.BACK_OFF_S:  # once per outage, not per request
            logger.warning("predict cache: Redis %s failed (%s: %s); misses for now", what, type(exc).__name__, exc)
        self._down_until = time.monotonic() + self.BACK_OFF_S


def cache_from_config(config: Cache, deployment: str) -> PredictCache | RedisCache | None:
    """The deployment's predict cache, as its config asks, or None when it is off."""
    if not config.enabled:
        return None
    if config.backend == "redis":
        return RedisCache.from_config(config, deployment)
    return PredictCache.from_config(config)
