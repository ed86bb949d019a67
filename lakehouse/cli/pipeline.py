"""`lakehouse demo`, `run`, `verify` and `maintain`: the batch pipeline and its upkeep."""

from __future__ import annotations

import argparse

from lakehouse import log
from lakehouse.errors import LakehouseError, UsageError
from lakehouse.settings import Settings


def demo(settings: Settings, args: argparse.Namespace) -> int:
    """Start Postgres, seed, run the pipeline and print a summary."""
    from lakehouse.cli.demo import demo as run_demo

    run_demo(settings, rows=args.rows, workers=args.workers, debug=args.debug)
    return 0


def run(settings: Settings, args: argparse.Namespace) -> int:
    """`lakehouse run`: once, or every N seconds as a service; each run is recorded."""
    from lakehouse.pipeline import run_pipeline
    from lakehouse.service import repeat
    from lakehouse.storage import Storage

    storage = Storage.from_settings(settings)
    storage.check()

    def step() -> None:
        try:
            storage.check()
            run = run_pipeline(
                workers=args.workers,
                scheduler_host=args.scheduler_host,
                scheduler_port=args.scheduler_port,
                progress=lambda line: log.event("pipeline.task", line.strip()),
                debug=args.debug,
                ml=not args.no_ml,
                record=storage,
            )
        except LakehouseError as exc:
            if args.every is None:
                raise
            log.event(
                "pipeline.failed",
                f"error: {exc} (next try in {args.every:g}s)",
                level="error",
                error=str(exc),
            )
            return
        if run.ran or run.elsewhere:
            others = "; another worker ran the rest" if run.elsewhere else ""
            log.event(
                "pipeline.done",
                f"{len(run.ran)} tasks ran in {run.seconds:.1f}s{others}",
                tasks=run.ran,
                elsewhere=run.elsewhere,
                seconds=round(run.seconds, 3),
            )
        else:
            log.event(
                "pipeline.done",
                "nothing to do: bronze, silver and gold are up to date with the source",
                tasks=[],
                seconds=round(run.seconds, 3),
            )

    repeat(args.every, step)
    return 0


def verify(settings: Settings, args: argparse.Namespace) -> int:
    """Compare silver with the source; with --repair, rebuild the keys that differ."""
    from lakehouse.storage import Storage
    from lakehouse.verify import verify as compare

    storage = Storage.from_settings(settings)
    storage.check()
    tables = [args.table] if args.table else None
    results = compare(settings, storage, tables, repair=args.repair, timeout=args.timeout)
    for r in results:
        flight = f", {r.in_flight:,} in flight" if r.in_flight else ""
        repaired = f"; repaired {r.repaired:,} keys" if r.repaired else ""
        if r.ok:
            line = (
                f"silver.{r.table}: matches the source ({r.source_rows:,} rows compared"
                f"{flight}{repaired}) in {r.seconds:.1f}s"
            )
        else:
            line = (
                f"silver.{r.table}: {len(r.differences):,} keys differ from the source "
                f"({r.source_rows:,} rows compared{flight}{repaired})"
                + ("" if r.repaired else "; `lakehouse verify --repair` rebuilds them")
            )
        log.event(
            "verify.table",
            line,
            table=r.table,
            ok=r.ok,
            rows=r.source_rows,
            in_flight=r.in_flight,
            differences=len(r.differences),
            repaired=r.repaired,
        )
        for d in r.differences[:20]:
            log.event(
                "verify.difference",
                f"  {r.table} {d.key}: {d.problem}",
                table=r.table,
                key=d.key,
                problem=d.problem,
            )
        if len(r.differences) > 20:
            log.event("verify.more", f"  ... and {len(r.differences) - 20:,} more")
    return 0 if all(r.ok for r in results) else 1


def maintain(settings: Settings, args: argparse.Namespace) -> int:
    """Compact, checkpoint and vacuum every table, once or every N seconds."""
    from lakehouse.maintain import maintain as tidy
    from lakehouse.ml.monitor import inference_log
    from lakehouse.service import repeat
    from lakehouse.storage import Storage

    hours = (
        settings.vacuum_retention_hours if args.retention_hours is None else args.retention_hours
    )
    if hours < 0:
        msg = f"--retention-hours is {hours}; give 0 or more"
        raise UsageError(msg)
    storage = Storage.from_settings(settings)
    storage.check()

    def step() -> None:
        try:
            results = tidy(storage, retention_hours=hours)
            if not results:
                log.event("maintain.empty", "no tables yet; run `lakehouse run`")
            pruned = inference_log.prune(settings, hours)
            if pruned:
                log.event(
                    "maintain.serving",
                    f"removed the state of {pruned} ended prediction-log writer(s)",
                    writers=pruned,
                )
            for r in results:
                log.event(
                    "maintain.table",
                    f"{r.table}: compacted {r.files_removed} files into {r.files_added}, "
                    f"vacuumed {r.vacuumed} files, now version {r.version}",
                    table=r.table,
                    files_removed=r.files_removed,
                    files_added=r.files_added,
                    vacuumed=r.vacuumed,
                    version=r.version,
                )
        except LakehouseError as exc:
            if args.every is None:
                raise
            log.event(
                "maintain.failed",
                f"error: {exc} (next try in {args.every:g}s)",
                level="error",
                error=str(exc),
            )

    repeat(args.every, step)
    return 0
