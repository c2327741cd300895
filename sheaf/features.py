"""Resolve a `feature_ref` to a value history through Feast, and build the demo feature repo.

`FeatureStoreResolver(repo_path).resolve(refs)` answers a list of `FeatureRef`s with one outcome per ref, in
order: a `Resolved` (the history as `values`, the `feature` used as `"view:feature"`, the `entity` as
`"key=value"` and the Feast event `timestamp`, or None; `metadata()` gives them as strings for a response) or a
`FeatureLookupError`, returned rather than raised so that one bad ref never fails the others of a batch. Refs are
grouped by feature view: one `get_online_features` call per view asks for every feature and every entity row of
that view at once. `resolve_one` raises instead.

The errors (from `sheaf.exceptions`, where they sit in the one hierarchy) carry `status_code` and `field`
("feature_ref"); the message names `view:feature` and `key=value`:

- `FeatureRefInvalid` (422): unknown feature view or feature, an `entity_key` that is not the view's join key,
  or a value that is not a non-empty array of finite numbers (or of equally long rows of them);
- `FeatureEntityNotFound` (404): the online store has no row for the entity (Feast answers None);
- `FeatureStoreFailed` (502): the registry or online store raised, e.g. Redis is down. No failure is remembered:
  the next call tries the store again and succeeds once it is back. A refused Redis connection fails in
  milliseconds (see `_fail_fast_on_redis`); an unreachable host takes the connection string's
  `socket_connect_timeout`, which the demo repo sets to 2 s.

The resolver blocks (call it from a worker thread) and serializes its store calls with a lock: Feast's sqlite
store shares one connection and builds its provider, registry and client lazily without a lock. One lookup takes
0.2 to 0.4 ms on sqlite or Redis and a batch of 32 about 1.5 ms, so the lock costs little.

`create_demo_repo(dest)` writes and applies a demo repo (entity `series_id`, view `series_history` with an
`Array(Float64)` feature `values` and a `String` feature `unit`) and loads three series into the online store;
`python -m sheaf.features DEST [--redis HOST:PORT]` does the same. `write_history` writes one entity's value.

Feast is imported inside functions only: `import feast` takes about 5 s, and modules that merely import this one
(the service, the tests' collection) should not pay for it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sheaf.api.forecast import FeatureRef

# The lookup errors live in sheaf.exceptions, in the one hierarchy the client raises too; named here as well.
from sheaf.exceptions import FeatureEntityNotFound as FeatureEntityNotFound
from sheaf.exceptions import FeatureLookupError as FeatureLookupError
from sheaf.exceptions import FeatureRefInvalid as FeatureRefInvalid
from sheaf.exceptions import FeatureStoreFailed as FeatureStoreFailed

if TYPE_CHECKING:
    from feast import FeatureStore, FeatureView

History = list[float] | list[list[float]]


@dataclass(frozen=True, slots=True)
class Resolved:
    """A resolved history, and where it came from (for the response metadata)."""

    values: History
    feature: str  # "view:feature"
    entity: str  # "key=value"
    timestamp: datetime | None  # the event timestamp Feast stored with the value, UTC

    def metadata(self) -> dict[str, str]:
        meta = {"feature": self.feature, "feature_entity": self.entity}
        if self.timestamp is not None:
            meta["feature_timestamp"] = self.timestamp.isoformat()
        return meta


Outcome = Resolved | FeatureLookupError


class FeatureStoreResolver:
    """Looks `FeatureRef`s up in the online store of one Feast repo (a folder with feature_store.yaml)."""

    def __init__(self, repo_path: str | Path) -> None:
        from feast import FeatureStore

        self.repo_path = Path(repo_path)
        # Reads and validates feature_store.yaml now, so a broken config fails at startup, not per request.
        self._store = FeatureStore(repo_path=str(self.repo_path))
        _fail_fast_on_redis(self._store)
        self._lock = threading.Lock()
        # Feast rebuilds a FeatureView from the registry proto on every get (~0.5 ms, more than the lookup), so
        # views are kept until the registry refreshes (each `cache_ttl_seconds`, 600 by default).
        self._views: dict[str, _ViewSchema] = {}
        self._views_loaded_at: object = None

    @property
    def store(self) -> FeatureStore:
        return self._store

    def resolve(self, refs: Sequence[FeatureRef]) -> list[Outcome]:
        """One outcome per ref, in order; one `get_online_features` call per feature view among the refs."""
        by_view: dict[str, list[int]] = {}
        for index, ref in enumerate(refs):
            by_view.setdefault(ref.feature_view, []).append(index)
        outcomes: dict[int, Outcome] = {}
        with self._lock:  # Feast promises no thread safety; see the module docstring
            for view_name, indexes in by_view.items():
                group = [refs[index] for index in indexes]
                outcomes.update(zip(indexes, self._resolve_view(view_name, group), strict=True))
        return [outcomes[index] for index in range(len(refs))]

    def resolve_one(self, ref: FeatureRef) -> Resolved:
        """The history for one ref; raises its `FeatureLookupError`."""
        (outcome,) = self.resolve([ref])
        if isinstance(outcome, FeatureLookupError):
            raise outcome
        return outcome

    def _resolve_view(self, view_name: str, refs: list[FeatureRef]) -> list[Outcome]:
        from feast.errors import FeatureViewNotFoundException

        try:
            view = self._view(view_name)
        except FeatureViewNotFoundException:
            return [FeatureRefInvalid(ref, f"the feature store has no feature view {view_name!r}") for ref in refs]
        except Exception as exc:  # the registry could not be read: a store failure, not a bad ref
            return [FeatureStoreFailed(ref, _failure(exc)) for ref in refs]
        outcomes: dict[int, Outcome] = {}
        pending: list[tuple[int, FeatureRef, object]] = []
        for index, ref in enumerate(refs):
            try:
                pending.append((index, ref, view.entity_value(ref)))
            except FeatureRefInvalid as exc:
                outcomes[index] = exc
        if pending:
            read = self._read(view, [(ref, key) for _, ref, key in pending])
            outcomes.update(zip([index for index, _, _ in pending], read, strict=True))
        return [outcomes[index] for index in range(len(refs))]

    def _view(self, name: str) -> _ViewSchema:
        loaded_at = getattr(self._store.registry, "cached_registry_proto_created", None)
        if loaded_at != self._views_loaded_at:
            self._views.clear()
            self._views_loaded_at = loaded_at
        if name not in self._views:
            self._views[name] = _ViewSchema.of(self._store.get_feature_view(name, allow_registry_cache=True))
        return self._views[name]

    def _read(self, view: _ViewSchema, wanted: list[tuple[FeatureRef, object]]) -> list[Outcome]:
        """Every feature and entity row of one view in a single store call, then each ref's cell of it."""
        from feast.type_map import feast_value_type_to_python_type

        features = sorted({ref.feature_name for ref, _ in wanted})
        rows = list(dict.fromkeys(key for _, key in wanted))
        try:
            response = self._store.get_online_features(
                features=[f"{view.name}:{feature}" for feature in features],
                entity_rows=[{view.join_keys[0]: key} for key in rows],
                full_feature_names=True,  # "view__feature": never collides with a join key's column
            )
        except Exception as exc:  # connection refused, timeouts, a missing table: the store, not the ref
            return [FeatureStoreFailed(ref, _failure(exc)) for ref, _ in wanted]
        proto = response.proto
        columns = dict(zip(proto.metadata.feature_names.val, proto.results, strict=True))
        row_of = {key: row for row, key in enumerate(rows)}
        outcomes: list[Outcome] = []
        for ref, key in wanted:
            vector = columns[f"{view.name}__{ref.feature_name}"]
            row = row_of[key]
            value = feast_value_type_to_python_type(vector.values[row])
            outcomes.append(_outcome(ref, vector.statuses[row], value, vector.event_timestamps[row]))
        return outcomes


