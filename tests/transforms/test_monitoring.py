"""The monitoring marts' SQL against scikit-learn and plain Python, on any predictions.

`gold.prediction_outcomes` and `gold.model_quality_daily` are DuckDB SQL over the
inference log and silver (`lakehouse.transforms.gold`). Hypothesis draws logs with tied
probabilities, probabilities of exactly 0 and 1, days where every outcome is the same,
predictions without an outcome, and applications predicted several times.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import brier_score_loss, roc_auc_score

from lakehouse.transforms.gold import MODEL_QUALITY_DAILY, PREDICTION_OUTCOMES

START = datetime(2026, 3, 1, tzinfo=UTC)
PROBABILITIES = st.one_of(
    st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.9, 1.0]),  # ties, and the bins' edges
    st.floats(0, 1, allow_nan=False),
)


@st.composite
def logs(draw: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    apps = draw(st.integers(1, 12))
    statuses = draw(st.lists(st.sampled_from([0, 1, None]), min_size=apps, max_size=apps))
    applications = [{"application_id": i + 1, "loan_status": s} for i, s in enumerate(statuses)]
    predictions = []
    for n in range(draw(st.integers(0, 40))):
        probability = draw(PROBABILITIES)
        predictions.append(
            {
                "request_id": f"r{n}",
                "served_at": START + timedelta(hours=draw(st.integers(0, 60))),
                "model_version": draw(st.sampled_from(["v1", "v2"])),
                # Some ids have no application (withdrawn, or never in the source).
                "application_id": draw(st.integers(1, apps + 2)),
                "probability": probability,
                "decision": "approve" if probability >= 0.5 else "reject",
                "threshold": 0.5,
            }
        )
    return predictions, applications


def marts(
    predictions: list[dict[str, Any]], applications: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    con = duckdb.connect()
    schema = pa.schema(
        [
            ("request_id", pa.string()),
            ("served_at", pa.timestamp("us", tz="UTC")),
            ("model_version", pa.string()),
            ("application_id", pa.int64()),
            ("probability", pa.float64()),
            ("decision", pa.string()),
            ("threshold", pa.float64()),
        ]
    )
    con.register("predictions", pa.Table.from_pylist(predictions, schema=schema))
    apps = pa.Table.from_pylist(
        applications,
        schema=pa.schema([("application_id", pa.int64()), ("loan_status", pa.int16())]),
    )
    con.register("loan_applications", apps)
    con.execute("SET TimeZone = 'UTC'")
    outcomes = con.execute(PREDICTION_OUTCOMES).to_arrow_table()
    con.register("prediction_outcomes", outcomes)
    quality = con.execute(MODEL_QUALITY_DAILY).to_arrow_table()
    return outcomes.to_pylist(), quality.to_pylist()


@settings(max_examples=150, deadline=None)
@given(logs())
def test_quality_equals_scikit_learn_per_model_version_and_day(
    drawn: tuple[list[dict[str, Any]], list[dict[str, Any]]],
) -> None:
    predictions, applications = drawn
    outcomes, quality = marts(predictions, applications)
    status = {a["application_id"]: a["loan_status"] for a in applications}
    expected = [p for p in predictions if status.get(p["application_id"]) is not None]
    assert sorted(o["request_id"] for o in outcomes) == sorted(p["request_id"] for p in expected)
    for o in outcomes:
        approved = status[o["application_id"]] == 1
        assert o["approved"] is approved
        assert o["correct"] is ((o["decision"] == "approve") == approved)

    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for p in predictions:
        groups.setdefault((p["model_version"], p["served_at"].date()), []).append(p)
    assert sorted((q["model_version"], q["day"]) for q in quality) == sorted(groups)
    for q in quality:
        served = groups[q["model_version"], q["day"]]
        assert q["predictions"] == len(served)
        known = [p for p in served if status.get(p["application_id"]) is not None]
        if not known:
            assert q["with_outcome"] is None and q["roc_auc"] is None
            continue
        y = [int(status[p["application_id"]] == 1) for p in known]
        scores = [p["probability"] for p in known]
        assert q["with_outcome"] == len(known) and q["approved"] == sum(y)
        if 0 < sum(y) < len(y):
            assert math.isclose(q["roc_auc"], roc_auc_score(y, scores), abs_tol=1e-12)
        else:
            assert q["roc_auc"] is None
        assert math.isclose(q["brier"], brier_score_loss(y, scores), abs_tol=1e-12)
        assert math.isclose(q["approval_rate_actual"], sum(y) / len(y))
        predicted = sum(p["decision"] == "approve" for p in known) / len(known)
        assert math.isclose(q["approval_rate_predicted"], predicted)
        bins: list[list[tuple[float, int]]] = [[] for _ in range(10)]
        for score, label in zip(scores, y, strict=True):
            bins[min(int(score * 10), 9)].append((score, label))
        assert q["calibration_count"] == [len(b) for b in bins]
        for b, mean_p, observed in zip(
            bins, q["calibration_predicted"], q["calibration_observed"], strict=True
        ):
            if not b:
                assert mean_p is None and observed is None
            else:
                assert math.isclose(mean_p, sum(s for s, _ in b) / len(b), abs_tol=1e-12)
                assert math.isclose(observed, sum(lab for _, lab in b) / len(b))
