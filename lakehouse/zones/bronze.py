"""Bronze: append-only Delta copies of the source tables, with lineage, by fenced windows."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import polars as pl
import psycopg
import pyarrow as pa
from deltalake import write_deltalake

from lakehouse.errors import SourceError
from lakehouse.failpoints import failpoint
from lakehouse.settings import Settings
from lakehouse.source import extract
from lakehouse.source.schema import TABLES, SourceTable, connect, schema_exists
from lakehouse.storage import Storage
from lakehouse.zones.commits import app_id, commit_properties, recorded

LINEAGE = {
    "_batch_id": pl.Int64(),
    "_source_watermark": pl.Datetime("us", "UTC"),
    "_extract_mode": pl.Utf8(),
    "_ingested_at": pl.Datetime("us", "UTC"),
}


@dataclass(frozen=True)
class IngestResult:
    """What one ingest did: `batch_id` is None when there was nothing new."""

    table: str
    mode: str
    rows: int
    deletes: int
    batch_id: int | None


def bronze_schema(table: SourceTable) -> pa.Schema:
    """Return the Arrow schema of `bronze.<table>`."""
    empty = pl.DataFrame(schema={**extract.extracted_schema(table), **LINEAGE})
    return empty.to_arrow().schema


def watermark(storage: Storage, table: str) -> int | None:
    """Return the high watermark (µs) of the last batch in `bronze.<table>`, or None."""
    return recorded(storage.table_or_none("bronze", table), app_id("bronze", table))


def is_current(settings: Settings, storage: Storage, table: str) -> bool:
    """Tell whether bronze already holds every committed source change (cheap)."""
    lo = watermark(storage, table)
    with connect(settings, autocommit=True) as conn:
        require_source(conn, settings.pg_schema)
        if stream_fed(conn, settings.pg_schema, table):
            return True
        return not extract.has_changes(conn, settings.pg_schema, TABLES[table], lo)


def stream_slot(schema: str, table: str) -> str:
    """Return the name of the CDC replication slot (and publication) of a source table."""
    return f"lakehouse_{schema}_{table}".lower()


def changes_table(table: str) -> str:
    """Return the name of the CDC change table of a source table in bronze."""
    return f"{table}_changes"


def changes_landed(storage: Storage, table: str) -> int | None:
    """Return the LSN up to which every transaction of `table` is in its change table."""
    return recorded(
        storage.table_or_none("bronze", changes_table(table)),
        app_id("bronze", changes_table(table)),
    )


def stream_fed(conn: psycopg.Connection, schema: str, table: str) -> bool:
    """Tell whether a CDC slot feeds this table; batch extraction then stands aside."""
    row = conn.execute(
        "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (stream_slot(schema, table),)
    ).fetchone()
    return row is not None


def stream_snapshot_lsn(storage: Storage, table: str) -> int | None:
    """Return the consistent point of the stream snapshot in `bronze.<table>` (None or 0: none)."""
    return recorded(storage.table_or_none("bronze", table), app_id("bronze", table, "stream"))


def forget_stream_snapshot(storage: Storage, table: str) -> None:
    """Record (in an empty commit) that the table's stream snapshot no longer has a slot."""
    write_deltalake(
        storage.uri("bronze", table),
        bronze_schema(TABLES[table]).empty_table(),
        mode="append",
        storage_options=storage.options,
        commit_properties=commit_properties(
            {app_id("bronze", table, "stream"): 0}, operation="stream-teardown"
        ),
    )


def require_source(conn: psycopg.Connection, schema: str) -> None:
    """Fail with the fix when the source schema has not been seeded."""
    if not schema_exists(conn, schema):
        msg = f"the source has no lending tables in schema `{schema}`; run `lakehouse seed`"
        raise SourceError(msg)


