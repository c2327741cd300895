"""The demo Feast repo, and writing one entity's value into an online store.

`create_demo_repo(dest)` writes and applies a demo repo (entity `series_id`, view `series_history` with an
`Array(Float64)` feature `values` and a `String` feature `unit`) and loads three series into the online store;
`python -m sheaf.feature_demo DEST [--redis HOST:PORT]` does the same. `demo_series(name)` is one of those
series; `write_history` writes one entity's value (what a materialization job does in production).

Feast is imported inside functions only, as in `sheaf.features`: `import feast` takes about 5 s.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import random
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sheaf.api.feature_ref import FeatureRef
from sheaf.features import ViewSchema

if TYPE_CHECKING:
    from feast import FeatureStore

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
"""The sheaf demo feature repo, written by `python -m sheaf.feature_demo`; `feast apply` here works too."""

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
    key = ViewSchema.of(view).entity_value(ref)
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
    parser = argparse.ArgumentParser(prog="python -m sheaf.feature_demo", description="Create the demo Feast repo.")
    parser.add_argument("dest", type=Path, help="folder for the repo (created, or refreshed if it exists)")
    parser.add_argument("--redis", metavar="HOST:PORT", help="use this Redis as the online store instead of sqlite")
    args = parser.parse_args(argv)
    print(create_demo_repo(args.dest, redis=args.redis))


if __name__ == "__main__":
    main()
