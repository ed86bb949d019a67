"""`applicant_features` in Polars, held to its SQL specification on generated histories.

The gold build computes `applicant_features` with one sort and running sums
(`applicant_features_frame`), which is fast but far from its plain reading. The SQL
(`APPLICANT_FEATURES`, run here by DuckDB) stays the reference. The integration test on
a seeded lake compares them on whatever the simulator happened to make. These properties
compare them on histories that have what real data has and the simulator rarely makes:
- several versions of an application, with a decision that comes, goes and changes;
- applications moved to another applicant by a later version;
- application changes at the same instant as an applicant's new version;
- an applicant deleted (the last version closed) and applications before a first version.

Silver's quality rules keep every applicant attribute non-null, and the generated rows
keep that too. CI runs 150 examples; `HYPOTHESIS_PROFILE=long` runs 3,000.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import duckdb
import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from lakehouse.transforms.gold import APPLICANT_FEATURES, applicant_features_frame

EXAMPLES = 3_000 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 150
T0 = datetime(2024, 1, 1, tzinfo=UTC)
# Few distinct instants (seconds after T0), so that events often share one.
INSTANTS = st.integers(0, 12)
APPLICANTS = st.integers(1, 3)

ATTRIBUTES: dict[str, pl.DataType] = {
    "person_age": pl.Int32(),
    "person_gender": pl.String(),
    "person_education": pl.String(),
    "person_income": pl.Float64(),
    "person_emp_exp": pl.Int32(),
    "person_home_ownership": pl.String(),
    "cb_person_cred_hist_length": pl.Int32(),
    "credit_score": pl.Int32(),
    "previous_loan_defaults_on_file": pl.String(),
}
AT = pl.Datetime("us", "UTC")


def _at(second: int) -> datetime:
    return T0 + timedelta(seconds=second)


@st.composite
def applicant_versions(draw: st.DrawFn) -> pl.DataFrame:
    """SCD2 versions of each applicant: `valid_to` is the next `valid_from`, or null for
    the version in force, or a time for a deleted applicant's last version."""
    rows = []
    for applicant in range(1, draw(st.integers(0, 3)) + 1):
        starts = sorted(draw(st.lists(INSTANTS, min_size=1, max_size=4, unique=True)))
        deleted = draw(st.one_of(st.none(), st.integers(starts[-1] + 1, 14)))
        ends = [*starts[1:], deleted]
        for start, end in zip(starts, ends, strict=True):
            rows.append(
                {
                    "applicant_id": applicant,
                    "valid_from": _at(start),
                    "valid_to": None if end is None else _at(end),
                    "person_age": draw(st.integers(18, 100)),
                    "person_gender": draw(st.sampled_from(["female", "male"])),
                    "person_education": "Master",
                    "person_income": draw(st.sampled_from([1_000.0, 52_000.5, 1e7])),
                    "person_emp_exp": draw(st.integers(0, 4)),
                    "person_home_ownership": "RENT",
                    "cb_person_cred_hist_length": draw(st.integers(0, 2)),
                    "credit_score": draw(st.integers(300, 850)),
                    "previous_loan_defaults_on_file": draw(st.sampled_from(["Yes", "No"])),
                }
            )
    schema = {"applicant_id": pl.Int64(), "valid_from": AT, "valid_to": AT} | ATTRIBUTES
    order = draw(st.permutations(range(len(rows))))
    return pl.DataFrame([rows[i] for i in order], schema=schema)


@st.composite
def application_versions(draw: st.DrawFn) -> pl.DataFrame:
    """Versions of each application: a later one may move it, change its amount, or
    decide, undecide or reverse it. Every version starts at or after `applied_at`."""
    rows = []
    for application in range(1, draw(st.integers(0, 6)) + 1):
        applied = draw(INSTANTS)
        later = st.integers(applied, 14)
        starts = sorted(draw(st.lists(later, min_size=1, max_size=4, unique=True)))
        for start in starts:
            rows.append(
                {
                    "application_id": application,
                    "applicant_id": draw(APPLICANTS),
                    "applied_at": _at(applied),
                    "loan_amnt": draw(st.sampled_from([500.0, 1_000.25, 35_000.0])),
                    "loan_status": draw(st.sampled_from([None, 0, 1])),
                    "valid_from": _at(start),
                }
            )
    schema = {
        "application_id": pl.Int64(),
        "applicant_id": pl.Int64(),
        "applied_at": AT,
        "loan_amnt": pl.Float64(),
        "loan_status": pl.Int16(),
        "valid_from": AT,
    }
    order = draw(st.permutations(range(len(rows))))
    return pl.DataFrame([rows[i] for i in order], schema=schema)


def by_sql(applicants: pl.DataFrame, applications: pl.DataFrame) -> pl.DataFrame:
    """Run the SQL specification in DuckDB over the same frames."""
    con = duckdb.connect()
    try:
        con.execute("SET TimeZone = 'UTC'")
        con.register("applicants_history", applicants.to_arrow())
        con.register("loan_applications_history", applications.to_arrow())
        return pl.from_arrow(con.execute(APPLICANT_FEATURES).to_arrow_table())  # type: ignore[return-value]
    finally:
        con.close()


@settings(max_examples=EXAMPLES, deadline=None)
@given(applicants=applicant_versions(), applications=application_versions())
def test_polars_applicant_features_equal_the_sql(
    applicants: pl.DataFrame, applications: pl.DataFrame
) -> None:
    sources = {
        "applicants_history": applicants.lazy(),
        "loan_applications_history": applications.lazy(),
    }
    got = applicant_features_frame(sources)
    want = by_sql(applicants, applications)
    assert got.columns == want.columns
    key = ["applicant_id", "event_timestamp"]
    assert_frame_equal(
        got.sort(key),
        want.sort(key).cast(dict(got.schema)),  # type: ignore[arg-type]
        check_exact=False,
        rel_tol=1e-12,
    )
