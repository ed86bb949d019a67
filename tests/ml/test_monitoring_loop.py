"""Drift and quality watched end to end: served, logged, promoted, built and flagged.

A real API (its lifespan landing the log), the real source in Postgres and `lakehouse run`
in a subprocess, on local disk and on S3: loans far outside the training population are
served, applications are decided against the model's answers in the source, and
after one run `gold.feature_drift_daily` holds the served features of every prediction and
`lakehouse status` flags the shifted features and the model's fallen AUC.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from lakehouse.ml import models
from lakehouse.ml import tasks as ml_tasks
from lakehouse.source import schema
from tests.conftest import env_for
from tests.helpers import read
from tests.ml.conftest import Lake, served_model

ROOT = Path(__file__).resolve().parents[2]
MIN_COUNT = 20


def cli(lake: Lake, *args: str) -> str:
    env = {
        **os.environ,
        **env_for(lake.settings),
        "PYTHONPATH": str(ROOT),
        "LAKEHOUSE_MONITOR_MIN_COUNT": str(MIN_COUNT),
    }
    done = subprocess.run(
        [sys.executable, "-m", "lakehouse.cli", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def logged_today(lake: Lake, version: str) -> int:
    """Count the predictions of `version` logged today (UTC)."""
    if lake.storage.table_or_none("bronze", "predictions") is None:
        return 0
    rows = read(lake.storage, "bronze", "predictions")
    today = datetime.now(UTC).date()
    return rows.filter(
        (pl.col("model_version") == version) & (pl.col("served_at").dt.date() == today)
    ).height


def test_drift_and_a_falling_auc_are_built_and_flagged(lake: Lake) -> None:
    from fastapi.testclient import TestClient

    from lakehouse.ml.serve import create_app

    version = served_model(lake)
    ml_tasks.materialize(lake.settings, lake.storage)
    online = set(read(lake.storage, "gold", "application_features")["application_id"].to_list())
    applications = read(lake.storage, "silver", "loan_applications")
    applicants = sorted(set(read(lake.storage, "gold", "applicant_features")["applicant_id"]))
    candidates = [int(i) for i in applications["application_id"] if i in online][:300]
    assert candidates and applicants
    # Other tests of the package logged predictions of this version today, some with
    # outcomes: outnumber them, so that the day's population and AUC are this test's.
    before = logged_today(lake, version)
    with TestClient(create_app(lake.settings)) as client:  # its lifespan lands the log
        first = {
            app: client.post("/predict", json={"application_id": app}).json()["decision"]
            for app in candidates
        }
        # The source decides applications against the model's answer, as many answered
        # each way (pending ones, and decided ones changed).
        approved = [a for a in candidates if first[a] == "approve"]
        rejected = [a for a in candidates if first[a] == "reject"]
        assert approved and rejected, f"the model answered one way only: {first}"
        chosen = [a for pair in zip(approved, rejected, strict=False) for a in pair]
        decisions = {app: 0 if first[app] == "approve" else 1 for app in chosen}
        asked = 0
        while asked < before + len(candidates) + MIN_COUNT:
            client.post("/predict", json={"application_id": chosen[asked % len(chosen)]})
            asked += 1
        # Loans far outside the training population, for applicants as they are.
        shifted = {"loan_amnt": 1_000_000, "loan_intent": "VENTURE", "loan_int_rate": 36}
        for n in range(3 * (before + len(candidates) + asked)):
            response = client.post(
                "/predict",
                json={"applicant_id": applicants[n % len(applicants)], "loan": shifted},
            )
            assert response.status_code == 200, response.text
    with schema.connect(lake.settings, autocommit=True) as conn:
        for app, status in decisions.items():
            conn.execute(
                f'UPDATE "{lake.settings.pg_schema}".loan_applications SET loan_status = %s '
                "WHERE application_id = %s",
                (status, app),
            )
    cli(lake, "run")

    logged = read(lake.storage, "bronze", "predictions")
    drift = read(lake.storage, "gold", "feature_drift_daily")
    per_day = logged.group_by("model_version", pl.col("served_at").dt.date().alias("day")).len()
    used = json.loads(models.Registry(lake.storage).get(version, "metrics.json"))["features_used"]
    for row in per_day.iter_rows(named=True):
        rows = drift.filter(
            (pl.col("model_version") == row["model_version"]) & (pl.col("day") == row["day"])
        )
        if row["model_version"] == version:
            assert sorted(rows["feature"]) == sorted(used)
        assert set(rows["predictions"]) <= {row["len"]}

    status = cli(lake, "status")
    assert "DRIFT loan_amnt " in status, status
    assert "DRIFT loan_intent " in status and "Jensen-Shannon distance" in status, status
    assert f"AUC model {version}" in status, status
