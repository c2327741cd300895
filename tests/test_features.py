"""The Feast resolver against real stores: a sqlite demo repo in tmp_path and a real redis-server."""

import math
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sheaf.api.feature_ref import FeatureRef
from sheaf.feature_demo import DEMO_END, create_demo_repo, demo_series, write_history
from sheaf.features import (
    FeatureEntityNotFound,
    FeatureLookupError,
    FeatureRefInvalid,
    FeatureStoreFailed,
    FeatureStoreResolver,
    Resolved,
    as_history,
)
from tests.redis_server import RedisServer


def ref(
    entity: str = "temperature", view: str = "series_history", feature: str = "values", key: str = "series_id"
) -> FeatureRef:
    return FeatureRef(feature_view=view, feature_name=feature, entity_key=key, entity_value=entity)


def resolved(outcome: Resolved | FeatureLookupError) -> Resolved:
    assert isinstance(outcome, Resolved), outcome
    return outcome


@pytest.fixture(scope="module")
def sqlite_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_demo_repo(tmp_path_factory.mktemp("feast") / "repo")


@pytest.fixture
def resolver(sqlite_repo: Path) -> FeatureStoreResolver:
    return FeatureStoreResolver(sqlite_repo)


def test_a_lookup_returns_the_demo_series_with_its_feature_and_timestamp(resolver: FeatureStoreResolver) -> None:
    found = resolver.resolve_one(ref("temperature"))
    assert found.values == demo_series("temperature")
    assert len(found.values) == 336
    assert found.feature == "series_history:values"
    assert found.entity == "series_id=temperature"
    assert found.timestamp == DEMO_END
    assert found.metadata()["feature_timestamp"] == "2024-01-15T00:00:00+00:00"


