"""The model's input encoding: one row served equals the same row in training."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lakehouse.ml import models, scoring


def test_training_matrix_and_served_vector_encode_alike() -> None:
    # As Feast returns them: a bool column with a null becomes objects; ints with a null
    # become floats; categories are strings, with a null and a level unseen in training.
    frame = pd.DataFrame(
        {
            "previous_loan_defaults_on_file": pd.Series([True, False, None, True], dtype=object),
            "credit_score": [600.0, None, 710.0, 800.0],
            "application_count": pd.Series([0, 2, 1, 3], dtype="int64"),
            "loan_intent": pd.Series(["EDUCATION", None, "VENTURE", "EDUCATION"], dtype=object),
            "label": [1, 0, 1, 0],
        }
    )
    columns = [c for c in frame.columns if c != "label"]
    categories = {
        c: sorted(str(v) for v in frame[c].dropna().unique())
        for c in columns
        if scoring.is_categorical(frame[c])
    }
    assert categories == {"loan_intent": ["EDUCATION", "VENTURE"]}  # the bool is not one
    trained = scoring.Trained(None, columns, categories, 0.5)
    matrix = trained.matrix(frame)
    # The boolean column carries its values (a category lookup of True would lose them).
    np.testing.assert_array_equal(matrix[:, 0], [1.0, 0.0, np.nan, 1.0])
    for i, row in enumerate(frame.to_dict("records")):
        served = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
        np.testing.assert_array_equal(trained.vector(served)[0], matrix[i])
    # numpy scalars (a frame's values) and an unseen level encode like their Python twins.
    one = trained.vector(
        {
            "previous_loan_defaults_on_file": np.bool_(True),
            "credit_score": np.float64(600.0),
            "application_count": np.int64(0),
            "loan_intent": "MEDICAL",
        }
    )[0]
    np.testing.assert_array_equal(one, [1.0, 600.0, 0.0, np.nan])


def test_one_row_scoring_equals_predict_proba() -> None:
    """Serving scores one row without scikit-learn's per-call overhead (3 ms of the 3.5):
    the result must be exactly `predict_proba`'s, for known, unknown and missing values."""
    rng = np.random.default_rng(1)
    n = 1000
    frame = pd.DataFrame(
        {
            "loan_amnt": rng.normal(9000, 3000, n),
            "loan_intent": rng.choice(["EDUCATION", "MEDICAL", "VENTURE", None], n),
            "credit_score": np.where(rng.random(n) < 0.1, np.nan, rng.normal(650, 50, n)),
            "person_home_ownership": rng.choice(["RENT", "OWN", "MORTGAGE"], n),
            "previous_loan_defaults_on_file": pd.Series(rng.random(n) < 0.5, dtype=object),
        }
    )
    logit = (frame["credit_score"].fillna(650) - 650) / 40 + (frame["loan_intent"] == "VENTURE")
    frame["label"] = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    columns = [c for c in frame.columns if c != "label"]
    trained = models.fit(frame, columns, seed=3, threshold=0.5)
    assert trained._fast_path() is not None  # in use, not fallen back
    rows = frame.drop(columns="label").to_dict("records")
    rows += [
        {"loan_amnt": 5000.0, "loan_intent": "YACHT", "credit_score": None},  # unknown level
        {},  # everything missing
        {"loan_amnt": -1.0, "person_home_ownership": "OTHER", "credit_score": 300.0},
    ]
    rows = [
        {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
        for row in rows
    ]
    # One predict_proba call for all rows: each row's sum over the trees is the same.
    matrix = np.vstack([trained.vector(row) for row in rows])
    expected = trained.model.predict_proba(matrix)[:, 1]
    for row, want in zip(rows, expected, strict=True):
        assert trained.predict_one(row) == float(want), row
    # The cache never reaches the pickled model (a closure cannot be pickled).
    import pickle

    again = pickle.loads(pickle.dumps(trained))
    assert "_fast_predict" not in again.__dict__
    assert again.predict_one(rows[0]) == trained.predict_one(rows[0])


def test_one_row_scoring_is_safe_across_threads() -> None:
    """The API scores requests in a thread pool: concurrent calls must not share state
    (the trees' routine runs without the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(2)
    n = 600
    frame = pd.DataFrame(
        {
            "a": rng.normal(0, 1, n),
            "b": rng.normal(0, 1, n),
            "c": rng.choice(["x", "y", "z"], n),
        }
    )
    frame["label"] = (frame["a"] + rng.normal(0, 0.5, n) > 0).astype(int)
    trained = models.fit(frame, ["a", "b", "c"], seed=1, threshold=0.5)
    assert trained._fast_path() is not None
    rows = frame.drop(columns="label").to_dict("records")
    matrix = np.vstack([trained.vector(r) for r in rows])
    expected = [float(p) for p in trained.model.predict_proba(matrix)[:, 1]]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(3):
            assert list(pool.map(trained.predict_one, rows)) == expected


def test_a_model_the_fast_scorer_cannot_walk_is_scored_by_predict_proba_and_says_why(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(5)
    x = rng.normal(size=(60, 2))
    y = (x[:, 0] > 0).astype(int)
    classifier = LogisticRegression().fit(x, y)
    trained = scoring.Trained(classifier, ["a", "b"], {}, 0.5)
    with caplog.at_level(logging.WARNING, logger="lakehouse.ml.scoring"):
        probability = trained.predict_one({"a": 0.3, "b": -1.0})
    assert probability == classifier.predict_proba(np.array([[0.3, -1.0]]))[0, 1]
    assert "one-row fast scorer off (AttributeError" in caplog.text


def test_an_unexpected_failure_of_the_fast_scorer_is_raised_not_hidden() -> None:
    class Broken:
        n_trees_per_iteration_ = 1

        @property
        def _preprocessor(self) -> None:
            raise MemoryError

    trained = scoring.Trained(Broken(), ["a"], {}, 0.5)
    with pytest.raises(MemoryError):
        trained.predict_one({"a": 1.0})


LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"


@st.composite
def _data_sets(draw: st.DrawFn) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """A small training frame of numbers and categories (up to 120 levels: past a
    bitset's first 32-bit word), some values missing, and rows to score with unknowns."""
    seed = draw(st.integers(0, 2**32 - 1))
    n = draw(st.integers(60, 300))
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(index=range(n))
    score = np.zeros(n)
    for i in range(draw(st.integers(1, 3))):
        x = rng.normal(0, 1, n)
        x[rng.random(n) < draw(st.sampled_from([0.0, 0.2]))] = np.nan
        frame[f"x{i}"] = x
        score += np.nan_to_num(x)
    for i in range(draw(st.integers(0, 2))):
        levels = draw(st.integers(1, 120))
        codes = rng.integers(0, levels, n)
        values = np.array([f"L{c}" for c in codes], dtype=object)
        values[rng.random(n) < 0.1] = None
        frame[f"c{i}"] = values
        score += np.where(codes % 3 == 0, 1.0, -0.5)
    frame["label"] = (score + rng.normal(0, 0.7, n) > 0).astype(int)
    if frame["label"].nunique() < 2:
        frame.loc[0, "label"] = 1 - frame.loc[0, "label"]
    rows = frame.drop(columns="label").sample(min(n, 40), random_state=seed % 1000)
    scored = [
        {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in r.items()}
        for r in rows.to_dict("records")
    ]
    scored += [{c: "UNSEEN" if c.startswith("c") else 0.0 for c in frame.columns}, {}]
    return frame, scored


@settings(max_examples=300 if LONG else 8, deadline=None)
@given(_data_sets())
def test_the_forest_walk_scores_exactly_as_predict_proba(
    data: tuple[pd.DataFrame, list[dict[str, Any]]],
) -> None:
    """The trees compiled to Python give `predict_proba` to the last
    bit: numbers, missing values, categories in any bitset word, unseen categories."""
    frame, rows = data
    columns = [c for c in frame.columns if c != "label"]
    trained = models.fit(frame, columns, seed=0, threshold=0.5)
    assert trained._fast_path() is not None
    expected = trained.model.predict_proba(np.vstack([trained.vector(r) for r in rows]))[:, 1]
    assert [trained.predict_one(r) for r in rows] == [float(p) for p in expected]
    # Encoded rows the request path never makes (codes below zero, or in range but never
    # seen in training): tree by tree, the walk still decides as scikit-learn's routine
    # (the same leaves added in the same order: the same float).
    model = trained.model
    known, f_idx_map = model._bin_mapper.make_known_categories_bitsets()
    walk = scoring._forest_walker(model)
    rng = np.random.default_rng(len(frame))
    for _ in range(5):
        row = rng.integers(-1, 130, size=(1, model.n_features_in_)).astype(np.float64)
        row[rng.random(row.shape) < 0.2] = np.nan
        leaves = [float(p.predict(row, known, f_idx_map, 1)[0]) for (p,) in model._predictors]
        want = 0.5  # any baseline: the leaves are added onto it in tree order
        for leaf in leaves:
            want += leaf
        assert walk(row[0], 0.5) == want