def _outcome(ref: FeatureRef, status: int, value: object, event_timestamp: Any) -> Outcome:
    from feast.protos.feast.serving.ServingService_pb2 import FieldStatus

    # An unset protobuf Timestamp reads as the epoch: Feast holds no row for the entity.
    timestamp = event_timestamp.ToDatetime(tzinfo=UTC) if event_timestamp.ByteSize() else None
    # sqlite says NOT_FOUND for an unknown entity; Redis says PRESENT, with no value and no timestamp.
    if status == FieldStatus.NOT_FOUND or (value is None and timestamp is None):
        return FeatureEntityNotFound(ref, "the online store has no value for this entity")
    if status == FieldStatus.OUTSIDE_MAX_AGE:
        return FeatureEntityNotFound(ref, "the stored value is older than the feature view's ttl")
    try:
        values = as_history(value)
    except ValueError as exc:
        return FeatureRefInvalid(ref, str(exc))
    return Resolved(values, f"{ref.feature_view}:{ref.feature_name}", f"{ref.entity_key}={ref.entity_value}", timestamp)


def as_history(value: object) -> History:
    """`value` as a history: a non-empty list of finite numbers, or of equally long such lists.

    Raises ValueError saying why not."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"the value is {_kind(value)}, not a non-empty array of numbers")
    if all(isinstance(item, list) for item in value):
        rows = [_numbers(item, f"row {index}") for index, item in enumerate(value)]
        if len({len(row) for row in rows}) > 1:
            raise ValueError("the value's rows differ in length")
        return rows
    return _numbers(value, "the value")


def _numbers(items: list[Any], where: str) -> list[float]:
    if not items:
        raise ValueError(f"{where} is empty")
    # Feast hands a double list back as plain floats: check those in one pass (a NaN or inf makes the sum
    # non-finite), about 20 times faster than the loop below, which also says which item is wrong.
    if set(map(type, items)) == {float} and math.isfinite(sum(items)):
        return list(items)
    numbers: list[float] = []
    for index, item in enumerate(items):
        # bool is an int to Python, but True is no measurement; NaN and inf would poison a forecast.
        if isinstance(item, bool) or not isinstance(item, int | float) or not math.isfinite(item):
            raise ValueError(f"{where} holds {_kind(item)} at index {index}, not a finite number")
        numbers.append(float(item))
    return numbers


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, list) and not value:
        return "an empty array"
    text = repr(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 40 else text}"


def _failure(exc: Exception) -> str:
    return f"the feature store failed: {type(exc).__name__}: {exc}"


@dataclass(frozen=True, slots=True)
class _ViewSchema:
    """What the resolver needs of a FeatureView, read once: Feast type-checks every property access."""

    name: str
    features: tuple[str, ...]
    join_keys: tuple[str, ...]
    integer_key: bool

    @classmethod
    def of(cls, view: FeatureView) -> _ViewSchema:
        from feast.types import Int32, Int64

        join_keys = tuple(view.join_keys)
        dtypes = [field.dtype for field in view.entity_columns if field.name in join_keys]
        features = tuple(field.name for field in view.features)
        return cls(view.name, features, join_keys, integer_key=bool(dtypes) and dtypes[0] in (Int32, Int64))

    def entity_value(self, ref: FeatureRef) -> object:
        """The ref's entity value as the join key's type; FeatureRefInvalid if the ref does not fit the view."""
        if ref.feature_name not in self.features:
            known = ", ".join(self.features)
            raise FeatureRefInvalid(
                ref, f"feature view {self.name!r} has no feature {ref.feature_name!r} (it has {known})"
            )
        if self.join_keys != (ref.entity_key,):
            keys = ", ".join(self.join_keys) or "no entity"
            raise FeatureRefInvalid(ref, f"feature view {self.name!r} is keyed by {keys}, not {ref.entity_key!r}")
        if not self.integer_key:
            return ref.entity_value
        try:
            return int(ref.entity_value)
        except ValueError:
            raise FeatureRefInvalid(ref, f"{ref.entity_key} takes integers") from None


def _fail_fast_on_redis(store: FeatureStore) -> None:
    """Make a down Redis answer at once. redis-py retries a refused connection 3 times with 1 to 10 s of
    backoff, which would hold the resolver's lock for ~7 s per call; one immediate retry is kept because the
    first command after a Redis restart meets a pooled connection that the restart broke."""
    if getattr(store.config.online_store, "type", None) != "redis":
        return
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # Feast exposes no retry setting and builds its client in a private method; skip quietly if that changes.
    online_store = getattr(store._get_provider(), "online_store", None)
    get_client: Callable[[Any], Any] | None = getattr(online_store, "_get_client", None)
    client = get_client(store.config.online_store) if get_client else None
    set_retry: Callable[[Retry], None] | None = getattr(client, "set_retry", None)
    if set_retry is not None:
        set_retry(Retry(NoBackoff(), retries=1))


# ---------------------------------------------------------------- writing values and the demo repo

DEMO_END = datetime(2024, 1, 15, tzinfo=UTC)  # the event time of every demo history: its last hour
DEMO_HOURS = 336  # two weeks of hourly values
_MARKER = ".sheaf-demo"  # holds the fingerprint of a completely written demo repo
_DEFINITIONS_FILE = "series.py"


def _temperature(hour: int) -> float:
    return 8.0 + 5.0 * math.sin(2 * math.pi * (hour % 24 - 9) / 24) + 0.01 * hour  # warmest at 15:00


def _traffic(hour: int) -> float:
    weekday = hour // 24 % 7 < 5  # hour 0 is a Monday at midnight
    daytime = max(0.0, math.sin(math.pi * (hour % 24 - 6) / 14))  # 06:00 to 20:00
    return 80.0 + (400.0 if weekday else 240.0) * daytime


def _sales(hour: int) -> float:
    return 20.0 + 8.0 * math.sin(2 * math.pi * hour / 168) + 0.02 * hour  # a weekly cycle on a slow rise


# name -> (unit, noise, shape of the hour's value)
_DEMO_SHAPES: dict[str, tuple[str, float, Callable[[int], float]]] = {
    "temperature": ("celsius", 0.4, _temperature),
    "traffic": ("vehicles/hour", 12.0, _traffic),
    "sales": ("units/hour", 1.5, _sales),
}
# Unless the connection string sets them: without timeouts an unreachable (not refusing) Redis blocks for minutes.
_REDIS_TIMEOUTS = {"socket_connect_timeout": "2", "socket_timeout": "2"}

_STORE_YAML = """\
project: sheaf_demo
provider: local
registry: data/registry.db
online_store:
{online_store}
offline_store:
  type: file
