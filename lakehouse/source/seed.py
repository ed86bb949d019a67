"""`lakehouse seed`: load the loan dataset (or millions of rows drawn from it) into the source."""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources

import numpy as np
import polars as pl
import psycopg
from psycopg import sql

from lakehouse.errors import UsageError
from lakehouse.source.schema import (
    APPLICANTS,
    LOAN_APPLICATIONS,
    count_rows,
    create_schema,
    drop_schema,
    ident,
)

DATASET_ROWS = 45_000
MAX_ROWS = 100_000_000
_COPY_CHUNK = 500_000
_TS_FORMAT = "%Y-%m-%d %H:%M:%S%.6f+00"


def load_dataset() -> pl.DataFrame:
    """Read the shipped Loan Approval Classification dataset (45,000 rows)."""
    path = resources.files("lakehouse") / "data" / "loan_data.csv"
    with resources.as_file(path) as csv:
        return pl.read_csv(csv)


def synthesize(
    rows: int, *, seed: int, now: datetime | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Build `rows` applicants and applications: the dataset's rows, then rows drawn from it.

    Rows beyond the dataset are whole dataset rows sampled with replacement, so the joint
    distribution (and the label's dependence on the features) is kept, with jitter on the
    continuous columns. `applied_at` is spread over the year before `now`; each applicant's
    `updated_at` comes up to 30 days before their application.
    """
    if rows < 1 or rows > MAX_ROWS:
        msg = f"--rows is {rows}; give a whole number from 1 to {MAX_ROWS:,}"
        raise UsageError(msg)
    rng = np.random.default_rng(seed)
    base = load_dataset()
    if rows <= DATASET_ROWS:
        data = base.head(rows)
    else:
        extra = rows - DATASET_ROWS
        picks = rng.integers(0, DATASET_ROWS, size=extra)
        drawn = base[picks]
        income = np.round(drawn["person_income"].to_numpy() * rng.lognormal(0.0, 0.1, extra), 0)
        amount = np.clip(
            np.round(drawn["loan_amnt"].to_numpy() * rng.lognormal(0.0, 0.1, extra) / 25) * 25,
            500,
            35_000,
        )
        rate = np.clip(
            np.round(drawn["loan_int_rate"].to_numpy() + rng.normal(0, 0.3, extra), 2), 5.42, 20.0
        )
        score = np.clip(drawn["credit_score"].to_numpy() + rng.integers(-15, 16, extra), 390, 850)
        drawn = drawn.with_columns(
            person_income=pl.Series(income),
            loan_amnt=pl.Series(amount),
            loan_int_rate=pl.Series(rate),
            loan_percent_income=pl.Series(np.round(amount / income, 2)),
            credit_score=pl.Series(score),
        )
        data = pl.concat([base, drawn.select(base.columns)], how="vertical_relaxed")
    now = now or datetime.now(UTC)
    year_us = int(timedelta(days=365).total_seconds() * 1e6)
    month_us = int(timedelta(days=30).total_seconds() * 1e6)
    now_us = int(now.timestamp() * 1e6)
    applied_us = now_us - rng.integers(0, year_us, size=rows)
    profile_us = applied_us - rng.integers(0, month_us, size=rows)
    ids = pl.Series(np.arange(1, rows + 1, dtype=np.int64))
    data = data.with_columns(
        applicant_id=ids,
        application_id=ids,
        applied_at=pl.Series(applied_us).cast(pl.Datetime("us", "UTC")),
        profile_at=pl.Series(profile_us).cast(pl.Datetime("us", "UTC")),
    )
    applicants = data.select(
        "applicant_id",
        pl.col("person_age").cast(pl.Int32),
        "person_gender",
        "person_education",
        "person_income",
        pl.col("person_emp_exp").cast(pl.Int32),
        "person_home_ownership",
        pl.col("cb_person_cred_hist_length").cast(pl.Int32),
        pl.col("credit_score").cast(pl.Int32),
        "previous_loan_defaults_on_file",
        pl.col("profile_at").alias("created_at"),
        pl.col("profile_at").alias("updated_at"),
    )
    applications = data.select(
        "application_id",
        "applicant_id",
        "loan_amnt",
        "loan_intent",
        "loan_int_rate",
        "loan_percent_income",
        pl.col("loan_status").cast(pl.Int16),
        "applied_at",
        pl.col("applied_at").alias("updated_at"),
    )
    return applicants, applications


@dataclass(frozen=True)
class SeedResult:
    """What `seed` did."""

    applicants: int
    applications: int
    skipped: bool


def seed(
    conn: psycopg.Connection,
    schema: str,
    *,
    rows: int = DATASET_ROWS,
    seed: int = 42,
    reset: bool = False,
) -> SeedResult:
    """Create the lending schema and load `rows` rows with COPY, in one transaction.

    A source that already holds rows is left alone (and reported) unless `reset` drops
    it first: seeded rows are back-dated, which only an empty lakehouse can take in.
    """
    applicants, applications = synthesize(rows, seed=seed)
    with conn.transaction():
        if reset:
            drop_schema(conn, schema)
        create_schema(conn, schema)
        existing = count_rows(conn, schema, "applicants")
        if existing:
            return SeedResult(existing, count_rows(conn, schema, "loan_applications"), True)
        for table, frame in ((APPLICANTS, applicants), (LOAN_APPLICATIONS, applications)):
            copy_frame(conn, schema, table.name, frame)
            conn.execute(
                sql.SQL("SELECT setval(pg_get_serial_sequence({}, {}), {})").format(
                    sql.Literal(f'"{schema}".{table.name}'),
                    sql.Literal(table.key),
                    sql.Literal(rows),
                )
            )
    return SeedResult(rows, rows, False)


def copy_frame(conn: psycopg.Connection, schema: str, table: str, frame: pl.DataFrame) -> None:
    """COPY a frame into `schema.table` as CSV, a chunk at a time."""
    columns = sql.SQL(", ").join(ident(c) for c in frame.columns)
    stmt = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(ident(schema, table), columns)
    with conn.cursor() as cur, cur.copy(stmt) as copy:
        for start in range(0, frame.height, _COPY_CHUNK):
            buf = io.BytesIO()
            frame.slice(start, _COPY_CHUNK).write_csv(
                buf, include_header=False, datetime_format=_TS_FORMAT
            )
            copy.write(buf.getvalue())
