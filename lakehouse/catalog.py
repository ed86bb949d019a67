"""`lakehouse tables`: every Delta table with its version, rows, size and last update."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc

from lakehouse.storage import Storage


@dataclass(frozen=True)
class TableInfo:
    """Metadata of one Delta table, read from its log (no data scan)."""

    zone: str
    name: str
    version: int
    rows: int
    files: int
    size_bytes: int
    last_update: datetime | None
    newest_change: datetime | None = None
    """The newest source `updated_at` the table holds, from the files' statistics."""


def meta_tables(storage: Storage) -> list[tuple[str, str]]:
    """Return the lakehouse's own record tables that exist: pipeline runs, verifications."""
    from lakehouse import runs, verify

    known = ((runs.ZONE, runs.TABLE), (verify.ZONE, verify.TABLE))
    return [table for table in known if storage.exists(*table)]


def describe(storage: Storage, *, meta: bool = False) -> list[TableInfo]:
    """Describe every table in the lakehouse, zone by zone (with `meta`, `_meta.*` too)."""
    infos = []
    for zone, name in storage.list_tables() + (meta_tables(storage) if meta else []):
        dt = storage.table(zone, name)
        adds = pa.table(dt.get_add_actions(flatten=True))
        # The newest data file's time, not dt.history(): history hangs against some S3
        # servers (delta-rs issue 4362, seen with moto), and this needs no extra request.
        newest = pc.max(adds["modification_time"]).as_py() if adds.num_rows else None
        last = datetime.fromtimestamp(newest / 1000, tz=UTC) if newest else None
        infos.append(
            TableInfo(
                zone=zone,
                name=name,
                version=dt.version(),
                rows=int(pc.sum(adds["num_records"]).as_py() or 0) if adds.num_rows else 0,
                files=adds.num_rows,
                size_bytes=int(pc.sum(adds["size_bytes"]).as_py() or 0) if adds.num_rows else 0,
                last_update=last,
                newest_change=_max_stat(adds, "max.updated_at"),
            )
        )
    return infos


def _max_stat(adds: pa.Table, column: str) -> datetime | None:
    """Return the largest value of a timestamp column's file statistics, in UTC."""
    if column not in adds.column_names or adds.num_rows == 0:
        return None
    value = pc.max(adds[column]).as_py()
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def human_size(size: int) -> str:
    """Format a byte count."""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"
