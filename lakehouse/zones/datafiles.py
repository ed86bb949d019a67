"""Create or replace a Delta table with Parquet files written by Polars, in one commit.

A first load of millions of rows spends most of its time in `write_deltalake` (one
thread, from Arrow batches). Polars writes the same Parquet in parallel, straight from
the frames we already hold, in about a third of the time. The files go into the table's
folder under fresh names; nothing is visible until the single commit that adds them
all (with the progress marks) succeeds. A crash before it leaves unreferenced files and
the table as it was: the rerun starts over, and `lakehouse maintain` (vacuum) deletes
the leftovers.

For a new table (silver's first load) or a whole-table overwrite (gold); appends and
merges stay with delta-rs.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
from deltalake import CommitProperties, DeltaTable, Schema
from deltalake.transaction import AddAction, create_table_with_add_actions

from lakehouse.errors import StorageError
from lakehouse.failpoints import failpoint
from lakehouse.storage import Storage, _split_s3, minio_client
from lakehouse.zones.commits import TABLE_CONFIGURATION, ConcurrentWriteError

# Longer strings are left out of min/max stats, as delta-rs does past 32 characters.
_MAX_STAT_STRING = 32


class TableFiles:
    """Data files of a new or replaced Delta table, committed all at once."""

    def __init__(self, storage: Storage, zone: str, name: str) -> None:
        self.storage = storage
        self.uri = storage.uri(zone, name)
        self.label = f"{zone}.{name}"
        self.schema: pl.Schema | None = None
        self.actions: list[AddAction] = []
        self._run = uuid.uuid4()

    def add(self, frame: pl.DataFrame) -> None:
        """Write `frame` as one data file (nothing is visible until `commit`)."""
        if self.schema is None:
            self.schema = frame.schema
        elif frame.schema != self.schema:
            frame = frame.select(list(self.schema)).cast(self.schema)
        if frame.height == 0:
            return
        name = f"part-{len(self.actions):05d}-{self._run}-c000.snappy.parquet"
        size = self._write(frame, name)
        self.actions.append(
            AddAction(
                path=name,
                size=size,
                partition_values={},
                modification_time=int(time.time() * 1000),
                data_change=True,
                stats=json.dumps(file_stats(frame), separators=(",", ":"), allow_nan=False),
            )
        )

    def _write(self, frame: pl.DataFrame, name: str) -> int:
        if not self.storage.is_s3:
            path = Path(self.uri) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            frame.write_parquet(path, compression="snappy", statistics=True)
            return path.stat().st_size
        buffer = io.BytesIO()
        frame.write_parquet(buffer, compression="snappy", statistics=True)
        size = buffer.tell()
        buffer.seek(0)
        bucket, prefix = _split_s3(self.uri)
        client = minio_client(self.storage.s3, self.storage.options)
        client.put_object(bucket, f"{prefix}/{name}", buffer, size, part_size=64 * 1024 * 1024)
        return size

    def commit(
        self,
        props: CommitProperties,
        *,
        failpoint_name: str,
        replace: DeltaTable | None = None,
        guard: Iterable[str] = (),
    ) -> None:
        """Create the table with every file written, in one commit.

        With `replace` (the table as it is now), overwrite it instead: one commit removes
        its files and adds these, with this schema (a plain WRITE, so the table keeps its
        identity and history).

        A new table is created empty first, then the files land in one append checked at
        commit time: delta-rs lets two writers that create a table at once both land their
        CREATE (the second at version 1, unchecked), which would add the files twice. So
        the append fails if a progress mark in `guard` is already in the table, or lands
        there meanwhile (`lakehouse.zones.commits`).
        """
        assert self.schema is not None, "commit before any add"
        failpoint(failpoint_name)
        empty = pl.DataFrame(schema=self.schema).to_arrow(compat_level=pl.CompatLevel.oldest())
        if replace is not None:
            replace.create_write_transaction(
                list(self.actions), mode="overwrite", schema=empty.schema, commit_properties=props
            )
            return
        options = self.storage.options or None
        try:
            create_table_with_add_actions(
                self.uri,
                Schema.from_arrow(empty.schema),
                [],
                mode="ignore",
                configuration=TABLE_CONFIGURATION,
                storage_options=options,
            )
        except Exception:  # another writer created it this instant: it exists, go on
            if not self.storage.exists(*self.label.split(".", 1)):
                raise
        dt = DeltaTable(self.uri, storage_options=options)
        taken = [app for app in guard if dt.transaction_version(app) is not None]
        if taken:
            msg = f"another writer created {self.label} first"
            raise ConcurrentWriteError(msg)
        if dt.file_uris():
            msg = f"table {self.label} already exists with data; it is never overwritten here"
            raise StorageError(msg)
        dt.create_write_transaction(
            list(self.actions), mode="append", schema=empty.schema, commit_properties=props
        )


def file_stats(frame: pl.DataFrame) -> dict[str, Any]:
    """Delta file statistics: record count, null counts, and min/max where they are safe.

    Timestamps are kept to the millisecond like delta-rs, rounded outwards (min down, max
    up) so a reader skipping files by them never skips a matching row. Floats with NaN or
    ±Infinity (which JSON cannot write) and long strings get no min/max.
    """
    nulls = frame.null_count().row(0, named=True)
    minimum: dict[str, Any] = {}
    maximum: dict[str, Any] = {}
    columns = [
        c
        for c, t in frame.schema.items()
        if (
            t.is_numeric()
            or t in (pl.Boolean, pl.String, pl.Date)
            or (isinstance(t, pl.Datetime) and t.time_zone is not None)  # naive: no stats
        )
        and nulls[c] < frame.height
    ]
    if columns:
        lows = frame.select(pl.col(columns).min())
        highs = frame.select(pl.col(columns).max())
        for c in columns:
            try:
                low, high = lows[c].item(), highs[c].item()
            except (OverflowError, ValueError):  # an instant Python cannot hold: no stats
                continue
            if frame.schema[c].is_float() and not frame[c].drop_nulls().is_finite().all():
                continue  # NaN and ±Infinity have no JSON form (and NaN no order)
            if isinstance(low, str) and (
                len(low) > _MAX_STAT_STRING or len(high) > _MAX_STAT_STRING
            ):
                continue
            if isinstance(low, datetime):
                # Rounding the largest instant up can pass 9999-12-31: then no max, which
                # only costs a reader the file skip.
                minimum[c] = _ms(low, up=False)
                if (top := _ms(high, up=True)) is not None:
                    maximum[c] = top
                continue
            if hasattr(low, "isoformat"):
                minimum[c], maximum[c] = low.isoformat(), high.isoformat()
                continue
            minimum[c], maximum[c] = low, high
    return {
        "numRecords": frame.height,
        "minValues": minimum,
        "maxValues": maximum,
        "nullCount": nulls,
    }


def _ms(value: datetime, *, up: bool) -> str | None:
    """Format a timestamp to the millisecond, rounding down or up (None: past year 9999)."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    floor = value.replace(microsecond=value.microsecond // 1000 * 1000)
    if up and floor != value:
        if floor >= datetime.max - timedelta(milliseconds=1):
            return None
        floor += timedelta(milliseconds=1)
    return (
        f"{floor.year:04d}"
        + floor.strftime("-%m-%dT%H:%M:%S.")
        + f"{floor.microsecond // 1000:03d}Z"
    )
