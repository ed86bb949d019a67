"""The model's input encoding: one row served equals the same row in training."""

from __future__ import annotations

import numpy as np
import pandas as pd

from lakehouse import models


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
        if models._is_categorical(frame[c])
    }
    assert categories == {"loan_intent": ["EDUCATION", "VENTURE"]}  # the bool is not one
    trained = models.Trained(None, columns, categories, 0.5)
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