def test_a_batch_is_one_store_call_with_one_outcome_per_ref_in_order(
    resolver: FeatureStoreResolver, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []
    real = resolver.store.get_online_features

    def counting(**kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(resolver.store, "get_online_features", counting)
    names = ["temperature", "traffic", "sales"]
    refs = [ref(names[i % 3]) for i in range(29)] + [ref("nope"), ref(view="nope"), ref(feature="nope")]

    outcomes = resolver.resolve(refs)

    assert len(calls) == 1
    assert len(calls[0]["entity_rows"]) == 4  # the three series and "nope", each asked for once
    assert [resolved(outcome).values for outcome in outcomes[:29]] == [demo_series(names[i % 3]) for i in range(29)]
    assert [type(outcome) for outcome in outcomes[29:]] == [FeatureEntityNotFound, FeatureRefInvalid, FeatureRefInvalid]


@pytest.mark.parametrize(
    ("bad", "status", "words"),
    [
        (ref(view="series_future"), 422, "no feature view 'series_future'"),
        (ref(feature="mean"), 422, "has no feature 'mean' (it has values, unit)"),
        (ref(key="id"), 422, "keyed by series_id, not 'id'"),
        (ref("weather"), 404, "no value for this entity"),
        (ref(feature="unit"), 422, "str 'celsius', not a non-empty array of numbers"),
    ],
)
def test_a_bad_ref_gets_its_status_and_a_message_naming_it(
    resolver: FeatureStoreResolver, bad: FeatureRef, status: int, words: str
) -> None:
    with pytest.raises(FeatureLookupError) as caught:
        resolver.resolve_one(bad)
    assert caught.value.status_code == status
    assert caught.value.field == "feature_ref"
    assert f"{bad.feature_view}:{bad.feature_name} for {bad.entity_key}={bad.entity_value}: " in str(caught.value)
    assert words in str(caught.value)


def test_an_empty_history_is_422(sqlite_repo: Path, resolver: FeatureStoreResolver) -> None:
    write_history(sqlite_repo, ref("blank"), [])
    with pytest.raises(FeatureRefInvalid, match=r"series_history:values for series_id=blank: .*an empty array"):
        resolver.resolve_one(ref("blank"))
    # The entity exists now, with a null unit: a null value is not a history (422), not an unknown entity (404).
    with pytest.raises(FeatureRefInvalid, match="series_history:unit for series_id=blank: the value is null"):
        resolver.resolve_one(ref("blank", feature="unit"))


def test_write_history_changes_the_next_lookup_and_keeps_the_other_features(tmp_path: Path) -> None:
    repo = create_demo_repo(tmp_path / "repo")  # a repo of its own: this test changes a demo series
    resolver = FeatureStoreResolver(repo)
    assert resolver.resolve_one(ref("sales")).values == demo_series("sales")

    write_history(repo, ref("sales"), [1, 2.5, 3])
    found = resolver.resolve_one(ref("sales"))
    assert found.values == [1.0, 2.5, 3.0]
    assert found.timestamp is not None and found.timestamp > DEMO_END
    unit = resolver.store.get_online_features(["series_history:unit"], [{"series_id": "sales"}]).to_dict()["unit"]
    assert unit == ["units/hour"]

    write_history(repo, ref("sales"), [4.0], timestamp=datetime(2025, 1, 1, tzinfo=UTC))
    assert resolver.resolve_one(ref("sales")).values == [4.0]


def test_threads_may_share_one_resolver(resolver: FeatureStoreResolver) -> None:
    expected = {name: demo_series(name) for name in ("temperature", "traffic")}
    failures: list[str] = []

    def lookups(name: str) -> None:
        for _ in range(25):
            outcomes = resolver.resolve([ref(name), ref("nope")])
            if not isinstance(outcomes[0], Resolved) or outcomes[0].values != expected[name]:
                failures.append(f"{name}: {outcomes[0]!r:.80}")
            if not isinstance(outcomes[1], FeatureEntityNotFound):
                failures.append(f"nope: {outcomes[1]!r:.80}")

    threads = [threading.Thread(target=lookups, args=(name,)) for name in [*expected, *expected, *expected]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []


def test_creating_the_demo_repo_again_keeps_it_and_the_cli_says_where(sqlite_repo: Path) -> None:
    registry = sqlite_repo / "data" / "registry.db"
    before = registry.stat().st_mtime_ns
    assert create_demo_repo(sqlite_repo) == sqlite_repo
    assert registry.stat().st_mtime_ns == before  # nothing was applied again

    done = subprocess.run(
        [sys.executable, "-m", "sheaf.feature_demo", str(sqlite_repo)], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == str(sqlite_repo)
    assert FeatureStoreResolver(sqlite_repo).resolve_one(ref("traffic")).values == demo_series("traffic")


@pytest.mark.parametrize(
    ("value", "expected"),
    [([1, 2.5], [1.0, 2.5]), ([[1, 2], [3.0, 4]], [[1.0, 2.0], [3.0, 4.0]])],
)
def test_a_history_is_numbers_or_rows_of_numbers(value: object, expected: object) -> None:
    # Feast cannot write nested arrays from Python lists, so rows are shown on the validation alone.
    assert as_history(value) == expected


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (None, "the value is null"),
        ([], "an empty array"),
        ("1,2", "str '1,2'"),
        ([1.0, True], "bool True at index 1"),
        ([1.0, math.nan], "float nan at index 1"),
        ([[1.0], []], "row 1 is empty"),
        ([[1.0], [2.0, 3.0]], "rows differ in length"),
    ],
)
def test_anything_else_is_not_a_history(value: object, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        as_history(value)


# ---------------------------------------------------------------- Redis


def test_redis_lookups_fail_with_502_while_it_is_down_and_work_again_after(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    repo = create_demo_repo(tmp_path / "repo", redis=redis_server.address)
    resolver = FeatureStoreResolver(repo)
    refs = [ref("temperature"), ref("traffic")]
    assert [resolved(outcome).values for outcome in resolver.resolve(refs)] == [
        demo_series("temperature"),
        demo_series("traffic"),
    ]
    assert isinstance(resolver.resolve([ref("weather")])[0], FeatureEntityNotFound)

    redis_server.stop()
    failed = resolver.resolve(refs)
    assert [type(outcome) for outcome in failed] == [FeatureStoreFailed, FeatureStoreFailed]
    assert all(isinstance(outcome, FeatureLookupError) and outcome.status_code == 502 for outcome in failed)
    assert "series_history:values for series_id=traffic: the feature store failed: ConnectionError" in str(failed[1])

    redis_server.start()  # no persistence: the store is back, and empty
    assert [type(outcome) for outcome in resolver.resolve(refs)] == [FeatureEntityNotFound, FeatureEntityNotFound]
    create_demo_repo(repo, redis=redis_server.address)  # loads the rows again
    assert resolved(resolver.resolve(refs)[1]).values == demo_series("traffic")

    write_history(repo, ref("traffic"), [7.0, 8.0])
    assert resolver.resolve_one(ref("traffic")).values == [7.0, 8.0]
