"""Bronze: append-only Delta copies of the source tables, with lineage, by transaction windows."""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Iterator
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime

import polars as pl
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable, write_deltalake

from lakehouse.errors import SourceError, StorageError
from lakehouse.failpoints import failpoint
from lakehouse.settings import Settings
from lakehouse.source import extract
from lakehouse.source.schema import TABLES, SourceTable, connect, schema_exists
from lakehouse.storage import Storage
from lakehouse.zones.commits import (
    TABLE_CONFIGURATION,
    ConcurrentWriteError,
    app_id,
    commit_properties,
    is_conflict,
    recorded,
)

LINEAGE = {
    "_batch_id": pl.Int64(),
    "_extract_mode": pl.Utf8(),
    "_ingested_at": pl.Datetime("us", "UTC"),
}
# `lakehouse.bronze.<table>` records the extraction watermark (a transaction id);
# this one records the last batch id (the WAL position of its snapshot), which silver
# reads up to. A repair batch (`lakehouse verify --repair`) moves only the latter.
_BATCH = "batch"


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
    """Return the extraction watermark of `bronze.<table>` (a transaction id), or None."""
    return recorded(_table(storage, table), app_id("bronze", table))


def last_batch(storage: Storage, table: str) -> int | None:
    """Return the id of the last batch in `bronze.<table>` (its snapshot's LSN), or None."""
    return recorded(_table(storage, table), app_id("bronze", table, _BATCH))


def _table(storage: Storage, table: str) -> DeltaTable | None:
    dt = storage.table_or_none("bronze", table)
    if dt is not None:
        check_format(dt, f"bronze.{table}")
    return dt


def check_format(dt: DeltaTable, label: str) -> None:
    """Refuse a table written before changes were ordered by WAL position (cheap: metadata)."""
    names = set(pa.schema(dt.schema().to_arrow()).names)
    if "_source_watermark" in names:
        msg = (
            f"{label} was written by an earlier lakehouse that ordered changes by timestamp; "
            "this version orders them by WAL position and cannot continue that table: move "
            "the warehouse aside and `lakehouse run` to rebuild it from the source"
        )
        raise StorageError(msg)


