import re
import time

import polars as pl
import psycopg
import pytest

from lakehouse.errors import UsageError
from lakehouse.settings import Settings
from lakehouse.source import schema, seed
from lakehouse.source.simulate import simulate
from tests.helpers import source_frame


def count(settings: Settings, table: str) -> int:
    with psycopg.connect(settings.pg_dsn.get()) as conn:
        return schema.count_rows(conn, settings.pg_schema, table)


def test_seed_loads_the_whole_dataset(base_settings: Settings) -> None:
    with schema.connect(base_settings) as conn:
        result = seed.seed(conn, base_settings.pg_schema)
        conn.commit()
    assert (result.applicants, result.applications, result.skipped) == (45_000, 45_000, False)
    assert count(base_settings, "applicants") == 45_000
    assert count(base_settings, "loan_applications") == 45_000
    data = seed.load_dataset()
    src = source_frame(
        base_settings,
        f"SELECT a.person_age, a.person_income, a.credit_score, l.loan_amnt, l.loan_status, "
        f'l.applied_at, a.updated_at AS profile_at FROM "{base_settings.pg_schema}".applicants a '
        f'JOIN "{base_settings.pg_schema}".loan_applications l USING (applicant_id) '
        "ORDER BY applicant_id",
    )
    assert src["credit_score"].to_list() == data["credit_score"].to_list()
    assert src["loan_status"].to_list() == data["loan_status"].to_list()
    assert src["person_income"].to_list() == data["person_income"].to_list()
    # applied_at spread over the past year; the profile comes before the application.
    span = src["applied_at"].max() - src["applied_at"].min()
    assert 360 <= span.days <= 365
    assert (src["profile_at"] <= src["applied_at"]).all()


def test_seed_is_reproducible_and_scales_from_the_distributions() -> None:
    a1, l1 = seed.synthesize(60_000, seed=3)
    a2, l2 = seed.synthesize(60_000, seed=3)
    assert a1.drop("created_at", "updated_at").equals(a2.drop("created_at", "updated_at"))
    assert l1.drop("applied_at", "updated_at").equals(l2.drop("applied_at", "updated_at"))
    data = seed.load_dataset()
    extra = l1.slice(45_000)
    assert extra.height == 15_000
    assert extra["loan_amnt"].is_between(500, 35_000).all()
    assert extra["loan_int_rate"].is_between(5.42, 20.0).all()
    assert set(extra["loan_intent"]) == set(data["loan_intent"])
    # The label keeps its dependence on prior defaults (drawn as whole rows).
    joined = (
        a1.slice(45_000)
        .select("previous_loan_defaults_on_file")
        .hstack(extra.select("loan_status"))
    )
    assert (
        joined.filter(pl.col("previous_loan_defaults_on_file") == "Yes")["loan_status"].max() == 0
    )
    approval = extra["loan_status"].mean()
    assert approval is not None and abs(approval - 10_000 / 45_000) < 0.02


def test_seed_skips_a_seeded_source_and_reset_reloads(base_settings: Settings) -> None:
    with schema.connect(base_settings) as conn:
        seed.seed(conn, base_settings.pg_schema, rows=100)
        again = seed.seed(conn, base_settings.pg_schema, rows=500)
        assert again.skipped and again.applicants == 100
        reset = seed.seed(conn, base_settings.pg_schema, rows=50, reset=True)
        conn.commit()
    assert not reset.skipped
    assert count(base_settings, "applicants") == 50


def test_bad_row_counts() -> None:
    with pytest.raises(UsageError, match=re.escape("--rows is 0; give a whole number from 1 to")):
        seed.synthesize(0, seed=1)


def test_simulate_writes_every_kind_of_change(base_settings: Settings) -> None:
    with schema.connect(base_settings) as conn:
        seed.seed(conn, base_settings.pg_schema, rows=200)
        conn.commit()
    with schema.connect(base_settings, autocommit=True) as conn:
        result = simulate(conn, base_settings.pg_schema, changes=500, batch_size=50)
    assert set(result.counts) == {
        "new_applicant",
        "new_application",
        "returning_application",
        "decision",
        "applicant_update",
        "withdrawal",
    }
    assert all(v > 0 for v in result.counts.values())
    assert result.transactions == 10
    s = f'"{base_settings.pg_schema}"'
    assert count(base_settings, "applicants") == 200 + result.counts["new_applicant"]
    assert count(base_settings, "loan_applications") == (
        200
        + result.counts["new_application"]
        + result.counts["returning_application"]
        - result.counts["withdrawal"]
    )
    tombstones = source_frame(base_settings, f"SELECT count(*) AS n FROM {s}.deleted_rows")
    assert tombstones["n"][0] == result.counts["withdrawal"]
    # Every update re-stamped updated_at; returning applicants have several applications.
    multi = source_frame(
        base_settings,
        f"SELECT applicant_id FROM {s}.loan_applications GROUP BY 1 HAVING count(*) > 1",
    )
    assert multi.height > 0


def test_simulate_by_rate(base_settings: Settings) -> None:
    """At a rate, for a duration: it runs that long, never writes faster than the rate
    (batches of a tenth of a second's changes, each due at its tick), and what it reports
    is what the source holds. How much a slow machine manages is not checked here."""
    with schema.connect(base_settings) as conn:
        seed.seed(conn, base_settings.pg_schema, rows=50)
        conn.commit()
    with schema.connect(base_settings, autocommit=True) as conn:
        start = time.monotonic()
        result = simulate(conn, base_settings.pg_schema, rate=200, duration=1.0)
        elapsed = time.monotonic() - start
    assert elapsed >= 1.0
    assert result.transactions >= 1 and result.changes > 0
    assert result.changes <= 200 * elapsed + 20, (result.changes, elapsed)
    assert count(base_settings, "applicants") == 50 + result.counts["new_applicant"]
    assert count(base_settings, "loan_applications") == (
        50
        + result.counts["new_application"]
        + result.counts["returning_application"]
        - result.counts["withdrawal"]
    )
