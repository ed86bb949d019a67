"""Snapshot and incremental extraction from Postgres into Arrow batches, via COPY.

What a batch takes is decided by transaction ids, never by a timestamp: each source row
carries `updated_xid` (the transaction that last wrote it, stamped by a trigger), and an
extraction takes the rows with `lo <= updated_xid < hi`, where `hi` is the xmin of its
own snapshot: every transaction below it has finished, so no row can still appear below
`hi` later, and the next extraction starts there. A row inserted with an old or a future
`updated_at`, or written while the clock stepped back, is taken exactly once.

A timestamp Arrow and Delta cannot hold (`infinity`, BC dates, years past 9999) arrives
as null, with its text in `_unrepresentable` (a JSON object, column -> text), so that the
row still lands in bronze and silver can reject it by a rule that names the column.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass

import polars as pl
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from psycopg import sql
from psycopg.abc import Buffer

from lakehouse.source.readahead import read_ahead
from lakehouse.source.schema import SourceTable, ident

PG_TO_POLARS: dict[str, pl.DataType] = {
    "bigint": pl.Int64(),
    "integer": pl.Int32(),
    "smallint": pl.Int16(),
    "double precision": pl.Float64(),
    "text": pl.Utf8(),
    "timestamptz": pl.Datetime("us", "UTC"),
}
# The instants Python, Arrow, Delta's statistics and DuckDB all hold: years 1 to 9999.
REPRESENTABLE_FROM = "0001-01-01 00:00:00+00"
REPRESENTABLE_UNTIL = "10000-01-01 00:00:00+00"
_BYTES_PER_ROW = 160  # rough CSV width of a row: sizes the read buffer from batch_rows


@dataclass(frozen=True)
class Window:
    """Rows written by transactions in `[lo, hi)`; `lo=None`: from the start, `hi=None`: no end."""

    lo: int | None
    hi: int | None

    @property
    def mode(self) -> str:
        """Return `snapshot` or `incremental`."""
        return "snapshot" if self.lo is None else "incremental"


@dataclass(frozen=True)
class Snapshot:
    """Where an extraction's snapshot sits: its WAL position and its xmin."""

    lsn: int
    """Every change the snapshot sees was committed below this WAL position."""
    xmin: int
    """Every transaction below this id has finished (committed ones are visible)."""


@contextmanager
def snapshot(
    conn: psycopg.Connection, *, exported: str | None = None, after: int | None = None
) -> Iterator[Snapshot]:
    """Open one REPEATABLE READ transaction and take its snapshot (or an exported one).

    Everything read inside sees the same committed state. Its WAL position is read just
    before the snapshot is taken: a transaction the snapshot sees had inserted its
    commit record before, so it sorts below (the insert position, not the written one:
    with `synchronous_commit = off` the latter lags behind visible commits). `after`
    (the previous batch's position) is exceeded: when no WAL was written since, a commit
    record is written first, so that batch positions strictly increase.
    """
    conn.autocommit = True
    lsn = _wal_position(conn)
    if after is not None and lsn <= after:
        conn.execute("SELECT pg_current_xact_id()")  # a transaction with an id: one record
        lsn = _wal_position(conn)
    conn.autocommit = False
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    with conn.transaction():
        if exported is not None:
            conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(exported)))
        # The first statement takes the snapshot.
        row = conn.execute(
            "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
        ).fetchone()
        assert row is not None
        conn.execute("SET LOCAL TIME ZONE 'UTC'")
        conn.execute("SET LOCAL DateStyle = 'ISO, YMD'")
        yield Snapshot(lsn, int(row[0]))


def _wal_position(conn: psycopg.Connection) -> int:
    """Return the WAL insert position (on a standby: its replay position)."""
    row = conn.execute(
        "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
        " ELSE pg_current_wal_insert_lsn() END - '0/0'::pg_lsn)::bigint"
    ).fetchone()
    assert row is not None
    return int(row[0])


def fence(conn: psycopg.Connection) -> int:
    """Return the current xmin: every transaction below it has finished."""
    row = conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint").fetchone()
    assert row is not None
    return int(row[0])


def _xid(value: int) -> sql.Composable:
    return sql.SQL("{}::xid8").format(sql.Literal(str(value)))


