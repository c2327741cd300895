"""The predict cache: an LRU with a time to live and a byte budget, keyed on the request without its `request_id`.

The key is taken after Feast resolution, so a new feature value makes a new key. Only
successful answers are kept, and only those no larger than `max_entry_bytes`. Streams never
use it.

An answer is kept as its JSON encoding: what the budget counts is then the memory the entry
really holds (Python objects for the same floats take about twice as much), and a caller that
changes the answer it got cannot change the one kept. Expired entries go whenever an answer is
stored, whether or not anyone asks for them again.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pydantic_core

from sheaf.config import Cache

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
