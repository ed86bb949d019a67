"""`gold.feature_drift_daily`'s SQL against numpy and scipy, on any training set and log.

The references (`lakehouse.transforms.drift.reference`) and the SQL that bins served
values against them are checked together: the test recomputes every statistic from the
raw values with numpy's quantiles and `searchsorted`, and scipy's Jensen-Shannon
distance. Hypothesis draws numbers with many ties (deciles that coincide), missing
values in training and in serving, values outside the training range, categories and
booleans never seen in training, and days where a feature is always missing.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import jensenshannon

from lakehouse.ml.monitor.drift import SCHEMA
from lakehouse.transforms.drift import FEATURE_DRIFT_DAILY, FLOOR, reference

START = datetime(2026, 3, 1, tzinfo=UTC)
NUMBERS = st.one_of(
    st.none(),
    st.sampled_from([0, 1, 2, 2.5, 100]),  # ties: coinciding deciles
    st.floats(-1e6, 1e6, allow_nan=False),
    st.integers(-(2**53), 2**53),
    st.just("12"),  # a string: the model reads it as missing, and so does the mart
)
LEVELS = st.one_of(st.none(), st.sampled_from(["A", "B", "C", "unseen", "ü é"]))
FLAGS = st.one_of(st.none(), st.booleans())
FEATURES = {"amount": ("numeric", NUMBERS), "grade": ("categorical", LEVELS)}
FEATURES["flag"] = ("categorical", FLAGS)


@st.composite
def cases(draw: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, list[Any]]]:
    training: dict[str, list[Any]] = {}
    rows = draw(st.integers(1, 30))
    for name, (_, values) in FEATURES.items():
        drawn = draw(st.lists(values, min_size=rows, max_size=rows))
        if name == "grade":  # training never saw "unseen"
            drawn = [None if v == "unseen" else v for v in drawn]
        training[name] = drawn
    refs = []
    for version in ("v1", "v2"):
        for name, (kind, _) in FEATURES.items():
            refs.append({"model_version": version, **reference(name, kind, training[name])})
    predictions = []
    for n in range(draw(st.integers(0, 40))):
        vector = {name: draw(values) for name, (_, values) in FEATURES.items()}
        if draw(st.booleans()) and draw(st.booleans()):  # a key absent: missing too
            del vector[draw(st.sampled_from(sorted(vector)))]
        predictions.append(
            {
                "model_version": draw(st.sampled_from(["v1", "v2", "gone"])),
                "served_at": START + timedelta(hours=draw(st.integers(0, 60))),
                "features": json.dumps(vector),
                "request_id": f"r{n}",
            }
        )
    return predictions, refs, training


def drift_rows(predictions: list[dict[str, Any]], refs: list[dict[str, Any]]) -> list[dict]:
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    schema = pa.schema(
        [
            ("model_version", pa.string()),
            ("served_at", pa.timestamp("us", tz="UTC")),
            ("features", pa.string()),
            ("request_id", pa.string()),
        ]
    )
    con.register("predictions", pa.Table.from_pylist(predictions, schema=schema))
    con.register("drift_reference", pa.Table.from_pylist(refs, schema=SCHEMA))
    return con.execute(FEATURE_DRIFT_DAILY).to_arrow_table().to_pylist()


def spelled(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def expected_rows(
    predictions: list[dict[str, Any]], training: dict[str, list[Any]]
) -> dict[tuple[str, Any, str], dict[str, Any]]:
    """Every statistic from the raw values, with numpy and scipy."""
    out = {}
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for p in predictions:
        if p["model_version"] == "gone":  # not in the registry: no reference, no rows
            continue
        groups.setdefault((p["model_version"], p["served_at"].date()), []).append(
            json.loads(p["features"])
        )
    for (version, day), vectors in groups.items():
        for name, (kind, _) in FEATURES.items():
            train = [v for v in training[name] if v is not None]
            served = [v.get(name) for v in vectors]
            present = [v for v in served if v is not None]
            if kind == "numeric":
                present = [v for v in present if not isinstance(v, str)]
                deciles = np.arange(1, 10) / 10
                edges = (
                    np.unique(np.quantile(np.array(train, dtype=float), deciles)) if train else []
                )
                bins = len(edges) + 1
                numbers = np.array(train, dtype=float)  # a training "12" is the number 12
                e_counts = np.bincount(np.searchsorted(edges, numbers, side="left"), minlength=bins)
                a_counts = np.bincount(
                    np.searchsorted(edges, np.array(present, dtype=float), side="left"),
                    minlength=bins,
                )
            else:
                levels = sorted({spelled(v) for v in train})
                index = {lv: i for i, lv in enumerate(levels)}
                bins = len(levels) + 1
                e_counts = np.bincount([index[spelled(v)] for v in train], minlength=bins).astype(
                    float
                )
                a_counts = np.bincount(
                    [index.get(spelled(v), len(levels)) for v in present], minlength=bins
                ).astype(float)
            psi = js = None
            if present and train:
                a, e = a_counts / a_counts.sum(), e_counts / e_counts.sum()
                fa, fe = np.maximum(a, FLOOR), np.maximum(e, FLOOR)
                psi = float(np.sum((fa - fe) * np.log(fa / fe)))
                js = float(jensenshannon(a, e, base=2)) if kind == "categorical" else None
            out[(version, day, name)] = {
                "predictions": len(served),
                "present": len(present),
                "missing_share": 1 - len(present) / len(served),
                "training_missing_share": 1 - len(train) / len(training[name]),
                "psi": psi,
                "js_distance": js,
            }
    return out


def close(got: float | None, want: float | None) -> bool:
    if want is None or got is None:
        return got is want
    return math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9)


@settings(max_examples=150, deadline=None)
@given(cases())
def test_drift_matches_numpy_and_scipy(
    case: tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, list[Any]]],
) -> None:
    predictions, refs, training = case
    rows = drift_rows(predictions, refs)
    want = expected_rows(predictions, training)
    got = {(r["model_version"], r["day"], r["feature"]): r for r in rows}
    assert set(got) == set(want)
    for key, expected in want.items():
        row = got[key]
        assert row["predictions"] == expected["predictions"], key
        assert row["present"] == expected["present"], key
        for column in ("missing_share", "training_missing_share", "psi", "js_distance"):
            assert close(row[column], expected[column]), (key, column, row, expected)


def test_a_shifted_population_drifts_and_the_same_one_does_not() -> None:
    """On 2,000 draws, the same distribution gives PSI near 0; a shift of one standard
    deviation gives a PSI well above 0.25 (the usual 'different population' line)."""
    rng = np.random.default_rng(7)
    train = rng.normal(0, 1, 2000).tolist()
    ref = {"model_version": "v1", **reference("x", "numeric", train)}
    same = rng.normal(0, 1, 2000)
    shifted = rng.normal(1, 1, 2000)
    predictions = [
        {
            "model_version": "v1",
            "served_at": START + timedelta(days=day),
            "features": json.dumps({"x": float(v)}),
            "request_id": f"{day}-{i}",
        }
        for day, values in ((0, same), (1, shifted))
        for i, v in enumerate(values)
    ]
    rows = drift_rows(predictions, [ref])
    assert [r["day"] for r in rows] == [START.date(), (START + timedelta(days=1)).date()]
    assert rows[0]["psi"] == pytest.approx(0, abs=0.03)
    assert rows[1]["psi"] > 0.25