def _in_window(column: str, window: Window) -> sql.Composable:
    parts: list[sql.Composable] = [sql.SQL("TRUE")]
    if window.lo is not None:
        parts.append(sql.SQL("{} >= {}").format(ident(column), _xid(window.lo)))
    if window.hi is not None:
        parts.append(sql.SQL("{} < {}").format(ident(column), _xid(window.hi)))
    return sql.SQL(" AND ").join(parts)


def has_changes(conn: psycopg.Connection, schema: str, table: SourceTable, window: Window) -> bool:
    """Tell whether any row or tombstone falls in `window` (cheap: the xid indexes)."""
    row = conn.execute(
        sql.SQL(
            "SELECT EXISTS (SELECT 1 FROM {t} WHERE {w1})"
            " OR EXISTS (SELECT 1 FROM {d} WHERE table_name = {name} AND {w2})"
        ).format(
            t=ident(schema, table.name),
            w1=_in_window("updated_xid", window),
            d=ident(schema, "deleted_rows"),
            name=sql.Literal(table.name),
            w2=_in_window("deleted_xid", window),
        )
    ).fetchone()
    return bool(row and row[0])


def _representable(column: str) -> sql.Composable:
    return sql.SQL("({c} >= {lo}::timestamptz AND {c} < {hi}::timestamptz)").format(
        c=ident(column), lo=sql.Literal(REPRESENTABLE_FROM), hi=sql.Literal(REPRESENTABLE_UNTIL)
    )


def _micros(column: str) -> sql.Composable:
    """Return a timestamp as µs since the epoch, or NULL when Arrow cannot hold it."""
    return sql.SQL("CASE WHEN {ok} THEN (extract(epoch FROM {c}) * 1000000)::bigint END").format(
        ok=_representable(column), c=ident(column)
    )


def _unrepresentable(table: SourceTable) -> sql.Composable:
    """Return a JSON object of the timestamps Arrow cannot hold (column -> text), or NULL.

    Built only for a row that has one: building (and stripping) an empty object for every
    row took a third of the extraction's time on the server.
    """
    if not table.timestamps:
        return sql.NULL
    pairs = [
        sql.SQL("{name}, CASE WHEN NOT {ok} THEN {c}::text END").format(
            name=sql.Literal(name), ok=_representable(name), c=ident(name)
        )
        for name in table.timestamps
    ]
    every = sql.SQL(" AND ").join(_representable(name) for name in table.timestamps)
    return sql.SQL(
        "CASE WHEN NOT ({every}) THEN jsonb_strip_nulls(jsonb_build_object({pairs}))::text END"
    ).format(every=every, pairs=sql.SQL(", ").join(pairs))


def _query(
    schema: str, table: SourceTable, window: Window, keys: list[int] | None = None
) -> sql.Composable:
    """Rows and tombstones in `window`; with `keys`, those keys' current rows only.

    A row's `_source_ts` is its `updated_at`, filled in by `_typed` (not sent twice);
    a tombstone's is its delete time.
    """
    cols: list[sql.Composable] = []
    tomb: list[sql.Composable] = []
    for name, pg_type in table.columns:
        cols.append(_micros(name) if pg_type == "timestamptz" else ident(name))
        tomb.append(sql.SQL("row_id") if name == table.key else sql.NULL)
    if keys is not None:
        return sql.SQL(
            "SELECT {cols}, 'upsert', NULL, updated_xid::text::bigint, {raw} FROM {t}"
            " WHERE {key} = ANY({keys})"
        ).format(
            cols=sql.SQL(", ").join(cols),
            raw=_unrepresentable(table),
            t=ident(schema, table.name),
            key=ident(table.key),
            keys=sql.Literal(keys),
        )
    return sql.SQL(
        "SELECT {cols}, 'upsert', NULL, updated_xid::text::bigint, {raw} FROM {t} WHERE {w1}"
        " UNION ALL "
        "SELECT {tomb}, CASE WHEN row_id IS NULL THEN 'truncate' ELSE 'delete' END, {dts},"
        " deleted_xid::text::bigint, NULL FROM {d}"
        " WHERE table_name = {name} AND {w2}"
    ).format(
        cols=sql.SQL(", ").join(cols),
        raw=_unrepresentable(table),
        t=ident(schema, table.name),
        w1=_in_window("updated_xid", window),
        tomb=sql.SQL(", ").join(tomb),
        dts=_micros("deleted_at"),
        d=ident(schema, "deleted_rows"),
        name=sql.Literal(table.name),
        w2=_in_window("deleted_xid", window),
    )