"""

_DEFINITIONS = '''\
"""The sheaf demo feature repo, written by `python -m sheaf.features`; `feast apply` here works too."""

from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.types import Array, Float64, String

series = Entity(name="series_id", join_keys=["series_id"], value_type=ValueType.STRING)

series_source = FileSource(
    name="series_source",
    path=str(Path(__file__).resolve().parent / "data" / "series.parquet"),
    timestamp_field="event_timestamp",
)

# An online store keeps only the latest row per entity, so the whole history is one array value.
series_history = FeatureView(
    name="series_history",
    entities=[series],
    ttl=timedelta(0),  # never expires
    schema=[
        Field(name="series_id", dtype=String),
        Field(name="values", dtype=Array(Float64), description="Hourly values, oldest first."),
        Field(name="unit", dtype=String),
    ],
    source=series_source,
)
'''


def demo_series(name: str) -> list[float]:
    """The demo history `name` ("temperature", "traffic" or "sales"): the same values on every run."""
    _, noise, shape = _DEMO_SHAPES[name]
    rng = random.Random(name)  # a str seed is hashed with sha512, not PYTHONHASHSEED: stable across runs
    return [round(shape(hour) + rng.gauss(0.0, noise), 2) for hour in range(DEMO_HOURS)]


def create_demo_repo(dest: str | Path, *, redis: str | None = None) -> Path:
    """Write, apply and load the demo repo at `dest`; its online store is sqlite, or the Redis at `redis`
    ("HOST:PORT[,option=value...]"). A repeat call on a complete sqlite repo returns at once without importing
    Feast; on Redis it reloads the rows, since a Redis without persistence forgets them when it restarts."""
    dest = Path(dest).resolve()
    files = {"feature_store.yaml": _store_yaml(redis), _DEFINITIONS_FILE: _DEFINITIONS}
    series = {name: demo_series(name) for name in _DEMO_SHAPES}
    fingerprint = hashlib.sha256(json.dumps([files, series, DEMO_END.isoformat()]).encode()).hexdigest()
    marker = dest / _MARKER
    complete = marker.is_file() and marker.read_text() == fingerprint
    if complete and redis is None and (dest / "data" / "online_store.db").is_file():
        return dest
    if not complete:
        marker.unlink(missing_ok=True)  # a half-written repo must not pass for a complete one
        (dest / "data").mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (dest / name).write_text(text)
        _write_parquet(dest / "data" / "series.parquet", series)
    store = _apply(dest)  # a no-op on an applied registry, and it recreates missing online tables
    store.write_to_online_store(
        "series_history",
        inputs={
            "series_id": list(series),
            "values": list(series.values()),
            "unit": [_DEMO_SHAPES[name][0] for name in series],
            "event_timestamp": [DEMO_END] * len(series),
        },
    )
    marker.write_text(fingerprint)
    return dest


def write_history(
    repo_path: str | Path, ref: FeatureRef, values: Sequence[float], *, timestamp: datetime | None = None
) -> None:
    """Write `values` as the value of `ref` (its feature, for its entity) to the online store, stamped
    `timestamp` (default now). Feast writes whole rows, so the entity's other features are read and kept.
    Raises FeatureRefInvalid for a ref that does not fit its view, Feast's errors for an unknown view."""
    from feast import FeatureStore

    store = FeatureStore(repo_path=str(repo_path))
    view = store.get_feature_view(ref.feature_view)
    key = _ViewSchema.of(view).entity_value(ref)
    others = [field.name for field in view.features if field.name != ref.feature_name]
    row: dict[str, list[Any]] = {}
    if others:
        current = store.get_online_features([f"{view.name}:{name}" for name in others], [{ref.entity_key: key}])
        row = {name: column for name, column in current.to_dict().items() if name in others}
    row[ref.entity_key] = [key]
    row[ref.feature_name] = [[float(value) for value in values]]  # Feast refuses ints in a Float64 array
    row["event_timestamp"] = [timestamp or datetime.now(UTC)]
    store.write_to_online_store(view.name, inputs=row)