def ingest(settings: Settings, storage: Storage, table: str) -> IngestResult:
    """Append the source rows changed since the last batch as one atomic Delta commit."""
    source = TABLES[table]
    with connect(settings, autocommit=True) as conn:
        require_source(conn, settings.pg_schema)
        if stream_fed(conn, settings.pg_schema, table):
            return IngestResult(table, "stream", 0, 0, None)
        extract.check_can_fence(conn)
        _lock(conn, table)
        lo = watermark(storage, table)
        hi = extract.fence(conn)
        window = extract.Window(lo, hi)
        if lo is not None and (
            hi <= lo or not extract.has_changes(conn, settings.pg_schema, source, lo)
        ):
            return IngestResult(table, window.mode, 0, 0, None)
        conn.autocommit = False
        counts = {"rows": 0, "deletes": 0}
        batches = _with_lineage(
            extract.extract(
                conn, settings.pg_schema, source, window, batch_rows=settings.batch_rows
            ),
            window,
            counts,
        )
        schema = bronze_schema(source)
        first = next(batches, None)
        if first is None and lo is not None:
            return IngestResult(table, window.mode, 0, 0, None)
        # A snapshot always commits, even empty, so the table and its watermark exist.
        reader = pa.RecordBatchReader.from_batches(
            schema, batches if first is None else _chain(first, batches)
        )
        write_deltalake(
            storage.uri("bronze", table),
            reader,
            mode="append",
            storage_options=storage.options,
            commit_properties=commit_properties(
                {app_id("bronze", table): hi},
                operation="ingest",
                metadata={"lakehouse.mode": window.mode},
            ),
        )
        conn.commit()
    return IngestResult(table, window.mode, counts["rows"], counts["deletes"], hi)


def ingest_snapshot(
    settings: Settings, storage: Storage, table: str, *, snapshot: str, lsn: int
) -> IngestResult:
    """Land the rows an exported snapshot sees, stamped with the slot's consistent point.

    Runs inside `snapshot` (from CREATE_REPLICATION_SLOT): bronze then holds exactly the
    transactions committed before the slot's first change. When bronze already has
    batches, only what changed since the last one is taken (tombstones included).
    """
    source = TABLES[table]
    with connect(settings, autocommit=True) as conn:
        _lock(conn, table)
        lo = watermark(storage, table)
        hi = extract.fence(conn)
        if lo is not None:
            hi = max(hi, lo + 1)
        # Everything the snapshot sees, whatever its timestamp: no upper fence.
        window = extract.Window(lo, extract.NO_UPPER_BOUND)
        conn.autocommit = False
        counts = {"rows": 0, "deletes": 0}
        frames = extract.extract(
            conn,
            settings.pg_schema,
            source,
            window,
            batch_rows=settings.batch_rows,
            snapshot=snapshot,
            snapshot_lsn=lsn,
        )
        batches = _with_lineage(frames, extract.Window(lo, hi), counts, mode="stream-snapshot")
        write_deltalake(
            storage.uri("bronze", table),
            pa.RecordBatchReader.from_batches(bronze_schema(source), batches),
            mode="append",
            storage_options=storage.options,
            commit_properties=commit_properties(
                {app_id("bronze", table): hi, app_id("bronze", table, "stream"): lsn},
                operation="ingest",
                metadata={"lakehouse.mode": "stream-snapshot"},
            ),
        )
        conn.commit()
    return IngestResult(table, "stream-snapshot", counts["rows"], counts["deletes"], hi)


def _lock(conn: psycopg.Connection, table: str) -> None:
    row = conn.execute(
        "SELECT pg_try_advisory_lock(hashtext(%s))", (app_id("bronze", table),)
    ).fetchone()
    if not row or not row[0]:
        msg = f"another ingest of `{table}` is running; wait for it to finish"
        raise SourceError(msg)


def _with_lineage(
    frames: Iterator[pl.DataFrame],
    window: extract.Window,
    counts: dict[str, int],
    *,
    mode: str | None = None,
) -> Iterator[pa.RecordBatch]:
    ingested = datetime.now(UTC)
    lineage = [
        pl.lit(window.hi_us, pl.Int64).alias("_batch_id"),
        pl.lit(window.hi_us).cast(pl.Datetime("us", "UTC")).alias("_source_watermark"),
        pl.lit(mode or window.mode).alias("_extract_mode"),
        pl.lit(ingested).cast(pl.Datetime("us", "UTC")).alias("_ingested_at"),
    ]
    for frame in frames:
        if frame.height == 0:
            continue
        deletes = int((frame["_op"] == "delete").sum())
        counts["deletes"] += deletes
        counts["rows"] += frame.height - deletes
        yield from frame.with_columns(lineage).to_arrow().to_batches()
        failpoint("bronze.mid-write")


def _chain(first: pa.RecordBatch, rest: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    yield first
    yield from rest
