"""The lakehouse online store reads back exactly what Feast's own SQLite store reads back.

Property-based: Hypothesis draws rows of a feature view with every type the store holds,
at the edges of those types (all of int64, NaN, the infinities, -0.0, subnormals, float32
rounding, any Unicode with quotes, backslashes and control characters, nulls anywhere),
and random subsets of features to read. The same rows go into Feast's `SqliteOnlineStore`
converted by Feast's own type map (`python_values_to_proto_values`, as its materialization
does, then `online_write_batch`), and into ours twice: in bulk as the lakehouse
materializes (Polars-encoded rows, `Tables.upsert`), and through our `online_write_batch`
(what `feast materialize` or a push does). Every value read must be byte-identical. Event
times differ in one known way: Feast 0.67's SQLite store keeps whole seconds, ours the
microseconds (checked against the rows drawn).

CI runs 60 examples per store and key type; `HYPOTHESIS_PROFILE=long` runs 2,000.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import psycopg
import pyarrow as pa
import pytest
from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.infra.online_stores.sqlite import SqliteOnlineStore
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.repo_config import RepoConfig
from feast.type_map import feast_value_type_to_python_type, python_values_to_proto_values
from feast.types import Bool, Float32, Float64, Int32, Int64, String
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lakehouse.ml import materialize
from lakehouse.ml.online import encoding
from lakehouse.ml.online.store import (
    LakehousePostgresOnlineStore,
    LakehouseSqliteOnlineStore,
    _LakehouseOnlineStore,
)

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
EXAMPLES = 2000 if LONG else 60

FEATURES = {
    "an_int64": (Int64, pa.int64()),
    "an_int32": (Int32, pa.int32()),
    "a_double": (Float64, pa.float64()),
    "a_float": (Float32, pa.float32()),
    "a_string": (String, pa.string()),
    "a_bool": (Bool, pa.bool_()),
}
KEY = "thing_id"


def feature_view(key_type: ValueType) -> FeatureView:
    """A view with one feature of every type the store holds."""
    entity = Entity(name="thing", join_keys=[KEY], value_type=key_type)
    key_dtype = Int64 if key_type == ValueType.INT64 else String
    return FeatureView(
        name="things",
        entities=[entity],
        ttl=timedelta(0),
        schema=[
            Field(name=KEY, dtype=key_dtype),
            *(Field(name=n, dtype=t) for n, (t, _) in FEATURES.items()),
        ],
        source=FileSource(path="unused.parquet", timestamp_field="event_timestamp"),
        online=True,
    )


def config(tmp: Path, online_store: dict[str, Any]) -> RepoConfig:
    return RepoConfig(
        project="p" + uuid.uuid4().hex[:8],
        provider="local",
        registry=str(tmp / "registry.db"),
        online_store=online_store,
        entity_key_serialization_version=3,
        repo_path=tmp,
    )


# ------------------------------------------------------------------ values

INT64 = st.integers(-(2**63), 2**63 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)
TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
VALUES = {
    "an_int64": st.one_of(st.sampled_from([0, 2**63 - 1, -(2**63), 2**53 + 1]), INT64),
    "an_int32": INT32,
    "a_double": st.one_of(
        st.sampled_from([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 5e-324, 0.1]),
        st.floats(allow_nan=True, allow_infinity=True),
    ),
    "a_float": st.floats(width=32, allow_nan=True, allow_infinity=True),
    "a_string": st.one_of(st.sampled_from(["", "null", '"', "\\", "[1]", "\u2028"]), TEXT),
    "a_bool": st.booleans(),
}
MOMENTS = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)


@st.composite
def rows(draw: st.DrawFn, key_type: ValueType) -> list[dict[str, Any]]:
    keys = INT64 if key_type == ValueType.INT64 else TEXT
    out = []
    for key in draw(st.lists(keys, min_size=1, max_size=30, unique=True)):
        row = {KEY: key, "event_timestamp": draw(MOMENTS)}
        for name, strategy in VALUES.items():
            row[name] = draw(st.one_of(st.none(), strategy))
        out.append(row)
    return out


def arrow(drawn: list[dict[str, Any]], key_type: ValueType) -> pa.Table:
    key = pa.int64() if key_type == ValueType.INT64 else pa.string()
    schema = pa.schema(
        [
            (KEY, key),
            ("event_timestamp", pa.timestamp("us", tz="UTC")),
            *((n, t) for n, (_, t) in FEATURES.items()),
        ]
    )
    return pa.Table.from_pylist(drawn, schema=schema)


def feast_rows(table: pa.Table, key_type: ValueType) -> list[Any]:
    """Feast's rows for `online_write_batch`, converted by Feast's type map.

    Feast's materialization (`_convert_arrow_to_proto`) first goes through numpy, which
    turns an int64 column with a null into float64: a value beyond 2**53 is then changed,
    or fails (`Value out of range: 9223372036854775808`; found by this test). The same
    type map on the exact values is the reference; the lakehouse's store never takes that
    detour.
    """
    keys = python_values_to_proto_values(table.column(KEY).to_pylist(), key_type)
    columns = {
        name: python_values_to_proto_values(table.column(name).to_pylist(), dtype.to_value_type())
        for name, (dtype, _) in FEATURES.items()
    }
    times = table.column("event_timestamp").to_pylist()
    return [
        (
            EntityKeyProto(join_keys=[KEY], entity_values=[key]),
            {name: values[i] for name, values in columns.items()},
            times[i],
            None,
        )
        for i, key in enumerate(keys)
    ]


# ------------------------------------------------------------------ reading


def read_all(
    store: Any, cfg: RepoConfig, view: FeatureView, keys: list[Any], wanted: list[str]
) -> list[tuple[Any, dict[str, bytes] | None]]:
    """Read every key; values as serialized protos (NaN compares equal to NaN)."""
    kind = "int64_val" if isinstance(keys[0], int) else "string_val"
    protos = [
        EntityKeyProto(join_keys=[KEY], entity_values=[ValueProto(**{kind: k})]) for k in keys
    ]
    out: list[tuple[Any, dict[str, bytes] | None]] = []
    for ts, values in store.online_read(cfg, view, protos, wanted):
        if values is None:
            out.append((None, None))
            continue
        stamp = ts.astimezone(UTC).replace(tzinfo=None) if ts.tzinfo else ts
        out.append((stamp, {n: values[n].SerializeToString() for n in wanted if n in values}))
    return out


def _exactly(value: Any) -> Any:
    """A value with its type and bits (-0.0 is not 0.0; a float32 is compared as read)."""
    return (type(value).__name__, repr(value))


def feasts_python_values(
    store: Any, cfg: RepoConfig, view: FeatureView, keys: list[Any], wanted: list[str]
) -> list[dict[str, Any]]:
    """Each key's values as Feast's `OnlineResponse.to_dict` converts its protos."""
    kind = "int64_val" if isinstance(keys[0], int) else "string_val"
    protos = [
        EntityKeyProto(join_keys=[KEY], entity_values=[ValueProto(**{kind: k})]) for k in keys
    ]
    out = []
    for _, values in store.online_read(cfg, view, protos, wanted):
        found = values or {}
        out.append(
            {
                n: _exactly(feast_value_type_to_python_type(found[n]) if n in found else None)
                for n in wanted
            }
        )
    return out


def python_values(
    store: _LakehouseOnlineStore,
    cfg: RepoConfig,
    view: FeatureView,
    keys: list[Any],
    wanted: list[str],
) -> list[dict[str, Any]]:
    """Each key's values as the prediction API's reader decodes our rows."""
    tables = store.tables(cfg)
    fields = tables.fields(view.name)
    assert fields is not None
    found = tables.read(view.name, keys)
    out = []
    for key in keys:
        row = found.get(key)
        values = (
            dict.fromkeys(wanted) if row is None else encoding.decode_python(row[1], fields, wanted)
        )
        out.append({n: _exactly(values[n]) for n in wanted})
    return out


@pytest.fixture(params=["sqlite", "postgres"])
def ours(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Our store's config for each database (Postgres: a schema of its own)."""
    if request.param == "sqlite":
        yield {
            "type": "lakehouse.ml.online.store.LakehouseSqliteOnlineStore",
            "path": str(tmp_path / "ours.db"),
        }
        return
    dsn = request.getfixturevalue("pg_server")
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    schema = "online_" + uuid.uuid4().hex[:8]
    yield {
        "type": "lakehouse.ml.online.store.LakehousePostgresOnlineStore",
        "host": info.get("host", "localhost"),
        "port": int(info.get("port", 5432)),
        "database": info.get("dbname", "postgres"),
        "user": info.get("user", "postgres"),
        "password": info.get("password", ""),
        "db_schema": schema,
        "sslmode": "disable",
    }
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.mark.parametrize("key_type", [ValueType.INT64, ValueType.STRING], ids=["int", "text"])
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_reads_equal_feasts_sqlite_store(
    ours: dict[str, Any], key_type: ValueType, tmp_path: Path, data: st.DataObject
) -> None:
    drawn = data.draw(rows(key_type))
    wanted = data.draw(
        st.lists(st.sampled_from(list(FEATURES)), min_size=1, unique=True), label="features"
    )
    absent = data.draw(st.lists(INT64 if key_type == ValueType.INT64 else TEXT, max_size=3))
    keys = [r[KEY] for r in drawn] + [k for k in absent if k not in {r[KEY] for r in drawn}]
    view = feature_view(key_type)
    table = arrow(drawn, key_type)

    # Feast's own store, written as Feast's materialization writes.
    stock_cfg = config(tmp_path, {"type": "sqlite", "path": str(tmp_path / f"{uuid.uuid4()}.db")})
    stock = SqliteOnlineStore()
    stock.update(stock_cfg, [], [view], [], [], partial=False)
    protos = feast_rows(table, key_type)
    stock.online_write_batch(stock_cfg, view, protos, None)
    expected = read_all(stock, stock_cfg, view, keys, wanted)
    times = {r[KEY]: r["event_timestamp"].replace(tzinfo=None) for r in drawn}
    exact = [(times.get(k), v) for k, (_, v) in zip(keys, expected, strict=True)]
    whole = [(None if t is None else t.replace(microsecond=0), v) for t, v in exact]
    assert expected == whole  # Feast's store: whole seconds

    # Ours, in bulk from Polars as `lakehouse` materialization writes.
    cfg = config(tmp_path, ours)
    bulk: _LakehouseOnlineStore = (
        LakehouseSqliteOnlineStore() if "path" in ours else LakehousePostgresOnlineStore()
    )
    bulk.update(cfg, [], [view], [], [], partial=False)
    described = materialize.View.of(view)
    frame = pl.from_arrow(table).rename({KEY: "entity_key"})  # type: ignore[union-attr]
    frame = frame.with_columns(event_ts=pl.col("event_timestamp").dt.epoch("us"))
    bulk.tables(cfg).upsert(view.name, materialize.encoded(described, frame))
    try:
        assert read_all(bulk, cfg, view, keys, wanted) == exact
        # The prediction API's read (`ServiceReader`): Python values as Feast's `to_dict`
        # makes them from its own store's protos.
        assert python_values(bulk, cfg, view, keys, wanted) == feasts_python_values(
            stock, stock_cfg, view, keys, wanted
        )

        # Ours again, through Feast's write path (`feast materialize`, a push).
        bulk.teardown(cfg, [view], [])
        bulk.update(cfg, [], [view], [], [], partial=False)
        bulk.online_write_batch(cfg, view, protos, None)
        assert read_all(bulk, cfg, view, keys, wanted) == exact
    finally:
        bulk.teardown(cfg, [view], [])
        bulk.tables(cfg).close()


