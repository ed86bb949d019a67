"""Fenced snapshot and incremental extraction from Postgres into Arrow batches, via COPY."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import polars as pl
import psycopg
from psycopg import sql

from lakehouse.errors import SourceError
from lakehouse.source.schema import SourceTable, ident

PG_TO_POLARS: dict[str, pl.DataType] = {
    "bigint": pl.Int64(),
    "integer": pl.Int32(),
    "smallint": pl.Int16(),
    "double precision": pl.Float64(),
    "text": pl.Utf8(),
    "timestamptz": pl.Datetime("us", "UTC"),
}
_BYTES_PER_ROW = 160  # rough CSV width of a row: sizes the read buffer from batch_rows
NO_UPPER_BOUND = 253_402_300_799_000_000  # 9999-12-31: a window with no upper fence


@dataclass(frozen=True)
class Window:
    """Rows changed in `[lo_us, hi_us)` (µs since the epoch); `lo_us=None` is a snapshot."""

    lo_us: int | None
    hi_us: int

    @property
    def mode(self) -> str:
        """Return `snapshot` or `incremental`."""
        return "snapshot" if self.lo_us is None else "incremental"


def fence(conn: psycopg.Connection) -> int:
    """Return the high watermark: no transaction still open can write a timestamp below it.

    The triggers take `clock_timestamp()` only after their transaction has an xid, so any
    writer not yet listed here will stamp rows later than now, and any listed writer stamps
    rows no earlier than its own start.
    """
    try:
        row = conn.execute(
            "SELECT (extract(epoch FROM least(clock_timestamp(),"
            " (SELECT min(xact_start) FROM pg_stat_activity"
            "   WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid()),"
            " (SELECT min(prepared) FROM pg_prepared_xacts))) * 1000000)::bigint"
        ).fetchone()
    except psycopg.errors.InsufficientPrivilege as exc:
        msg = (
            f"cannot read pg_stat_activity ({exc.diag.message_primary}); grant the "
            "pg_read_all_stats role to the lakehouse's Postgres user"
        )
        raise SourceError(msg) from None
    assert row is not None
    return int(row[0])


def check_can_fence(conn: psycopg.Connection) -> None:
    """Fail early if the role cannot see other sessions' transactions (needed by `fence`)."""
    row = conn.execute(
        "SELECT rolsuper OR pg_has_role(current_user, 'pg_read_all_stats', 'MEMBER') "
        "FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    if not row or not row[0]:
        msg = (
            "the Postgres user cannot see other sessions' open transactions, so incremental "
            "extraction could miss rows; `GRANT pg_read_all_stats TO <user>`"
        )
        raise SourceError(msg)


def has_changes(
    conn: psycopg.Connection, schema: str, table: SourceTable, lo_us: int | None
) -> bool:
    """Tell whether anything changed at or after `lo_us` (cheap: uses the timestamp indexes)."""
    if lo_us is None:
        return True
    row = conn.execute(
        sql.SQL(
            "SELECT EXISTS (SELECT 1 FROM {t} WHERE updated_at >= to_timestamp(%s / 1e6))"
            " OR EXISTS (SELECT 1 FROM {d} WHERE table_name = %s"
            " AND deleted_at >= to_timestamp(%s / 1e6))"
        ).format(t=ident(schema, table.name), d=ident(schema, "deleted_rows")),
        (lo_us, table.name, lo_us),
    ).fetchone()
    return bool(row and (row[0]))


def _query(schema: str, table: SourceTable, window: Window) -> sql.Composable:
    cols: list[sql.Composable] = []
    tomb: list[sql.Composable] = []
    for name, pg_type in table.columns:
        if pg_type == "timestamptz":
            cols.append(
                sql.SQL("(extract(epoch FROM {c}) * 1000000)::bigint").format(c=ident(name))
            )
        else:
            cols.append(ident(name))
        tomb.append(sql.SQL("row_id") if name == table.key else sql.NULL)
    lo = sql.Literal(window.lo_us)
    hi = sql.Literal(window.hi_us)
    in_window = sql.SQL(
        "{c} < to_timestamp({hi} / 1e6)"
        + (" AND {c} >= to_timestamp({lo} / 1e6)" if window.lo_us is not None else "")
    )
    return sql.SQL(
        "SELECT {cols}, 'upsert', (extract(epoch FROM updated_at) * 1000000)::bigint FROM {t}"
        " WHERE {w1}"
        " UNION ALL "
        "SELECT {tomb}, 'delete', (extract(epoch FROM deleted_at) * 1000000)::bigint FROM {d}"
        " WHERE table_name = {name} AND {w2}"
    ).format(
        cols=sql.SQL(", ").join(cols),
        t=ident(schema, table.name),
        w1=in_window.format(c=ident("updated_at"), lo=lo, hi=hi),
        tomb=sql.SQL(", ").join(tomb),
        d=ident(schema, "deleted_rows"),
        name=sql.Literal(table.name),
        w2=in_window.format(c=ident("deleted_at"), lo=lo, hi=hi),
    )


def extracted_schema(table: SourceTable) -> dict[str, pl.DataType]:
    """Return the Polars schema of extracted rows.

    The source columns, then `_op` (upsert or delete), `_source_ts` (the row's
    `updated_at` or the delete time) and `_source_lsn` (the WAL position the extraction's
    snapshot was taken at: orders batch rows against CDC changes).
    """
    schema = {name: PG_TO_POLARS[pg_type] for name, pg_type in table.columns}
    schema["_op"] = pl.Utf8()
    schema["_source_ts"] = pl.Datetime("us", "UTC")
    schema["_source_lsn"] = pl.Int64()
    return schema


def extract(
    conn: psycopg.Connection,
    schema: str,
    table: SourceTable,
    window: Window,
    *,
    batch_rows: int,
    snapshot: str | None = None,
    snapshot_lsn: int | None = None,
) -> Iterator[pl.DataFrame]:
    """Yield the rows changed in `window` (and tombstones of deleted rows) as frames.

    Runs in one REPEATABLE READ transaction so every batch sees the same snapshot (or
    in the exported `snapshot` of a replication slot, whose consistent point is
    `snapshot_lsn`); memory is bounded by `batch_rows` because COPY output is parsed a
    slice at a time.
    """
    target = extracted_schema(table)
    lsn_type = target.pop("_source_lsn")
    raw = {k: (pl.Int64() if isinstance(v, pl.Datetime) else v) for k, v in target.items()}
    limit = max(1 << 16, batch_rows * _BYTES_PER_ROW)
    stmt = sql.SQL("COPY ({}) TO STDOUT (FORMAT csv)").format(_query(schema, table, window))
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    with conn.transaction(), conn.cursor() as cur:
        if snapshot is not None:
            cur.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
            lsn = snapshot_lsn
        else:
            # The first statement takes the snapshot: every change it sees was committed
            # at a WAL position below this one (on a standby: below its replay position).
            row = cur.execute(
                "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
                " ELSE pg_current_wal_lsn() END - '0/0'::pg_lsn)::bigint"
            ).fetchone()
            lsn = row[0] if row else None
        position = pl.lit(lsn, lsn_type).alias("_source_lsn")
        with cur.copy(stmt) as copy:
            pending = bytearray()
            for block in copy:
                pending += block
                if len(pending) >= limit:
                    cut = _row_boundary(pending)
                    if cut > 0:
                        yield _parse(bytes(pending[:cut]), raw, target).with_columns(position)
                        del pending[:cut]
            if pending:
                yield _parse(bytes(pending), raw, target).with_columns(position)


def _row_boundary(buf: bytearray) -> int:
    """Return the end of the last complete CSV row in `buf` (0 if none).

    A newline ends a row only outside quotes, i.e. after an even number of quote chars.
    """
    pos = len(buf)
    while True:
        pos = buf.rfind(b"\n", 0, pos)
        if pos < 0:
            return 0
        if buf.count(b'"', 0, pos) % 2 == 0:
            return pos + 1


def _parse(
    data: bytes, raw: dict[str, pl.DataType], target: dict[str, pl.DataType]
) -> pl.DataFrame:
    frame = pl.read_csv(io.BytesIO(data), has_header=False, new_columns=list(raw), schema=raw)
    return frame.with_columns(
        pl.col(name).cast(dtype) for name, dtype in target.items() if isinstance(dtype, pl.Datetime)
    )
