"""Resolve a `feature_ref` to a value history through Feast.

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
  `socket_connect_timeout`, which the demo repo (`sheaf.feature_demo`) sets to 2 s.

The resolver blocks (call it from a worker thread) and serializes its store calls with a lock: Feast's sqlite
store shares one connection and builds its provider, registry and client lazily without a lock. One lookup takes
0.2 to 0.4 ms on sqlite or Redis and a batch of 32 about 1.5 ms, so the lock costs little.

Feast is imported inside functions only: `import feast` takes about 5 s, and modules that merely import this one
(the service, the tests' collection) should not pay for it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sheaf.api.feature_ref import FeatureRef

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
        self._views: dict[str, ViewSchema] = {}
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

    def _view(self, name: str) -> ViewSchema:
        loaded_at = getattr(self._store.registry, "cached_registry_proto_created", None)
        if loaded_at != self._views_loaded_at:
            self._views.clear()
            self._views_loaded_at = loaded_at
        if name not in self._views:
            self._views[name] = ViewSchema.of(self._store.get_feature_view(name, allow_registry_cache=True))
        return self._views[name]

    def _read(self, view: ViewSchema, wanted: list[tuple[FeatureRef, object]]) -> list[Outcome]:
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
class ViewSchema:
    """What the resolver (and `sheaf.feature_demo.write_history`) needs of a FeatureView, read once: Feast
    type-checks every property access."""

    name: str
    features: tuple[str, ...]
    join_keys: tuple[str, ...]
    integer_key: bool

    @classmethod
    def of(cls, view: FeatureView) -> ViewSchema:
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
