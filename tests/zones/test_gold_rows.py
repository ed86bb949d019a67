"""The speed layer's gold rows of a few entities equal the full gold build's, bit for bit.

After a burst of source changes (the simulator's inserts, edits, decisions and deletes,
an application backfilled years back, applicants updated), silver is promoted and the
entities it touched are recomputed (`gold_rows`). A full gold build over the same silver
must then hold exactly those rows for those entities, and every entity whose gold rows
changed at all must be among them (nothing the change touched is missed).

CI runs two change scripts; `HYPOTHESIS_PROFILE=long` (or GOLD_ROWS_SEEDS=N) runs more.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

import polars as pl
import pytest
from hypothesis import given
from hypothesis import settings as run
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from lakehouse.settings import Settings
from lakehouse.source import schema
from lakehouse.zones import gold_rows
from tests.helpers import (
    churn,
    insert_late_application,
    move_applications,
    read,
    run_all,
    seeded,
)

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
SEEDS = int(os.environ.get("GOLD_ROWS_SEEDS") or (12 if LONG else 2))


def _silver_versions(settings: Settings) -> dict[str, int]:
    from lakehouse.storage import Storage

    storage = Storage.from_settings(settings)
    return {name: storage.table("silver", name).version() for name in gold_rows.SOURCES}


def _changed_keys(before: pl.DataFrame, after: pl.DataFrame, key: str) -> set[int]:
    """Entities with any gold row added, changed or removed."""

    def differ(a: pl.DataFrame, b: pl.DataFrame) -> set[int]:
        return set(a.join(b, on=a.columns, how="anti", nulls_equal=True)[key].to_list())

    return differ(after, before) | differ(before, after)


def _sorted(frame: pl.DataFrame, key: str) -> pl.DataFrame:
    return frame.sort(key, "event_timestamp")


@pytest.mark.parametrize("settings", ["local"], indirect=True)
@pytest.mark.parametrize("seed", range(SEEDS))
def test_recomputed_rows_equal_the_full_build(settings: Settings, seed: int) -> None:
    storage = seeded(settings, rows=400)
    run_all(settings, storage)
    before_gold = {
        n: read(storage, "gold", n) for n in ("application_features", "applicant_features")
    }
    before = _silver_versions(settings)

    churn(settings, changes=60 + 20 * seed, seed_value=seed + 11)
    late = insert_late_application(settings)
    with schema.connect(settings, autocommit=True) as conn:
        s = settings.pg_schema
        conn.execute(
            f'UPDATE "{s}".applicants SET credit_score = credit_score + 1, updated_at = now() '
            f'WHERE applicant_id IN (SELECT applicant_id FROM "{s}".applicants '
            f"ORDER BY applicant_id DESC LIMIT {1 + seed})"
        )
    run_all(settings, storage, full_gold=True)
    now = _silver_versions(settings)

    changed = gold_rows.affected(storage, before, now)
    assert late in changed.applications and late in changed.submitted
    rows = gold_rows.rows_for(settings, storage, changed, now)

    apps = read(storage, "gold", "application_features")
    people = read(storage, "gold", "applicant_features")
    # Nothing the change touched is missed...
    touched_apps = _changed_keys(before_gold["application_features"], apps, "application_id")
    touched_people = _changed_keys(before_gold["applicant_features"], people, "applicant_id")
    assert touched_apps and touched_people
    assert touched_apps <= rows.applications, sorted(touched_apps - rows.applications)[:10]
    assert touched_people <= rows.applicants, sorted(touched_people - rows.applicants)[:10]
    # ...and the rows are the full build's, to the bit.
    assert_frame_equal(
        _sorted(rows.application_features, "application_id"),
        _sorted(
            apps.filter(pl.col("application_id").is_in(list(rows.applications))), "application_id"
        ),
        check_exact=True,
    )
    assert_frame_equal(
        _sorted(rows.applicant_features, "applicant_id"),
        _sorted(people.filter(pl.col("applicant_id").is_in(list(rows.applicants))), "applicant_id"),
        check_exact=True,
    )
    # Widening stays local: far fewer entities than the table.
    assert len(rows.applications) < apps["application_id"].n_unique() / 2


@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_rows_after_an_application_moved_equal_the_full_build(settings: Settings) -> None:
    """An application moved to another applicant keeps its first version under the old
    one: a later change of the new applicant alone recomputes its running counts from
    every version of that application, as the full build does."""
    storage = seeded(settings, rows=200)
    run_all(settings, storage)
    moved = move_applications(settings, 2)
    assert len(moved) == 2
    run_all(settings, storage, full_gold=True)
    before = _silver_versions(settings)
    with schema.connect(settings, autocommit=True) as conn:
        conn.execute(
            f'UPDATE "{settings.pg_schema}".applicants SET credit_score = credit_score + 1,'
            " updated_at = now() WHERE applicant_id = ANY(%s)",
            ([applicant for _, applicant in moved],),
        )
    run_all(settings, storage, full_gold=True)
    now = _silver_versions(settings)
    changed = gold_rows.affected(storage, before, now)
    rows = gold_rows.rows_for(settings, storage, changed, now)
    assert {applicant for _, applicant in moved} <= rows.applicants
    people = read(storage, "gold", "applicant_features")
    apps = read(storage, "gold", "application_features")
    assert_frame_equal(
        _sorted(rows.applicant_features, "applicant_id"),
        _sorted(people.filter(pl.col("applicant_id").is_in(list(rows.applicants))), "applicant_id"),
        check_exact=True,
    )
    assert_frame_equal(
        _sorted(rows.application_features, "application_id"),
        _sorted(
            apps.filter(pl.col("application_id").is_in(list(rows.applications))), "application_id"
        ),
        check_exact=True,
    )


_INTENTS = st.sampled_from(["EDUCATION", "MEDICAL", "VENTURE", None])
_DAYS = st.one_of(st.none(), st.integers(0, 120))  # days after an origin, or missing


@run(max_examples=1000 if LONG else 150, deadline=None)
@given(
    st.lists(st.tuples(_INTENTS, _DAYS, st.integers(0, 86_399)), max_size=40),
    st.sets(st.integers(0, 39), max_size=8),
)
def test_market_windows_by_as_of_join_equal_a_scan_per_submission(
    rows: list[tuple[str | None, int | None, int]], chosen: set[int]
) -> None:
    """The applications whose 30-day market rate counts a new submission, found by one
    as-of join, are those a scan per new submission finds (ties, the window's edges,
    missing intents and times, several new submissions of one intent)."""
    origin = datetime(2026, 1, 1)
    submitted = pl.DataFrame(
        {
            "application_id": list(range(len(rows))),
            "loan_intent": [intent for intent, _, _ in rows],
            # Whole days (windows end exactly on one) and seconds (ties and near misses).
            "applied_at": [
                None if day is None else origin + timedelta(days=day, seconds=sec % 2 * sec)
                for _, day, sec in rows
            ],
        },
        schema={"application_id": pl.Int64, "loan_intent": pl.Utf8, "applied_at": pl.Datetime},
    )
    new = submitted.filter(pl.col("application_id").is_in(sorted(chosen)))
    scanned: set[int] = set()
    for intent, at in new.select("loan_intent", "applied_at").drop_nulls().iter_rows():
        window = submitted.filter(
            (pl.col("loan_intent") == intent)
            & (pl.col("applied_at") > at)
            & (pl.col("applied_at") <= at + timedelta(days=30))
        )
        scanned |= set(window["application_id"].to_list())
    assert gold_rows._in_market_windows(submitted, new) == scanned
