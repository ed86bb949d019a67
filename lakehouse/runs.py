"""Pipeline runs, recorded in the Delta table `_meta.pipeline_runs` for `lakehouse status`.

One row per `lakehouse run` (or `lakehouse demo`) pipeline run: when it started and ended,
its outcome (`ran`, `up to date` or `failed`), the tasks that ran and the error, if any.
Appends are Delta commits, so runs from several processes land side by side.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import polars as pl
import pyarrow as pa
from deltalake import write_deltalake

from lakehouse.storage import Storage
from lakehouse.zones.commits import TABLE_CONFIGURATION

ZONE, TABLE = "_meta", "pipeline_runs"
SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        ("outcome", pa.string()),
        ("tasks_ran", pa.int32()),
        ("tasks", pa.string()),
        ("error", pa.string()),
        ("host", pa.string()),
        ("pid", pa.int32()),
    ]
)


@dataclass(frozen=True)
class RunRecord:
    """One pipeline run."""

    started_at: datetime
    finished_at: datetime
    outcome: str
    tasks: list[str] = field(default_factory=list)
    error: str | None = None
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def seconds(self) -> float:
        """Return how long the run took."""
        return (self.finished_at - self.started_at).total_seconds()


def record(storage: Storage, run: RunRecord) -> None:
    """Append one run (one Delta commit)."""
    row = pa.Table.from_pylist(
        [
            {
                "run_id": run.run_id,
                "started_at": run.started_at,
                "finished_at": run.finished_at,
                "outcome": run.outcome,
                "tasks_ran": len(run.tasks),
                "tasks": ", ".join(run.tasks),
                "error": run.error,
                "host": socket.gethostname(),
                "pid": os.getpid(),
            }
        ],
        schema=SCHEMA,
    )
    write_deltalake(
        storage.uri(ZONE, TABLE),
        row,
        mode="append",
        storage_options=storage.options,
        configuration=TABLE_CONFIGURATION,
    )


def recent(storage: Storage, limit: int = 5) -> list[RunRecord]:
    """Return the last `limit` runs, newest first (none before the first run)."""
    dt = storage.table_or_none(ZONE, TABLE)
    if dt is None:
        return []
    # Polars' own reader: deltalake's pyarrow dataset reads through Python file objects,
    # and an Arrow thread releasing one while the interpreter exits aborts the process
    # ("terminate called without an active exception"; 5 `lakehouse status` runs in 600).
    rows = (
        pl.scan_delta(dt)
        .select(f.name for f in SCHEMA)
        .sort("started_at", descending=True)
        .head(limit)
        .collect()
        .to_dicts()
    )
    return [
        RunRecord(
            started_at=r["started_at"],
            finished_at=r["finished_at"],
            outcome=r["outcome"],
            tasks=[t for t in (r["tasks"] or "").split(", ") if t],
            error=r["error"],
            run_id=r["run_id"],
        )
        for r in rows
    ]


def now() -> datetime:
    """Return the current UTC time (the runs' clock)."""
    return datetime.now(UTC)
