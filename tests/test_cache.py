"""The predict cache: keys ignore request_id, entries expire, the least recently used go first."""

from sheaf.cache import PredictCache, cache_key


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


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