def is_current(settings: Settings, storage: Storage, table: str) -> bool:
    """Tell whether bronze already holds every committed source change (cheap)."""
    lo = watermark(storage, table)
    with connect(settings, autocommit=True) as conn:
        require_source(conn, settings.pg_schema)
        if stream_fed(conn, settings.pg_schema, table):
            return True
        if lo is None:
            return False
        window = extract.Window(lo, extract.fence(conn))
        return not extract.has_changes(conn, settings.pg_schema, TABLES[table], window)


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
        configuration=TABLE_CONFIGURATION,
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
    """Append the source rows written since the last batch as one atomic Delta commit."""
    source = TABLES[table]
    with connect(settings, autocommit=True) as conn:
        require_source(conn, settings.pg_schema)
        if stream_fed(conn, settings.pg_schema, table):
            return IngestResult(table, "stream", 0, 0, None)
        _lock(conn, table)
        dt = _table(storage, table)
        lo = recorded(dt, app_id("bronze", table))
        _settle(conn, settings.pg_schema, source)
        with extract.snapshot(conn, after=recorded(dt, app_id("bronze", table, _BATCH))) as snap:
            window = extract.Window(lo, max(snap.xmin, lo or 0))
            if lo is not None and not extract.has_changes(conn, settings.pg_schema, source, window):
                return IngestResult(table, window.mode, 0, 0, None)
            counts = {"rows": 0, "deletes": 0}
            extracted = extract.extract_batches(
                conn,
                settings.pg_schema,
                source,
                window,
                batch_rows=settings.batch_rows,
                lsn=snap.lsn,
            )
            # Closed on every way out: its read-ahead thread stops before the snapshot ends.
            with closing(
                _with_lineage(extracted, snap.lsn, window.mode, counts, bronze_schema(source))
            ) as batches:
                first = next(batches, None)
                if first is None and lo is not None:
                    return IngestResult(table, window.mode, 0, 0, None)
                # A snapshot always commits, even empty, so the table and its watermark exist.
                _append(
                    storage,
                    dt,
                    table,
                    batches if first is None else _chain(first, batches),
                    {
                        app_id("bronze", table): window.hi or 0,
                        app_id("bronze", table, _BATCH): snap.lsn,
                    },
                    window.mode,
                )
    return IngestResult(table, window.mode, counts["rows"], counts["deletes"], snap.lsn)


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
        dt = _table(storage, table)
        lo = recorded(dt, app_id("bronze", table))
        with extract.snapshot(conn, exported=snapshot) as snap:
            # Everything the snapshot sees, whatever transaction wrote it: the slot sends
            # only what commits after it. The watermark is still the snapshot's xmin, so
            # batch extraction (after a teardown) takes up from there.
            window = extract.Window(lo, None)
            counts = {"rows": 0, "deletes": 0}
            frames = extract.extract_batches(
                conn,
                settings.pg_schema,
                source,
                window,
                batch_rows=settings.batch_rows,
                lsn=lsn,
            )
            with closing(
                _with_lineage(frames, lsn, "stream-snapshot", counts, bronze_schema(source))
            ) as batches:
                _append(
                    storage,
                    dt,
                    table,
                    batches,
                    {
                        app_id("bronze", table): max(snap.xmin, lo or 0),
                        app_id("bronze", table, _BATCH): lsn,
                        app_id("bronze", table, "stream"): lsn,
                    },
                    "stream-snapshot",
                )
    return IngestResult(table, "stream-snapshot", counts["rows"], counts["deletes"], lsn)


_log = logging.getLogger("lakehouse.bronze")
# How long an ingest waits for a short transaction that holds the fence back.
SETTLE_SECONDS = 2.0


def _settle(conn: psycopg.Connection, schema: str, source: SourceTable) -> None:
    """Wait, briefly, until no committed row lies at or above the fence.

    A row is taken once every transaction older than its writer has finished. A short
    one still running (another writer's, an autovacuum ANALYZE) would otherwise defer
    rows committed a moment ago to the next run; a long one is not waited for (its rows,
    and those after it, come with the next run).
    """
    deadline = time.monotonic() + SETTLE_SECONDS
    while time.monotonic() < deadline:
        xmin = extract.fence(conn)
        if not extract.has_changes(conn, schema, source, extract.Window(xmin, None)):
            return
        time.sleep(0.05)
    row = conn.execute(
        "SELECT pid, coalesce(backend_type, ''), coalesce(application_name, ''),"
        " xact_start FROM pg_stat_activity WHERE backend_xid = (pg_snapshot_xmin("
        "pg_current_snapshot())::text::bigint % 4294967296)::text::xid"
    ).fetchone()
    holder = "a transaction"
    if row:
        # A role without pg_read_all_stats sees other roles' pids and xids, not the rest.
        seen = [f"{row[1]} {row[2]}".strip(), f"open since {row[3]}" if row[3] else ""]
        detail = ", ".join(part for part in seen if part)
        holder = f"pid {row[0]}" + (f" ({detail})" if detail else "")
    _log.warning(
        "%s holds the extraction fence back: rows of `%s` committed after it start come "
        "with the next run",
        holder,
        source.name,
    )