def test_a_row_from_an_older_silver_state_never_replaces_a_newer_one(
    ours: dict[str, Any], tmp_path: Path
) -> None:
    """The stream and a batch materialization write the same entities in either order:
    the row computed from the newer silver state stays, and a delete from an older state
    leaves a newer row alone (rows Feast wrote, with no state, are always replaced)."""
    view = feature_view(ValueType.INT64)
    cfg = config(tmp_path, ours)
    store: _LakehouseOnlineStore = (
        LakehouseSqliteOnlineStore() if "path" in ours else LakehousePostgresOnlineStore()
    )
    store.update(cfg, [], [view], [], [], partial=False)
    tables = store.tables(cfg)

    def write(amount: int, version: int | None, keys: tuple[int, ...] = (1, 2)) -> None:
        frame = pl.DataFrame(
            {"entity_key": list(keys), "event_ts": [10] * len(keys), "values": ["[0]"] * len(keys)}
        ).with_columns(values=pl.lit(f"[{amount},null,null,null,null,null]"))
        tables.upsert(view.name, frame, version)

    def amounts() -> dict[int, int]:
        read = tables.read(view.name, [1, 2, 3])
        return {k: int(v.strip("[]").split(",")[0]) for k, (_, v) in read.items()}

    try:
        write(100, 7)  # the stream, from silver state 7
        write(50, 5)  # a batch materialization from gold built at state 5, landing later
        assert amounts() == {1: 100, 2: 100}
        write(70, 7)  # the same state again: the same rows, written again
        assert amounts() == {1: 70, 2: 70}
        tables.delete(view.name, [1], 6)  # a delete from an older state
        assert amounts() == {1: 70, 2: 70}
        tables.delete(view.name, [1], 8)
        assert amounts() == {2: 70}
        write(1, None, (2, 3))  # Feast's own writes carry no state
        assert amounts() == {2: 1, 3: 1}
        write(2, 3, (2,))
        assert amounts() == {2: 2, 3: 1}
    finally:
        store.teardown(cfg, [view], [])
        tables.close()
