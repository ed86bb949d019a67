"""`lakehouse stream teardown` hands bronze back to batch extraction: nothing lost or doubled."""

from __future__ import annotations

import polars as pl
import psycopg
import pytest
from psycopg import sql

from lakehouse.settings import Settings
from stream import setup
from tests.conftest import env_for
from tests.helpers import churn, read, seeded
from tests.stream.helpers import stream_settings, stream_while
from tests.test_cli import run_cli
from tests.test_ops import lakehouse
from tests.zones.test_silver import assert_same_rows, expected


@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_after_a_teardown_batch_runs_take_over_and_add_nothing_twice(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """README, *Streaming changes*: teardown drops the slots and publications and batch
    extraction takes over; a batch bringing back a version silver already holds (the
    stream's) adds nothing. Checked as a user meets it: `stream teardown`, a change, then
    `lakehouse run`."""
    settings = stream_settings(settings)
    storage = seeded(settings, rows=40)
    setup.setup(settings, storage)
    stream_while(settings, storage, lambda: churn(settings, changes=60, seed_value=5), promote=True)
    history = {
        t: read(storage, "silver", f"{t}_history") for t in ("applicants", "loan_applications")
    }
    env = env_for(settings)

    code, out, err = run_cli(monkeypatch, capsys, env, "stream", "teardown")
    assert code == 0, err
    prefix = f"lakehouse_{settings.pg_schema}"
    assert out == (
        f"dropped slots {prefix}_applicants, {prefix}_loan_applications; "
        "batch extraction feeds bronze again\n"
    )
    dsn = settings.pg_dsn.get()
    with psycopg.connect(dsn, autocommit=True) as conn:
        for catalog, column in (
            ("pg_replication_slots", "slot_name"),
            ("pg_publication", "pubname"),
        ):
            left = conn.execute(
                sql.SQL("SELECT count(*) FROM {} WHERE {} LIKE %s").format(
                    sql.Identifier(catalog), sql.Identifier(column)
                ),
                (f"{prefix}%",),
            ).fetchone()
            assert left == (0,), catalog
        # After the teardown: one valid applicant changes, one application is withdrawn.
        s = sql.Identifier(settings.pg_schema)
        (person,) = conn.execute(
            sql.SQL(
                "UPDATE {s}.applicants SET credit_score = CASE WHEN credit_score < 800 "
                "THEN credit_score + 1 ELSE credit_score - 1 END WHERE applicant_id = "
                "(SELECT min(applicant_id) FROM {s}.applicants WHERE person_age BETWEEN 25 "
                "AND 60) RETURNING applicant_id"
            ).format(s=s)
        ).fetchone()  # type: ignore[misc]
        (loan,) = conn.execute(
            sql.SQL(
                "DELETE FROM {s}.loan_applications WHERE application_id = "
                "(SELECT max(application_id) FROM {s}.loan_applications) RETURNING application_id"
            ).format(s=s)
        ).fetchone()  # type: ignore[misc]

    # Its own process, as a user runs it (the tasks cache their settings per process).
    run = lakehouse(settings, "run", "--no-ml")
    assert run.returncode == 0, run.stderr[-3000:]
    applicants, loans = expected(settings)
    assert person in applicants["applicant_id"].to_list()
    assert loan not in loans["application_id"].to_list()
    assert_same_rows(read(storage, "silver", "applicants"), applicants, "applicant_id")
    assert_same_rows(read(storage, "silver", "loan_applications"), loans, "application_id")
    # Every key the teardown did not touch has the history the stream gave it, row for row:
    # the batch re-read of what the stream had landed added no version.
    for table, key, changed in (
        ("applicants", "applicant_id", person),
        ("loan_applications", "application_id", loan),
    ):
        after = read(storage, "silver", f"{table}_history")
        order = [key, "valid_from"]
        untouched = pl.col(key) != changed
        assert (
            after.filter(untouched).sort(order).equals(history[table].filter(untouched).sort(order))
        ), table
    versions = read(storage, "silver", "applicants_history").filter(
        pl.col("applicant_id") == person
    )
    before = history["applicants"].filter(pl.col("applicant_id") == person)
    assert versions.height == before.height + 1
    assert versions.filter(pl.col("is_current")).height == 1
