"""Helpers shared by tests: seeding, running the pipeline, reading tables."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import polars as pl
import psycopg

from lakehouse.settings import Settings
from lakehouse.source import schema, seed, simulate
from lakehouse.storage import Storage
from lakehouse.transforms.gold import GOLD
from lakehouse.zones import bronze, gold, silver

TABLES = ("applicants", "loan_applications")

T = TypeVar("T")


def seeded(settings: Settings, rows: int = 300) -> Storage:
    """Seed the test's schema and return checked storage."""
    with schema.connect(settings) as conn:
        seed.seed(conn, settings.pg_schema, rows=rows, seed=settings.repeatable_seed)
        conn.commit()
    storage = Storage.from_settings(settings)
    storage.check()
    return storage


def run_all(
    settings: Settings, storage: Storage, *, with_gold: bool = True, full_gold: bool = False
) -> None:
    """Ingest, promote and (optionally) build gold, in dependency order.

    With `full_gold`, every gold table is built whole, never updated by touched entities.
    """
    for table in TABLES:
        bronze.ingest(settings, storage, table)
        silver.promote(storage, table)
    if with_gold:
        for name in GOLD:
            gold.build(settings, storage, name, incremental=not full_gold)


def churn(settings: Settings, changes: int = 200, seed_value: int = 7) -> None:
    """Write a burst of realistic changes to the source."""
    with schema.connect(settings, autocommit=True) as conn:
        simulate.simulate(conn, settings.pg_schema, changes=changes, batch_size=40, seed=seed_value)


def read(storage: Storage, zone: str, table: str) -> pl.DataFrame:
    """Read a whole Delta table."""
    return pl.read_delta(storage.uri(zone, table), storage_options=storage.options)


def source_frame(settings: Settings, query: str) -> pl.DataFrame:
    """Run a query against the source and return a frame."""
    with psycopg.connect(settings.pg_dsn.get()) as conn:
        conn.execute("SET TimeZone = 'UTC'")
        cur = conn.execute(query)
        cols = [d.name for d in cur.description or []]
        return pl.DataFrame(cur.fetchall(), schema=cols, orient="row", infer_schema_length=None)


def wait_until(check: Callable[[], T], timeout: float, what: str, *, every: float = 1.0) -> T:
    """Call `check` every `every` seconds until it returns something true; return that.

    Fails naming `what` after `timeout` seconds: tests wait on what they can observe,
    never on a sleep that a loaded machine may outlast.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def move_applications(settings: Settings, count: int) -> list[tuple[int, int]]:
    """Move `count` applications each to a neighbouring applicant (id - 1 or + 1: another
    key partition, for any number of them), with an income share that passes the rules.
    Return (application_id, new applicant_id) pairs."""
    from psycopg import sql

    s = sql.Identifier(settings.pg_schema)
    with psycopg.connect(settings.pg_dsn.get(), autocommit=True) as conn:
        rows = conn.execute(
            sql.SQL(
                "WITH pick AS (SELECT DISTINCT ON (la.application_id) la.application_id,"
                " a.applicant_id AS new_id, la.loan_amnt / a.person_income AS pct"
                " FROM {s}.loan_applications la JOIN {s}.applicants a"
                " ON a.applicant_id IN (la.applicant_id - 1, la.applicant_id + 1)"
                " AND a.person_income >= la.loan_amnt AND a.created_at <= la.applied_at"
                " ORDER BY la.application_id, a.applicant_id LIMIT {n})"
                " UPDATE {s}.loan_applications la SET applicant_id = pick.new_id,"
                " loan_percent_income = pick.pct, updated_at = now() FROM pick"
                " WHERE la.application_id = pick.application_id"
                " RETURNING la.application_id, la.applicant_id"
            ).format(s=s, n=sql.Literal(count))
        ).fetchall()
    return [(int(a), int(b)) for a, b in rows]


def insert_late_application(settings: Settings, loan_amnt: float = 1234.5) -> int:
    """Insert an application dated a day after the oldest customer became one (a backfill,
    long before any recent materialization window); return its id. Its share of income
    is consistent with the amount, so it passes the rules."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(settings.pg_dsn.get(), autocommit=True) as conn:
        row = conn.execute(
            sql.SQL(
                "INSERT INTO {s}.loan_applications (applicant_id, loan_amnt, loan_intent, "
                "loan_int_rate, loan_percent_income, applied_at) "
                "SELECT applicant_id, %(amount)s, 'EDUCATION', 10.5, "
                "round((%(amount)s / person_income)::numeric, 2), created_at + interval '1 day' "
                "FROM {s}.applicants WHERE person_age BETWEEN 18 AND 100 "
                "ORDER BY created_at LIMIT 1 RETURNING application_id"
            ).format(s=sql.Identifier(settings.pg_schema)),
            {"amount": loan_amnt},
        ).fetchone()
    assert row is not None
    return int(row[0])
