"""`lakehouse db`, `seed` and `simulate`: the source database."""

from __future__ import annotations

import argparse
import secrets
from typing import Any

from lakehouse import log
from lakehouse.errors import UsageError
from lakehouse.settings import Settings


def db(settings: Settings, args: argparse.Namespace) -> int:
    """Start, stop or locate the embedded Postgres, or check the configured server."""
    from lakehouse.source import schema
    from lakehouse.source.embedded import EmbeddedPostgres, server_info

    action = args.action
    if not settings.embedded_pg:
        if action in ("start", "stop"):
            log.event(
                "db.external",
                f"LAKEHOUSE_PG_DSN is set: `db {action}` manages only the embedded cluster; "
                "checking the configured server instead",
                action=action,
            )
        if action == "url":
            # The one place a password is shown, on request: printed as it is, not logged.
            print(settings.pg_dsn.get() if args.show_password else "(LAKEHOUSE_PG_DSN is set)")
            return 0
        return _check_server(settings)
    pg = EmbeddedPostgres(settings)
    if action == "start":
        started = pg.start()
        state = "started" if started else "already running"
        log.event(
            "db.start",
            f"{state}: {pg.public_url()} (data in {pg.data})",
            state=state,
            url=pg.public_url(),
            data=str(pg.data),
        )
        return 0
    if action == "stop":
        stopped = pg.stop()
        log.event("db.stop", "stopped" if stopped else "not running", stopped=stopped)
        return 0
    if action == "url":
        print(pg.dsn() if args.show_password else pg.public_url())
        return 0
    if not pg.is_running():
        log.event(
            "db.status",
            f"not running (data in {pg.data}); start it with `lakehouse db start`",
            running=False,
            data=str(pg.data),
        )
        return 1
    with schema.connect(settings, autocommit=True) as conn:
        info = server_info(conn)
    log.event(
        "db.status",
        f"running: {pg.public_url()}, PostgreSQL {info['version']}, "
        f"wal_level={info['wal_level']} (data in {pg.data})",
        running=True,
        url=pg.public_url(),
        version=info["version"],
        wal_level=info["wal_level"],
        data=str(pg.data),
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
    log.event(
        "db.status",
        f"reachable: PostgreSQL {info['version']} as `{info['user']}`, wal_level=logical",
        running=True,
        version=info["version"],
        user=info["user"],
        wal_level="logical",
    )
    return 0


def seed(settings: Settings, args: argparse.Namespace) -> int:
    """Create the lending schema and load the dataset."""
    from lakehouse.source import schema
    from lakehouse.source.seed import seed as load

    with schema.connect(settings) as conn:
        result = load(
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


def simulate(settings: Settings, args: argparse.Namespace) -> int:
    """Write a realistic change stream to the source."""
    from lakehouse.service import StopSignal
    from lakehouse.source import schema
    from lakehouse.source.simulate import simulate as write_changes

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
    # one is given (the flag, or LAKEHOUSE_SEED).
    mix = args.seed
    if mix is None:
        mix = secrets.randbelow(2**31) if settings.seed is None else settings.seed
    with schema.connect(settings, autocommit=True) as conn, StopSignal() as stop:
        if not schema.schema_exists(conn, settings.pg_schema):
            msg = f"schema `{settings.pg_schema}` has no lending tables; run `lakehouse seed`"
            raise UsageError(msg)
        sim = write_changes(
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
