"""The stream into silver: WAL order, key changes with TOAST, start-up, every valid value.

Issue 13, reproductions 2 to 5, each as the user met it, with `stream --promote`.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime

import polars as pl
import psycopg
import pytest
from psycopg import sql

from lakehouse.settings import Settings
from lakehouse.source import schema
from lakehouse.source.simulate import simulate
from lakehouse.storage import Storage
from lakehouse.zones import silver
from stream import setup
from tests.helpers import read, seeded
from tests.stream.helpers import stream_settings, stream_while
from tests.zones.test_silver import assert_same_rows, expected

APPLICANT = (
    "INSERT INTO {t} (applicant_id, person_age, person_gender, person_education, "
    "person_income, person_emp_exp, person_home_ownership, cb_person_cred_hist_length, "
    "credit_score, previous_loan_defaults_on_file{extra}) "
    "VALUES (%s, 30, %s, 'Master', 50000, 5, 'RENT', 4, 700, 'No'{values})"
)


def table(settings: Settings, name: str) -> sql.Composable:
    return sql.Identifier(settings.pg_schema, name)


def insert_applicant(
    conn: psycopg.Connection, settings: Settings, key: int, *, gender: str = "male", **extra: object
) -> None:
    cols = "".join(f", {c}" for c in extra)
    values = ", %s" * len(extra)
    conn.execute(
        sql.SQL(APPLICANT.format(t="{t}", extra=cols, values=values)).format(
            t=table(settings, "applicants")
        ),
        (key, gender, *extra.values()),
    )


def assert_history_is_ordered(storage: Storage, table_name: str, key: str) -> None:
    history = read(storage, "silver", f"{table_name}_history").sort(key, "valid_from")
    assert history.filter(pl.col("valid_to") <= pl.col("valid_from")).height == 0
    follows = history.with_columns(prev_to=pl.col("valid_to").shift(1).over(key))
    assert follows.filter(pl.col("prev_to") > pl.col("valid_from")).height == 0


# Local disk only (CI time): ordering is decided before storage; the S3 stream runs in the other
# tests here.
@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_order_is_the_wal_s_not_updated_at(settings: Settings) -> None:
    """Reproduction 2: a row dated 2030, then updated (stamped now): the update wins.

    (The 2030 version itself is rejected: a row cannot be updated in the future.)"""
    settings = stream_settings(settings)
    storage = seeded(settings, rows=50)
    setup.setup(settings, storage)

    def work() -> None:
        with schema.connect(settings, autocommit=True) as conn:
            insert_applicant(conn, settings, 777001, updated_at=datetime(2030, 1, 1, tzinfo=UTC))
            conn.execute(
                sql.SQL("UPDATE {} SET credit_score = 500 WHERE applicant_id = 777001").format(
                    table(settings, "applicants")
                )
            )

    stream_while(settings, storage, work, promote=True)
    current = read(storage, "silver", "applicants").filter(pl.col("applicant_id") == 777001)
    assert current["credit_score"].to_list() == [500]
    history = read(storage, "silver", "applicants_history").filter(pl.col("applicant_id") == 777001)
    assert history["credit_score"].to_list() == [500]
    rejected = read(storage, "silver", "applicants_rejected").filter(
        pl.col("applicant_id") == 777001
    )
    assert rejected["_rule"].to_list() == ["updated_at_not_future"]
    assert rejected["is_current"].to_list() == [False]
    assert rejected["valid_to"].to_list() == history["valid_from"].to_list()
    assert_history_is_ordered(storage, "applicants", "applicant_id")
    # A batch run afterwards agrees, and changes nothing.
    assert silver.promote(storage, "applicants").rows == {}
    applicants, _ = expected(settings)
    assert_same_rows(read(storage, "silver", "applicants"), applicants, "applicant_id")


def test_a_key_change_keeps_an_unchanged_toasted_value(settings: Settings) -> None:
    """Reproduction 3: the TOASTed value comes from the old key's version, not the new key's."""
    settings = stream_settings(settings)
    storage = seeded(settings, rows=20)
    setup.setup(settings, storage)
    big = os.urandom(10_000).hex()  # 20 kB, incompressible: stored out of line

    def work() -> None:
        with schema.connect(settings, autocommit=True) as conn:
            insert_applicant(conn, settings, 888001, gender=big)
            conn.execute(
                sql.SQL("UPDATE {} SET applicant_id = 888002 WHERE applicant_id = 888001").format(
                    table(settings, "applicants")
                )
            )
            conn.execute(
                sql.SQL("UPDATE {} SET credit_score = 650 WHERE applicant_id = 888002").format(
                    table(settings, "applicants")
                )
            )

    stream_while(settings, storage, work, promote=True)
    log = read(storage, "bronze", "applicants_changes").filter(pl.col("applicant_id") == 888002)
    assert log["_unchanged"].to_list() == [["person_gender"]] * 2  # never resent
    rejected = read(storage, "silver", "applicants_rejected").filter(
        pl.col("applicant_id") == 888002
    )
    # Both versions of the new key carry the value (a 20 kB gender is no known one).
    assert rejected["person_gender"].to_list() == [big, big]
    assert rejected["_failed_rules"].to_list() == [["gender_known"]] * 2
    assert rejected.filter(pl.col("is_current"))["credit_score"].to_list() == [650]
    # Batch extraction takes over: it re-reads what the stream brought, adds nothing, and
    # silver still holds the source (verify compares every value).
    setup.teardown(settings, storage)
    from lakehouse.verify import verify

    results = verify(settings, storage)
    assert all(r.ok for r in results), [r.differences for r in results]
    again = read(storage, "silver", "applicants_rejected").filter(pl.col("applicant_id") == 888002)
    assert again.height == 2


# Local disk only (CI time): ordering is decided before storage; the S3 stream runs in the other
# tests here.
@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_applications_never_arrive_before_their_applicants_at_start(settings: Settings) -> None:
    """Reproduction 4: on a first `stream --setup --promote` under load, applications were
    promoted before `bronze.applicants_changes` existed and rejected for good."""
    settings = stream_settings(settings)
    storage = seeded(settings, rows=100)
    setup.setup(settings, storage)

    def work() -> None:
        with schema.connect(settings, autocommit=True) as conn:
            simulate(conn, settings.pg_schema, changes=300, batch_size=10, seed=11)

    stream_while(settings, storage, work)  # both change tables land; silver is not built
    # The worst order: the applications first, while silver has no applicant at all.
    silver.promote(storage, "loan_applications")
    assert silver.changes_upto(storage, "loan_applications") == 0  # no change taken yet
    held = read(storage, "silver", "loan_applications_rejected")
    assert set(held["_rule"]) == {"applicant_exists"}  # the snapshot's rows wait
    silver.promote(storage, "applicants")
    silver.promote(storage, "loan_applications")
    # Every application whose applicant is valid arrived; the rest still wait, current.
    _, loans = expected(settings)
    assert_same_rows(read(storage, "silver", "loan_applications"), loans, "application_id")
    rejected = read(storage, "silver", "loan_applications_rejected")
    waiting = rejected.filter(pl.col("is_current") & (pl.col("_rule") == "applicant_exists"))
    people = set(read(storage, "silver", "applicants")["applicant_id"])
    assert set(waiting["applicant_id"]).isdisjoint(people)


def test_the_stream_promotes_under_load_from_its_first_start(settings: Settings) -> None:
    settings = stream_settings(settings)
    storage = seeded(settings, rows=100)
    setup.setup(settings, storage)

    def work() -> None:
        with schema.connect(settings, autocommit=True) as conn:
            simulate(conn, settings.pg_schema, changes=400, batch_size=10, seed=12)

    stream_while(settings, storage, work, promote=True)
    silver.promote(storage, "applicants")
    silver.promote(storage, "loan_applications")
    applicants, loans = expected(settings)
    assert_same_rows(read(storage, "silver", "applicants"), applicants, "applicant_id")
    assert_same_rows(read(storage, "silver", "loan_applications"), loans, "application_id")


# Local disk only (CI time): ordering is decided before storage; the S3 stream runs in the other
# tests here.
@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_every_timestamp_postgres_accepts_lands_and_none_stops_the_stream(
    settings: Settings,
) -> None:
    """Reproduction 5: infinity, BC and years past 9999 stopped the stream on every restart."""
    settings = stream_settings(settings)
    storage = seeded(settings, rows=10)
    setup.setup(settings, storage)
    odd = {
        990001: "infinity",
        990002: "-infinity",
        990003: "0044-03-15 12:00:00+00 BC",
        990004: "12024-01-01 00:00:00+00",
        990005: "294276-12-31 23:59:59.999999+00",
        990006: "4713-01-01 00:00:00+00 BC",
    }
    edge = {990007: "9999-12-31 23:59:59.999999+00", 990008: "0001-01-01 00:00:00+00"}

    def work() -> None:
        with schema.connect(settings, autocommit=True) as conn:
            for key, when in {**odd, **edge}.items():
                insert_applicant(conn, settings, key, updated_at=when)
            insert_applicant(conn, settings, 990099)  # a plain row after them lands too

    stream_while(settings, storage, work, promote=True)
    log = read(storage, "bronze", "applicants_changes").filter(pl.col("applicant_id") > 990000)
    assert log.height == len(odd) + len(edge) + 1
    for key, text in odd.items():
        row = log.filter(pl.col("applicant_id") == key)
        assert row["updated_at"].to_list() == [None]
        assert row["_unrepresentable"].to_list() == [f'{{"updated_at": "{text}"}}']
    held = log.filter(pl.col("applicant_id").is_in(list(edge)))
    assert sorted(held["updated_at"].to_list()) == [
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ]
    rejected = read(storage, "silver", "applicants_rejected").filter(
        pl.col("applicant_id") > 990000
    )
    rules = dict(rejected.select("applicant_id", "_rule").iter_rows())
    assert all(rules[k] == "updated_at_representable" for k in odd)
    assert all(rules[k] == "updated_at_range" for k in edge)
    assert 990099 in read(storage, "silver", "applicants")["applicant_id"].to_list()
