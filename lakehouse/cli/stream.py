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
    if args.max_age is not None and action != "alive":
        msg = "--max-age goes with `lakehouse stream alive`"
        raise UsageError(msg)
    if action == "alive":
        return _alive(settings, args.max_age)
    from lakehouse.storage import Storage

    try:
        from stream import setup as stream_setup
    except ImportError as exc:  # bytewax has no wheel for this Python
        msg = f"the stream needs bytewax, which cannot be imported ({exc}); use Python 3.11/3.12"
        raise UsageError(msg) from None
    if action == "run":
        from stream.liveness import Heartbeat, heartbeat_path

        # A heartbeat left by a killed stream (SIGKILL, a lost node) must not pass this
        # one's probe before it has turned once.
        Heartbeat(heartbeat_path(settings)).stop()
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


def _alive(settings: Settings, max_age: float | None) -> int:
    """Exit 0 when the stream of this home and schema has turned recently, 1 if not.

    Cheap on purpose (no bytewax, no network): a probe runs it every few seconds.
    """
    from stream import liveness

    limit = liveness.MAX_AGE_SECONDS if max_age is None else max_age
    pulse = liveness.pulse(settings)
    if pulse is None:
        sys.stderr.write(
            f"stream not alive: no heartbeat at {liveness.heartbeat_path(settings)} "
            "(not started, still setting up, or stopped)\n"
        )
        return 1
    restart = "restart it, it resumes from the last landed change"
    if pulse.age > limit:
        sys.stderr.write(
            f"stream not alive: last turn {pulse.age:.0f}s ago, limit {limit:.0f}s; it is "
            f"stuck (see its log): {restart}\n"
        )
        return 1
    # One promotion may rightly take longer than a turn (a backlog after downtime is
    # merged at once), and a restart would start it over: five times the limit.
    busy_limit = 5 * limit
    if pulse.busy_for is not None and pulse.busy_for > busy_limit:
        sys.stderr.write(
            f"stream not alive: one promotion into silver or online refresh has run for "
            f"{pulse.busy_for:.0f}s, limit {busy_limit:.0f}s; it is stuck (see its log): "
            f"{restart}\n"
        )
        return 1
    sys.stdout.write(f"stream alive: last turn {pulse.age:.1f}s ago\n")
    return 0


def _lsn(value: int | None) -> str:
    from stream.pgoutput import format_lsn

    return format_lsn(value) if value else "-"
