"""The market inputs of gold, held to naive definitions: each application's first version,
and the mean rate of its intent over the 30 days before it.

Both are computed over every submission ever made, so they are written for speed and
memory (the market rates: one sort, then a slice per intent). These properties
hold them to the plain reading of their definitions, on frames that have what real data
has: several versions per application, a null intent, unknown or non-finite rates,
applications at the same instant, windows that end exactly 30 days back, no rows at all.
CI runs 200 examples per property; `HYPOTHESIS_PROFILE=long` runs 5,000.
"""

from __future__ import annotations

import math
import os
from datetime import UTC, datetime, timedelta

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from lakehouse.transforms.gold import SUBMITTED_COLUMNS, intent_rate_30d, submitted_frame

EXAMPLES = 5_000 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else 200
T0 = datetime(2024, 1, 1, tzinfo=UTC)
# Offsets in hours: 720 h is exactly the 30-day window, so edges are hit often.
HOURS = st.sampled_from([0, 1, 24, 719, 720, 721, 1000, 1440, 1441])
RATES = st.one_of(st.none(), st.just(math.nan), st.floats(1, 36), st.sampled_from([1.0, 36.0]))
INTENTS = st.sampled_from([None, "EDUCATION", "MEDICAL", "VENTURE"])


@st.composite
def submissions(draw: st.DrawFn) -> pl.DataFrame:
    rows = draw(st.lists(st.tuples(INTENTS, RATES, HOURS), max_size=40))
    return pl.DataFrame(
        {
            "application_id": list(range(len(rows))),
            "applicant_id": [i % 3 for i in range(len(rows))],
            "loan_intent": [r[0] for r in rows],
            "loan_int_rate": [r[1] for r in rows],
            "applied_at": [T0 + timedelta(hours=r[2]) for r in rows],
        },
        schema={
            "application_id": pl.Int64,
            "applicant_id": pl.Int64,
            "loan_intent": pl.String,
            "loan_int_rate": pl.Float64,
            "applied_at": pl.Datetime("us", "UTC"),
        },
    )


def naive_rate(frame: pl.DataFrame) -> dict[int, float | None]:
    """Per application: the mean known rate of its intent in [applied_at - 30 d, applied_at)."""
    rows = frame.to_dicts()
    out: dict[int, float | None] = {}
    for row in rows:
        window = [
            other["loan_int_rate"]
            for other in rows
            if other["loan_intent"] == row["loan_intent"]
            and row["applied_at"] - timedelta(days=30) <= other["applied_at"] < row["applied_at"]
            and other["loan_int_rate"] is not None
            and math.isfinite(other["loan_int_rate"])
        ]
        out[row["application_id"]] = sum(window) / len(window) if window else None
    return out


@settings(max_examples=EXAMPLES, deadline=None)
@given(frame=submissions())
def test_intent_rate_is_the_mean_of_the_30_days_before(frame: pl.DataFrame) -> None:
    got = intent_rate_30d(frame)
    assert sorted(got["application_id"].to_list()) == frame["application_id"].to_list()
    rates = dict(zip(got["application_id"], got["intent_rate_30d"], strict=True))
    applicants = dict(zip(got["application_id"], got["applicant_id"], strict=True))
    for application, want in naive_rate(frame).items():
        have = rates[application]
        assert (have is None) == (want is None), (application, have, want)
        if want is not None:
            assert have is not None
            assert math.isclose(have, want, rel_tol=1e-9), (application, have, want)
        assert applicants[application] == application % 3  # carried, to cut it by applicant


@st.composite
def histories(draw: st.DrawFn) -> pl.DataFrame:
    """Versions of a few applications, each with strictly increasing `valid_from`, shuffled."""
    rows = []
    for application in range(draw(st.integers(0, 8))):
        starts = draw(st.lists(st.integers(0, 10_000), min_size=1, max_size=4, unique=True))
        for version, start in enumerate(sorted(starts)):
            rows.append(
                {
                    "application_id": application,
                    "applicant_id": draw(st.integers(0, 3)),  # a later version may move it
                    "loan_amnt": float(version),
                    "loan_intent": draw(INTENTS),
                    "loan_int_rate": draw(RATES),
                    "loan_percent_income": 0.1,
                    "applied_at": T0,
                    "valid_from": T0 + timedelta(seconds=start),
                    "version": version,
                }
            )
    order = draw(st.permutations(range(len(rows))))
    schema = {c: pl.Float64 for c in ("loan_amnt", "loan_int_rate", "loan_percent_income")}
    schema |= {"application_id": pl.Int64, "applicant_id": pl.Int64, "version": pl.Int64}
    schema |= {"loan_intent": pl.String, "applied_at": pl.Datetime("us", "UTC")}
    schema |= {"valid_from": pl.Datetime("us", "UTC")}
    return pl.DataFrame([rows[i] for i in order], schema=schema)


@settings(max_examples=EXAMPLES, deadline=None)
@given(history=histories())
def test_submitted_is_each_applications_first_version(history: pl.DataFrame) -> None:
    got = submitted_frame({"loan_applications_history": history.lazy()})
    assert got.columns == list(SUBMITTED_COLUMNS)
    want = history.filter(pl.col("version") == 0).select(SUBMITTED_COLUMNS)
    assert got.sort("application_id").equals(want.sort("application_id"))
    narrow = ("application_id", "loan_intent")
    assert submitted_frame({"loan_applications_history": history.lazy()}, narrow).equals(
        got.select(narrow)
    )