def append_repair(
    storage: Storage, table: str, frames: Iterator[pl.DataFrame], *, lsn: int
) -> IngestResult:
    """Append rows re-read from the source by `lakehouse verify --repair` as a batch.

    Stamped with the WAL position of the snapshot they were read in, like any batch, so
    silver applies them after everything committed before it; the extraction watermark
    does not move.
    """
    dt = _table(storage, table)
    counts = {"rows": 0, "deletes": 0}
    source = TABLES[table]
    typed = extract.arrow_schema(source)
    batches = (b for f in frames for b in f.to_arrow().cast(typed).to_batches())
    _append(
        storage,
        dt,
        table,
        _with_lineage(batches, lsn, "repair", counts, bronze_schema(source)),
        {app_id("bronze", table, _BATCH): lsn},
        "repair",
    )
    return IngestResult(table, "repair", counts["rows"], counts["deletes"], lsn)


def _append(
    storage: Storage,
    dt: DeltaTable | None,
    table: str,
    batches: Iterator[pa.RecordBatch],
    progress: dict[str, int],
    mode: str,
) -> None:
    """One commit, against the version read at the start (a concurrent batch conflicts)."""
    reader = pa.RecordBatchReader.from_batches(bronze_schema(TABLES[table]), batches)
    try:
        write_deltalake(
            dt if dt is not None else storage.uri("bronze", table),
            reader,
            mode="append",
            storage_options=None if dt is not None else storage.options,
            configuration=TABLE_CONFIGURATION,
            commit_properties=commit_properties(
                progress, operation="ingest", metadata={"lakehouse.mode": mode}
            ),
        )
    except Exception as exc:
        if is_conflict(exc):
            msg = (
                f"another writer appended a batch to bronze.{table} at the same time; this "
                "one wrote nothing: rerun (the next run takes what is left)"
            )
            raise ConcurrentWriteError(msg) from None
        raise


# How long an ingest waits for another ingest of the same table to finish.
LOCK_WAIT_SECONDS = 120.0


def _lock(conn: psycopg.Connection, table: str) -> None:
    """Take the table's ingest lock, waiting for another ingest to finish.

    Two ingests of one table at once would each extract the same rows; the second then
    finds its commit beaten (the same progress mark) and lands nothing. Waiting for the
    first instead costs nothing: the second then finds nothing new. The lock is Postgres'
    (a session advisory lock), so a killed ingest releases it.
    """
    conn.execute(f"SET lock_timeout = '{int(LOCK_WAIT_SECONDS * 1000)}ms'")
    try:
        conn.execute("SELECT pg_advisory_lock(hashtext(%s))", (app_id("bronze", table),))
    except psycopg.errors.LockNotAvailable:
        msg = (
            f"another ingest of `{table}` has been running for over {LOCK_WAIT_SECONDS:g}s; "
            "wait for it to finish (or stop it) and rerun"
        )
        raise SourceError(msg) from None
    finally:
        conn.execute("SET lock_timeout = 0")


def _with_lineage(
    batches: Iterator[pa.RecordBatch],
    batch_id: int,
    mode: str,
    counts: dict[str, int],
    schema: pa.Schema,
) -> Generator[pa.RecordBatch]:
    """Add the lineage columns to extracted batches (`extract.arrow_schema`), in Arrow.

    Closing this generator closes `batches` too, at once: an extraction's read-ahead
    thread must stop before its snapshot's transaction ends.
    """
    ingested = pa.scalar(datetime.now(UTC), pa.timestamp("us", "UTC"))
    try:
        for batch in batches:
            if batch.num_rows == 0:
                continue
            upserts = int(pc.sum(pc.equal(batch["_op"], "upsert")).as_py() or 0)
            counts["deletes"] += batch.num_rows - upserts
            counts["rows"] += upserts
            lineage = {
                "_batch_id": pa.scalar(batch_id, pa.int64()),
                "_extract_mode": pa.scalar(mode, schema.field("_extract_mode").type),
                "_ingested_at": ingested,
            }
            arrays = [*batch.columns, *(pa.repeat(v, batch.num_rows) for v in lineage.values())]
            yield pa.RecordBatch.from_arrays(arrays, schema=schema)
            failpoint("bronze.mid-write")
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def _chain(first: pa.RecordBatch, rest: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    yield first
    yield from rest