def _store_yaml(redis: str | None) -> str:
    if redis is None:
        online = "  type: sqlite\n  path: data/online_store.db"
    else:
        given = {part.split("=", 1)[0].strip() for part in redis.split(",")}
        options = [f"{name}={value}" for name, value in _REDIS_TIMEOUTS.items() if name not in given]
        online = f"  type: redis\n  connection_string: {json.dumps(','.join([redis, *options]))}"
    return _STORE_YAML.format(online_store=online)


def _write_parquet(path: Path, series: dict[str, list[float]]) -> None:
    """The offline copy of the demo rows, which `feast materialize` would read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "series_id": pa.array(list(series), pa.string()),
            "values": pa.array(list(series.values()), pa.list_(pa.float64())),
            "unit": pa.array([_DEMO_SHAPES[name][0] for name in series], pa.string()),
            "event_timestamp": pa.array([DEMO_END] * len(series), pa.timestamp("us", tz="UTC")),
        }
    )
    pq.write_table(table, path)


def _apply(dest: Path) -> FeatureStore:
    """`feast apply` without the CLI: register the objects that the repo's definitions file defines."""
    from feast import Entity, FeatureStore, FeatureView
    from feast.data_source import DataSource
    from feast.feast_object import FeastObject

    # Run the file without registering it in sys.modules: each repo, and each call, reads its own definitions.
    spec = importlib.util.spec_from_file_location("sheaf_feast_repo", dest / _DEFINITIONS_FILE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    objects: list[FeastObject] = [
        obj for obj in vars(module).values() if isinstance(obj, Entity | FeatureView | DataSource)
    ]
    store = FeatureStore(repo_path=str(dest))
    store.apply(objects)
    return store


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sheaf.features", description="Create the demo Feast repo.")
    parser.add_argument("dest", type=Path, help="folder for the repo (created, or refreshed if it exists)")
    parser.add_argument("--redis", metavar="HOST:PORT", help="use this Redis as the online store instead of sqlite")
    args = parser.parse_args(argv)
    print(create_demo_repo(args.dest, redis=args.redis))


if __name__ == "__main__":
    main()
