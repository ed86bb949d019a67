"""`lakehouse predictions explain`: a logged prediction replayed from the lakehouse.

Against the real API, the source in Postgres, `lakehouse run` and Feast, on local disk
and S3: predictions are made, the source changes afterwards, and the replay (Feast's
historical retrieval as of each prediction's time) still gives exactly what was served.
A prediction served from an online store left behind the lakehouse is caught: the replay
names the values that differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import polars as pl

from lakehouse.ml import tasks as ml_tasks
from lakehouse.ml.monitor import explain
from lakehouse.source import schema
from tests.conftest import env_for
from tests.helpers import read
from tests.ml.conftest import Lake, served_model

ROOT = Path(__file__).resolve().parents[2]
LOAN = {"loan_amnt": 12_000, "loan_intent": "EDUCATION", "loan_int_rate": 11.5}


def cli(lake: Lake, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **env_for(lake.settings), "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "lakehouse.cli", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    if ok:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def explained(lake: Lake, request_id: str) -> dict[str, Any]:
    """Explain in process (what the command prints; the command itself is run below)."""
    out = explain.explain(lake.settings, lake.storage, request_id)
    assert len(out) == 1
    return out[0]


def predict(lake: Lake, body: dict[str, Any]) -> dict[str, Any]:
    """Predict through a real app whose lifespan lands the log when it ends."""
    from fastapi.testclient import TestClient

    from lakehouse.ml.serve import create_app

    request_id = f"explain-{uuid.uuid4().hex[:12]}"
    with TestClient(create_app(lake.settings)) as client:
        response = client.post("/predict", json=body, headers={"X-Request-ID": request_id})
        assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    assert answer["request_id"] == request_id
    return answer


def test_the_replay_explains_old_predictions_after_the_source_changed(lake: Lake) -> None:
    version = served_model(lake)
    ml_tasks.materialize(lake.settings, lake.storage)
    applications = read(lake.storage, "gold", "application_features")
    app = applications.row(0, named=True)
    applicant = int(app["applicant_id"])
    by_application = predict(lake, {"application_id": int(app["application_id"])})
    new_loan = predict(lake, {"applicant_id": applicant, "loan": LOAN})
    income = new_loan["features"]["person_income"]

    # The source changes after both predictions: the applicant's income triples.
    with schema.connect(lake.settings, autocommit=True) as conn:
        conn.execute(
            f'UPDATE "{lake.settings.pg_schema}".applicants SET person_income = %s '
            "WHERE applicant_id = %s",
            (income * 3, applicant),
        )
    cli(lake, "run", "--no-ml")  # gold has the change; the online store does not
    latest = (
        read(lake.storage, "gold", "applicant_features")
        .filter(pl.col("applicant_id") == applicant)
        .sort("event_timestamp")
        .row(-1, named=True)
    )
    assert latest["person_income"] == income * 3

    for answer in (by_application, new_loan):
        item = explained(lake, answer["request_id"])
        assert item["prediction"]["model_version"] == version == answer["model_version"]
        assert item["prediction"]["probability"] == answer["probability"]
        assert item["model"]["lineage"]["version"] == version
        assert set(item["model"]["lineage"]["inputs"]) == {
            "silver.loan_applications",
            "gold.application_features",
            "gold.applicant_features",
        }
        replay = item["replay"]
        assert replay["matches"], replay
        served = {c["feature"]: c["served"] for c in replay["features"]}
        assert served == answer["features"]
    replayed = {c["feature"]: c["replayed"] for c in explained(lake, new_loan["request_id"])[
        "replay"]["features"]}  # fmt: skip
    assert replayed["person_income"] == income, "the replay is as of the prediction's time"

    # Served from the stale online store: the replay names what the lakehouse holds instead.
    stale = predict(lake, {"applicant_id": applicant, "loan": LOAN})
    assert stale["features"]["person_income"] == income
    replay = explained(lake, stale["request_id"])["replay"]
    assert not replay["matches"]
    differ = {c["feature"] for c in replay["features"] if not c["same"]}
    assert {"person_income", "loan_to_income"} <= differ
    assert "loan_amnt" not in differ and "credit_score" not in differ
    text = cli(lake, "predictions", "explain", stale["request_id"]).stdout
    assert "differ" in text and "person_income" in text and version in text
    shown = json.loads(
        cli(lake, "predictions", "explain", stale["request_id"], "--format", "json").stdout
    )
    assert shown[0]["replay"]["matches"] is False
    assert shown[0]["prediction"]["served_at"] == explained(lake, stale["request_id"])[
        "prediction"]["served_at"].isoformat()  # fmt: skip

    # Once materialized, serving sees the change, and its replay matches again.
    cli(lake, "run")
    fresh = predict(lake, {"applicant_id": applicant, "loan": LOAN})
    assert fresh["features"]["person_income"] == income * 3
    assert explained(lake, fresh["request_id"])["replay"]["matches"]


def test_an_unknown_request_id_is_one_clear_line(lake: Lake) -> None:
    done = cli(lake, "predictions", "explain", "no-such-request", ok=False)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "no-such-request" in lines[0] and "Traceback" not in done.stderr
