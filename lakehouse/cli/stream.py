"""`lakehouse stream`: CDC from Postgres logical replication into bronze."""

from __future__ import annotations

import argparse
import sys
from typing import Any, cast

from lakehouse import log
from lakehouse.errors import UsageError
from lakehouse.settings import Settings


def stream(settings: Settings, args: argparse.Namespace) -> int:
    """CDC: set up, run, show or tear down the stream into bronze."""
    action, promote, setup = args.action, args.promote, args.setup
    from lakehouse.storage import Storage

    try:
        from stream import setup as stream_setup
    except ImportError as exc:  # bytewax has no wheel for this Python
        msg = f"the stream needs bytewax, which cannot be imported ({exc}); use Python 3.11/3.12"
        raise UsageError(msg) from None
    storage = Storage.from_settings(settings)
    storage.check()
    if action == "setup" or (action == "run" and setup):
        for r in stream_setup.setup(settings, storage):
            if r.created:
                log.event(
                    "stream.setup",
                    f"{r.table}: slot {r.slot} created; snapshot of {r.snapshot_rows:,} rows "
                    f"landed in bronze.{r.table} at LSN {_lsn(r.snapshot_lsn)}",
                    table=r.table,
                    slot=r.slot,
                    snapshot_rows=r.snapshot_rows,
                )
            else:
                at = _lsn(r.snapshot_lsn)
                log.event(
                    "stream.setup",
                    f"{r.table}: slot {r.slot} already set up (snapshot at LSN {at})",
                    table=r.table,
                    slot=r.slot,
                )
        if action == "setup":
            return 0
    if action == "teardown":
        dropped = stream_setup.teardown(settings, storage)
        log.event(
            "stream.teardown",
            ("dropped slots " + ", ".join(dropped) if dropped else "no slots to drop")
            + "; batch extraction feeds bronze again",
            slots=dropped,
        )
        return 0
    if action == "status":
        from lakehouse.sql import QueryResult, render

        rows = []
        for t in stream_setup.status(settings, storage):
            fresh = t.freshness_seconds
            rows.append(
                (
                    t.table,
                    t.slot if t.slot_exists else "(none)",
                    "yes" if t.active else "no",
                    t.wal_status or "",
                    t.behind,
                    t.confirmed_lsn or "",
                    t.landed_lsn or "",
                    f"{t.changes:,}",
                    "" if fresh is None else f"{fresh:.1f}s",
                )
            )
        header = [
            "table",
            "slot",
            "active",
            "wal",
            "behind",
            "confirmed LSN",
            "landed LSN",
            "changes",
            "since last change",
        ]
        sys.stdout.write(render(QueryResult(header, rows)))
        return 0
    from stream.run import run_stream

    run_stream(
        settings,
        storage,
        promote=promote,
        progress=lambda line: log.event("stream", line),
        report=lambda line, fields: log.event(
            "stream.progress", line, **cast(dict[str, Any], fields)
        ),
    )
    return 0


def _lsn(value: int | None) -> str:
    from stream.pgoutput import format_lsn

    return format_lsn(value) if value else "-"
