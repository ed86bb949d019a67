"""`lakehouse verify --repair`: re-read keys from the source into bronze, as a repair batch.

A repair batch is stamped with its snapshot's WAL position like any batch, so promotion
orders it among the stream's changes; a key gone from the source lands as a delete.
"""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl
import pyarrow as pa

from lakehouse.settings import Settings
from lakehouse.source import extract
from lakehouse.source.schema import TABLES, SourceTable, connect
from lakehouse.storage import Storage
from lakehouse.zones import bronze, silver


def promote_all(storage: Storage) -> None:
    """Promote every table's silver (applicants first: the applications' rules read them)."""
    for table in TABLES:
        silver.promote(storage, table)


def reread(
    settings: Settings, storage: Storage, table: str, keys: list[int], *, doubled: list[int]
) -> int:
    """Re-read `keys` from the source into bronze (a repair batch); return how many.

    Keys silver holds twice (`doubled`) are first deleted everywhere and promoted away.
    """
    source = TABLES[table]
    if doubled:
        # A key held twice is first removed everywhere, then re-read.
        with (
            connect(settings) as conn,
            extract.snapshot(conn, after=bronze.last_batch(storage, table)) as snap,
        ):
            first = snap.lsn
        bronze.append_repair(storage, table, iter([_deletes(source, doubled, first)]), lsn=first)
        promote_all(storage)
    with (
        connect(settings) as conn,
        extract.snapshot(conn, after=bronze.last_batch(storage, table)) as snap,
    ):
        rows = [
            _frame(batch)
            for batch in extract.extract_batches(
                conn,
                settings.pg_schema,
                source,
                extract.Window(None, None),
                batch_rows=settings.batch_rows,
                lsn=snap.lsn,
                keys=keys,
            )
        ]
        lsn = snap.lsn
    frame = pl.concat(rows) if rows else pl.DataFrame(schema=extract.extracted_schema(source))
    present = set(frame[source.key].to_list())
    gone = [k for k in keys if k not in present]
    frames = [frame, _deletes(source, gone, lsn)] if gone else [frame]
    bronze.append_repair(storage, table, iter(frames), lsn=lsn)
    return len(keys)


def _deletes(source: SourceTable, keys: list[int], lsn: int) -> pl.DataFrame:
    schema = extract.extracted_schema(source)
    now = datetime.now(UTC)
    given = {
        source.key: keys,
        "_op": ["delete"] * len(keys),
        "_source_ts": [now] * len(keys),
        "_source_lsn": [lsn] * len(keys),
    }
    return pl.DataFrame({c: given.get(c, [None] * len(keys)) for c in schema}, schema=schema)


def _frame(batch: pa.RecordBatch) -> pl.DataFrame:
    frame = pl.from_arrow(batch)
    assert isinstance(frame, pl.DataFrame)
    return frame
