"""Run the CDC dataflow in this process (what `lakehouse stream` does)."""

from __future__ import annotations

from collections.abc import Callable

from bytewax.testing import run_main

from lakehouse.errors import LakehouseError
from lakehouse.settings import Settings
from lakehouse.source.schema import TABLES, connect
from lakehouse.storage import Storage
from stream import cdc
from stream.changes import slot_name
from stream.liveness import Heartbeat, heartbeat_path
from stream.replication import StreamError
from stream.setup import check_wal_level, slot_info


def check_ready(settings: Settings) -> None:
    """Fail with the fix when the slots are missing or the server cannot decode."""
    with connect(settings, autocommit=True) as conn:
        check_wal_level(conn)
        missing = [
            slot_name(settings.pg_schema, t)
            for t in TABLES
            if slot_info(conn, slot_name(settings.pg_schema, t)) is None
        ]
    if missing:
        msg = (
            f"replication slot {missing[0]} does not exist; run `lakehouse stream setup` "
            "first (it also takes the snapshot the stream continues from)"
        )
        raise StreamError(msg)


def root_cause(exc: BaseException) -> LakehouseError | None:
    """Find our own error inside the exception Bytewax wraps it in, if there is one."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, LakehouseError):
            return current
        todo.extend([current.__cause__, current.__context__])
    return None


def run_stream(
    settings: Settings,
    storage: Storage,
    *,
    promote: bool = False,
    progress: Callable[[str], None] = print,
    report: Callable[[str, dict[str, object]], None] | None = None,
    report_every: float = 5.0,
) -> None:
    """Stream until SIGTERM or Ctrl-C; what is held when it stops is landed first."""
    check_ready(settings)
    cdc.install_signal_handlers()
    cdc.STOP.clear()
    cdc.SIGNALLED.clear()
    cdc.FAILURES.clear()
    cdc.CAPTURE.set()
    progress(
        f"streaming {', '.join(TABLES)} into bronze"
        + (" and silver" if promote else "")
        + f" at {storage.root}; stop with Ctrl-C or SIGTERM"
    )
    heartbeat = Heartbeat(heartbeat_path(settings))
    cdc.MONITOR = cdc.Monitor(every=report_every, report=report, heartbeat=heartbeat)
    flow = cdc.build_flow(settings, promote=promote)
    try:
        run_main(flow)
    except Exception as exc:
        cause = root_cause(exc)
        if cause is not None:
            raise cause from None
        raise
    finally:
        cdc.CAPTURE.clear()
        heartbeat.stop()
    if cdc.FAILURES:
        raise cdc.FAILURES[0]
    total = sum(cdc.MONITOR.total.values())
    progress(f"stopped; every change received was landed ({total:,} since start)")
