"""The `lakehouse` command line: one line per error, non-zero exit, tracebacks with --debug."""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
from collections.abc import Sequence
from typing import Any, cast

from lakehouse import environment, log
from lakehouse.errors import LakehouseError, UsageError, described
from lakehouse.settings import Settings


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        msg = f"`{text}` is not a whole number"
        raise argparse.ArgumentTypeError(msg) from None
    if value < 1:
        msg = f"`{text}` must be at least 1"
        raise argparse.ArgumentTypeError(msg)
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        msg = f"`{text}` is not a number"
        raise argparse.ArgumentTypeError(msg) from None
    if value <= 0:
        msg = f"`{text}` must be above 0"
        raise argparse.ArgumentTypeError(msg)
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        msg = f"{self.prog}: {message}"
        raise UsageError(msg)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser."""
    parser = _Parser(
        prog="lakehouse",
        description="A single-node lakehouse for ML: Postgres -> Delta bronze/silver/gold.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and Luigi logs")
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="text lines, or one JSON object per event (default LAKEHOUSE_LOG_FORMAT, text)",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("demo", help="start Postgres, seed, run the pipeline, print a summary")
    p.add_argument(
        "--rows", type=_positive_int, default=45_000, help="rows to seed (default 45,000)"
    )
    p.add_argument("--workers", type=_positive_int, default=1, help="Luigi workers")

    p = sub.add_parser("db", help="the embedded Postgres (or check the configured one)")
    p.add_argument("action", choices=["start", "stop", "status", "url"])
    p.add_argument("--show-password", action="store_true", help="with `url`: include it")

    p = sub.add_parser("seed", help="create the lending schema and load the dataset")
    p.add_argument(
        "--rows",
        type=_positive_int,
        default=45_000,
        help="rows to load; above 45,000 they are drawn from the dataset",
    )
    p.add_argument("--reset", action="store_true", help="drop and reload the source schema")

    p = sub.add_parser("simulate", help="write a realistic change stream to the source")
    p.add_argument(
        "--changes",
        type=_positive_int,
        help="how many changes (default 1,000); a new customer's first application also "
        "inserts the applicant",
    )
    p.add_argument(
        "--rate",
        type=_positive_float,
        help="changes per second, for --duration seconds or until SIGTERM/Ctrl-C",
    )
    p.add_argument("--duration", type=_positive_float, help="seconds to run at --rate")
    p.add_argument(
        "--batch-size", type=_positive_int, default=100, help="changes per source transaction"
    )
    p.add_argument(
        "--seed",
        type=int,
        help="repeat a run's mix of changes (default: a new one each call, or LAKEHOUSE_SEED; "
        "the seed used is printed)",
    )

    p = sub.add_parser("run", help="run the Luigi pipeline (bronze, silver, gold, features, model)")
    p.add_argument("--workers", type=_positive_int, default=1)
    p.add_argument("--no-ml", action="store_true", help="stop at gold (no Feast, no training)")
    p.add_argument("--scheduler-host", help="use a luigid central scheduler at this host")
    p.add_argument("--scheduler-port", type=_positive_int, default=8082)
    p.add_argument(
        "--every",
        type=_positive_float,
        metavar="SECONDS",
        help="run again every SECONDS until SIGTERM/Ctrl-C (a failed run is retried)",
    )

    p = sub.add_parser("sql", help="run a read-only DuckDB query over bronze/silver/gold")
    p.add_argument("query")
    p.add_argument(
        "--format",
        choices=["table", "csv", "json"],
        default="table",
        help="table (aligned), csv, or json: JSON Lines, one object per row",
    )
    p.add_argument("--as-of-version", type=int, help="time travel: read version N of each table")
    p.add_argument(
        "--max-rows",
        type=_positive_int,
        default=100,
        help="rows fetched and shown in table format (default 100); csv and json stream all",
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SECONDS",
        help="stop the query after SECONDS (default: no limit); Ctrl-C stops it too",
    )

    sub.add_parser("tables", help="list tables with version, rows, size and last update")

    p = sub.add_parser(
        "verify",
        help="compare silver with the source (keys and a checksum per column); --repair fixes",
    )
    p.add_argument("--table", choices=["applicants", "loan_applications"], help="one table only")
    p.add_argument(
        "--repair", action="store_true", help="re-read the differing keys from the source"
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for the stream to land up to the comparison point (default 60)",
    )

    p = sub.add_parser(
        "status", help="tables and their freshness, the CDC slots, the last pipeline runs, model"
    )
    p.add_argument("--format", choices=["table", "json"], default="table")

    p = sub.add_parser(
        "stream", help="CDC: stream source changes into bronze (setup|run|status|teardown)"
    )
    p.add_argument(
        "action",
        nargs="?",
        default="run",
        choices=["run", "setup", "status", "teardown"],
        help="run (default): stream until SIGTERM/Ctrl-C; setup: publications, slots and "
        "the aligned snapshot; status: slot lag and freshness; teardown: drop them",
    )
    p.add_argument(
        "--promote", action="store_true", help="with run: also merge each micro-batch into silver"
    )
    p.add_argument(
        "--setup",
        action="store_true",
        help="with run: first set up the slots and snapshot if they are missing",
    )

    p = sub.add_parser("features", help="Feast: register the repository, or materialize")
    p.add_argument("action", choices=["apply", "materialize"])

    sub.add_parser("train", help="train, evaluate and register a loan-approval model")
    sub.add_parser("models", help="list registered model versions with their metrics")

    p = sub.add_parser("serve", help="the prediction API (FastAPI + uvicorn)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_positive_int, default=8000)
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="server processes (each loads the model and opens the online store)",
    )

    p = sub.add_parser("maintain", help="compact, checkpoint and vacuum every table")
    p.add_argument(
        "--retention-hours",
        type=int,
        help="time travel to keep (default LAKEHOUSE_VACUUM_RETENTION_HOURS)",
    )
    p.add_argument(
        "--every",
        type=_positive_float,
        metavar="SECONDS",
        help="maintain again every SECONDS until SIGTERM/Ctrl-C",
    )
    # The global options are accepted after the command too (`lakehouse run --debug`).
    for command_parser in sub.choices.values():
        command_parser.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
        command_parser.add_argument(
            "--log-format",
            choices=["text", "json"],
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
        )
    return parser


def _requested_format(args_list: list[str]) -> str:
    """Find the log format before parsing, so that even a usage error is logged in it."""
    for i, arg in enumerate(args_list):
        if arg == "--log-format" and i + 1 < len(args_list):
            return args_list[i + 1]
        if arg.startswith("--log-format="):
            return arg.split("=", 1)[1]
    return os.environ.get("LAKEHOUSE_LOG_FORMAT", "text")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args_list
    fmt = _requested_format(args_list)
    log.configure(fmt if fmt in log.FORMATS else "text")
    try:
        args = build_parser().parse_args(args_list)
        settings = Settings.from_env()
        log.configure(args.log_format or settings.log_format, settings)
        # Before any work starts a native thread that reads the environment (see there).
        environment.export_for_feast(settings)
        return _dispatch(args, settings)
    except LakehouseError as exc:
        if debug:
            raise
        log.event("error", f"error: {exc}", level="error", error=str(exc), kind=type(exc).__name__)
        return exc.exit_code
    except KeyboardInterrupt:
        log.event("interrupted", "interrupted", level="error")
        return 130


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    command = args.command
    if command == "demo":
        from lakehouse.demo import demo

        demo(settings, rows=args.rows, workers=args.workers, debug=args.debug)
        return 0
    if command == "db":
        return _db(settings, args.action, show_password=args.show_password)
    if command == "seed":
        from lakehouse.source import schema
        from lakehouse.source.seed import seed

        with schema.connect(settings) as conn:
            result = seed(
                conn,
                settings.pg_schema,
                rows=args.rows,
                seed=settings.repeatable_seed,
                reset=args.reset,
            )
            conn.commit()
        if result.skipped:
            log.event(
                "seed.skipped",
                f"source already holds {result.applicants:,} applicants; nothing loaded "
                "(use --reset to drop and reload it)",
                applicants=result.applicants,
            )
        else:
            log.event(
                "seed.done",
                f"seeded {result.applicants:,} applicants and {result.applications:,} "
                f"applications into schema `{settings.pg_schema}`",
                applicants=result.applicants,
                applications=result.applications,
                schema=settings.pg_schema,
            )
        return 0
    if command == "simulate":
        from lakehouse.service import StopSignal
        from lakehouse.source import schema
        from lakehouse.source.simulate import simulate

        if args.duration is not None and args.rate is None:
            msg = "--duration needs --rate: give the changes per second too"
            raise UsageError(msg)
        if args.rate is not None and args.changes is not None:
            msg = "give either --changes or --rate (with or without --duration), not both"
            raise UsageError(msg)

        def report(sim: Any) -> None:
            log.event(
                "simulate.progress",
                f"wrote {sim.changes:,} changes ({sim.total:,} rows) in "
                f"{sim.transactions:,} transactions ({sim.seconds:.0f}s so far)",
                changes=sim.changes,
                rows=sim.total,
                transactions=sim.transactions,
                by_kind=dict(sim.counts),
            )

        # The same seed on every call would write the same changes again: vary it unless
        # one is given (the flag, or LAKEHOUSE_SEED set on purpose).
        mix = args.seed
        if mix is None:
            mix = secrets.randbelow(2**31) if settings.seed is None else settings.seed
        with schema.connect(settings, autocommit=True) as conn, StopSignal() as stop:
            if not schema.schema_exists(conn, settings.pg_schema):
                msg = f"schema `{settings.pg_schema}` has no lending tables; run `lakehouse seed`"
                raise UsageError(msg)
            sim = simulate(
                conn,
                settings.pg_schema,
                changes=args.changes,
                rate=args.rate,
                duration=args.duration,
                batch_size=args.batch_size,
                seed=mix,
                stop=stop.event,
                report=report,
            )
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(sim.counts.items()))
        log.event(
            "simulate.done",
            f"wrote {sim.changes:,} changes ({sim.total:,} rows: a new customer's first "
            f"application inserts the customer too) in {sim.transactions:,} transactions "
            f"({sim.seconds:.1f}s, seed {mix}): {kinds}",
            seed=mix,
            changes=sim.changes,
            rows=sim.total,
            transactions=sim.transactions,
            seconds=round(sim.seconds, 3),
            by_kind=dict(sim.counts),
        )
        return 0
    if command == "run":
        return _run(settings, args)
    if command == "sql":
        from lakehouse import sql
        from lakehouse.storage import Storage

        storage = Storage.from_settings(settings)
        storage.check()
        if args.format == "table":
            answer = sql.run_query(
                settings,
                storage,
                args.query,
                as_of_version=args.as_of_version,
                max_rows=args.max_rows,
                timeout=args.timeout,
            )
            sys.stdout.write(sql.render(answer))
        else:
            sql.export_query(
                settings,
                storage,
                args.query,
                args.format,
                sys.stdout,
                as_of_version=args.as_of_version,
                timeout=args.timeout,
            )
        return 0
    if command == "tables":
        from lakehouse import catalog
        from lakehouse.sql import QueryResult, render
        from lakehouse.storage import Storage

        storage = Storage.from_settings(settings)
        storage.check()
        infos = catalog.describe(storage, meta=True)
        rows = [
            (
                f"{i.zone}.{i.name}",
                i.version,
                i.rows,
                i.files,
                catalog.human_size(i.size_bytes),
                i.last_update.strftime("%Y-%m-%d %H:%M:%S UTC") if i.last_update else "",
            )
            for i in infos
        ]
        sys.stdout.write(
            render(QueryResult(["table", "version", "rows", "files", "size", "last update"], rows))
        )
        return 0
    if command == "stream":
        return _stream(settings, args.action, promote=args.promote, setup=args.setup)
    if command == "verify":
        return _verify(settings, args)
    if command in ("features", "train", "models", "serve"):
        return _ml(settings, args)
    if command == "maintain":
        return _maintain(settings, args)
    if command == "status":
        return _status(settings, args.format)
    msg = f"unknown command `{command}`"
    raise UsageError(msg)


def _run(settings: Settings, args: argparse.Namespace) -> int:
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


def _verify(settings: Settings, args: argparse.Namespace) -> int:
    from lakehouse.storage import Storage
    from lakehouse.verify import verify

    storage = Storage.from_settings(settings)
    storage.check()
    tables = [args.table] if args.table else None
    results = verify(settings, storage, tables, repair=args.repair, timeout=args.timeout)
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


def _maintain(settings: Settings, args: argparse.Namespace) -> int:
    from lakehouse.maintain import maintain
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
            results = maintain(storage, retention_hours=hours)
            if not results:
                log.event("maintain.empty", "no tables yet; run `lakehouse run`")
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


def _status(settings: Settings, fmt: str) -> int:
    import json

    from lakehouse import status
    from lakehouse.storage import Storage

    storage = Storage.from_settings(settings)
    storage.check(create_bucket=False)
    state = status.collect(settings, storage)
    if fmt == "json":
        text = json.dumps(state.to_dict(), default=_json_default, indent=2) + "\n"
    else:
        text = status.render(state)
    sys.stdout.write(log.redact(text))
    return 0


def _json_default(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def _stream(settings: Settings, action: str, *, promote: bool, setup: bool = False) -> int:
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


def _ml(settings: Settings, args: argparse.Namespace) -> int:
    from lakehouse import features
    from lakehouse.storage import Storage

    features.check_repo_is_shipped()
    storage = Storage.from_settings(settings)
    storage.check()
    try:
        return _ml_command(settings, storage, args)
    except LakehouseError:
        raise
    except Exception as exc:  # Feast, the online store, scikit-learn: one line, no traceback
        if args.debug:
            raise
        msg = (
            f"`lakehouse {args.command}` failed: {described(exc)}; "
            "rerun with --debug for the traceback"
        )
        raise LakehouseError(msg) from None


def _ml_command(settings: Settings, storage: Any, args: argparse.Namespace) -> int:
    from lakehouse import ml_tasks, models

    if args.command == "features" and args.action == "apply":
        names = ml_tasks.apply(settings, storage)
        print(f"registered {len(names)} Feast objects: {', '.join(names)}")
    elif args.command == "features":
        end = ml_tasks.materialize(settings, storage)
        print(f"online store holds feature values up to {end:%Y-%m-%d %H:%M:%S} UTC")
    elif args.command == "train":
        result = ml_tasks.train(settings, storage)
        print(f"model {models.MODEL} version {result.version}")
        print(models.summary(result.metrics))
    elif args.command == "models":
        entries = models.describe(storage)
        if not entries:
            print("no model yet; run `lakehouse train`")
        for entry in entries:
            print(f"{entry['version']}  {models.summary(entry['metrics'])}")
    else:
        import uvicorn

        from lakehouse.serve import create_app

        # One process builds the app here (errors surface before serving); several run
        # uvicorn's factory in each worker process, from the same environment.
        app: Any = create_app(settings) if args.workers == 1 else "lakehouse.serve:app_from_env"
        log.event(
            "serve.start",
            f"serving the prediction API on http://{args.host}:{args.port} with "
            f"{args.workers} worker(s) (docs at /docs)",
            host=args.host,
            port=args.port,
            workers=args.workers,
        )
        # In JSON, uvicorn's records go through the root logger's JSON handler.
        log_config = None if log.is_json() else uvicorn.config.LOGGING_CONFIG
        # uvicorn drains, restores the handlers it found, then raises the signal again:
        # with these, that lands here and `serve` exits 0 like the other services.
        for stop_signal in (signal.SIGTERM, signal.SIGINT):
            signal.signal(stop_signal, lambda *_: None)
        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            workers=args.workers,
            factory=args.workers > 1,
            log_level="warning",
            log_config=log_config,
        )
    return 0


def _lsn(value: int | None) -> str:
    from stream.pgoutput import format_lsn

    return format_lsn(value) if value else "-"


def _db(settings: Settings, action: str, *, show_password: bool) -> int:
    from lakehouse.source import schema
    from lakehouse.source.embedded import EmbeddedPostgres, server_info

    if not settings.embedded_pg:
        if action in ("start", "stop"):
            print(
                f"LAKEHOUSE_PG_DSN is set: `db {action}` manages only the embedded cluster; "
                "checking the configured server instead"
            )
        if action == "url":
            print(settings.pg_dsn.get() if show_password else "(LAKEHOUSE_PG_DSN is set)")
            return 0
        return _check_server(settings)
    pg = EmbeddedPostgres(settings)
    if action == "start":
        started = pg.start()
        print(
            f"{'started' if started else 'already running'}: {pg.public_url()} (data in {pg.data})"
        )
        return 0
    if action == "stop":
        print("stopped" if pg.stop() else "not running")
        return 0
    if action == "url":
        print(pg.dsn() if show_password else pg.public_url())
        return 0
    if not pg.is_running():
        print(f"not running (data in {pg.data}); start it with `lakehouse db start`")
        return 1
    with schema.connect(settings, autocommit=True) as conn:
        info = server_info(conn)
    print(
        f"running: {pg.public_url()}, PostgreSQL {info['version']}, "
        f"wal_level={info['wal_level']} (data in {pg.data})"
    )
    return 0


def _check_server(settings: Settings) -> int:
    from lakehouse.errors import SourceError
    from lakehouse.source import schema
    from lakehouse.source.embedded import server_info

    with schema.connect(settings, autocommit=True) as conn:
        info = server_info(conn)
    if info["wal_level"] != "logical":
        msg = (
            f"wal_level is `{info['wal_level']}`; logical replication (CDC) needs `logical`: "
            "set wal_level = logical in postgresql.conf and restart the server"
        )
        raise SourceError(msg)
    print(f"reachable: PostgreSQL {info['version']} as `{info['user']}`, wal_level=logical")
    return 0


if __name__ == "__main__":
    environment.private_files()
    sys.exit(main())
