"""The predict cache: an LRU with a time to live, keyed on the request without its `request_id`.

The key is taken after Feast resolution, so a new feature value makes a new key. Only
successful answers are kept. Streams never use it.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

_NOT_KEYED = {"request_id", "timeout_s"}  # fields that do not change the answer


def cache_key(request: dict[str, Any]) -> str:
    """The request as canonical JSON, without the fields that differ between identical requests."""
    return json.dumps({k: v for k, v in request.items() if k not in _NOT_KEYED}, sort_keys=True, separators=(",", ":"))


class PredictCache:
    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._max_entries = max_entries
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            stored_at, body = entry
            if self._clock() - stored_at > self._ttl_s:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return body

    def put(self, key: str, body: dict[str, Any]) -> None:
        with self._lock:
            self._entries[key] = (self._clock(), body)
            self._entries.move_to_end(key)
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