def extracted_schema(table: SourceTable) -> dict[str, pl.DataType]:
    """Return the Polars schema of extracted rows.

    The source columns, then `_op` (upsert, delete, or truncate: every row written
    before it is gone), `_source_ts` (the row's
    `updated_at` or the delete time), `_source_xid` (the transaction that wrote it),
    `_unrepresentable` (timestamps Arrow cannot hold, as text) and `_source_lsn` (the WAL
    position the extraction's snapshot was taken at: orders batch rows against CDC changes).
    """
    schema = {name: PG_TO_POLARS[pg_type] for name, pg_type in table.columns}
    schema["_op"] = pl.Utf8()
    schema["_source_ts"] = pl.Datetime("us", "UTC")
    schema["_source_xid"] = pl.Int64()
    schema["_unrepresentable"] = pl.Utf8()
    schema["_source_lsn"] = pl.Int64()
    return schema


def arrow_schema(table: SourceTable) -> pa.Schema:
    """Return `extracted_schema` as the Arrow schema of `extract_batches`."""
    return pl.DataFrame(schema=extracted_schema(table)).to_arrow().schema


def extract_batches(
    conn: psycopg.Connection,
    schema: str,
    table: SourceTable,
    window: Window,
    *,
    batch_rows: int,
    lsn: int,
    keys: list[int] | None = None,
) -> Iterator[pa.RecordBatch]:
    """Yield the rows written in `window` (and tombstones of deleted rows), `arrow_schema`.

    Runs inside `snapshot(conn)`, so every batch sees the same state; `lsn` is the
    snapshot's WAL position. Memory is bounded by `batch_rows`: the output is read a
    slice at a time (a thread reads up to three slices ahead, `read_ahead`). With
    `keys`, only those keys' current rows (a repair).
    """
    target = arrow_schema(table)
    limit = max(1 << 16, batch_rows * _BYTES_PER_ROW)
    polars_target = extracted_schema(table)
    polars_target.pop("_source_lsn")
    raw = {k: (pl.Int64() if isinstance(v, pl.Datetime) else v) for k, v in polars_target.items()}
    stmt = sql.SQL("COPY ({}) TO STDOUT (FORMAT csv)").format(_query(schema, table, window, keys))
    with (
        conn.cursor() as cur,
        cur.copy(stmt) as copy,
        closing(read_ahead(_slices(copy, limit))) as slices,  # stopped before the COPY ends
    ):
        for data in slices:
            frame = _parse(data, raw, polars_target)
            yield _typed(frame.to_arrow(), target, lsn)


def _slices(copy: Iterable[Buffer], limit: int) -> Iterator[bytes]:
    """Yield a COPY's output in slices of whole rows, about `limit` bytes each.

    Each message of a COPY TO is one row (the protocol's promise), so a slice ends at a
    message.
    """
    pending = bytearray()
    for block in copy:
        pending += block
        if len(pending) >= limit:
            yield bytes(pending)
            pending.clear()
    if pending:
        yield bytes(pending)


def _parse(
    data: bytes, raw: dict[str, pl.DataType], target: dict[str, pl.DataType]
) -> pl.DataFrame:
    frame = pl.read_csv(io.BytesIO(data), has_header=False, new_columns=list(raw), schema=raw)
    return frame.with_columns(
        pl.col(name).cast(dtype) for name, dtype in target.items() if isinstance(dtype, pl.Datetime)
    )


def _typed(batch: pa.RecordBatch | pa.Table, target: pa.Schema, lsn: int) -> pa.RecordBatch:
    """Name and type a slice of the query's result (by position) as `target`.

    An upsert's `_source_ts` is its `updated_at` (see `_query`); `_source_lsn` is the
    snapshot's position.
    """
    names = target.names[:-1]  # all but _source_lsn
    columns = dict(zip(names, batch.columns, strict=True))
    columns["_source_ts"] = pc.coalesce(columns["_source_ts"], columns["updated_at"])
    columns["_source_lsn"] = pa.repeat(pa.scalar(lsn, pa.int64()), batch.num_rows)
    arrays = [
        _one_chunk(columns[f.name]).cast(f.type)
        if columns[f.name].type != f.type
        else _one_chunk(columns[f.name])
        for f in target
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=target)


def _one_chunk(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        return column.combine_chunks()
    return column
