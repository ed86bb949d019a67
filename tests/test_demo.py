"""`lakehouse demo` from nothing, on embedded defaults, as the README's first command runs it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from deltalake import DeltaTable

from lakehouse.settings import Settings
from lakehouse.source.embedded import EmbeddedPostgres
from tests.conftest import shared_tmp


def demo(cwd: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "HOME": cwd}
    if "PYTHONPATH" in os.environ:  # the code under test, when it is not the installed one
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return subprocess.run(
        [sys.executable, "-m", "lakehouse.cli", "demo"],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_demo_runs_then_reports_what_was_done() -> None:
    cwd = shared_tmp("lakehouse-demo-")
    try:
        first = demo(str(cwd))
        assert first.returncode == 0, first.stderr[-3000:]
        out = first.stdout
        assert "[1/4] Postgres started" in out
        assert "[2/4] seeded 45,000 applicants and 45,000 applications" in out
        # bronze, silver: 2 each; gold: 3; Feast apply, materialize; training set, fit,
        # evaluate; the inference log (created empty) and its 3 marts.
        assert re.search(r"16 tasks ran in [\d.]+s", out)
        assert re.search(r"^silver\.applicants\s+\|\s+1\s+\|\s+44993\s+\|", out, re.M)
        assert re.search(r"^applicants\s+\|\s+age_range\s+\|\s+7$", out, re.M)
        assert "approval_rate" in out
        assert re.search(r"ROC AUC 0\.\d+ \(without previous_loan_defaults_on_file: 0\.\d+", out)
        match = re.search(r"-> (approve|reject) \(probability (0\.\d+|1\.000)", out)
        assert match, out[-2000:]
        logged = re.search(r"logged in bronze.predictions as request ([0-9a-f]{32})", out)
        assert logged, out[-2000:]
        table = DeltaTable(str(cwd / ".lakehouse" / "warehouse" / "bronze" / "predictions"))
        assert table.to_pyarrow_table()["request_id"].to_pylist() == [logged.group(1)]
        drift = DeltaTable(str(cwd / ".lakehouse" / "warehouse" / "gold" / "feature_drift_daily"))
        assert set(drift.to_pyarrow_table()["predictions"].to_pylist()) == {1}
        report = cwd / ".lakehouse" / "report.html"
        assert f"Report (rows, rejects, freshness, the model, quality, drift): {report}" in out
        assert report.read_text().count("<svg") >= 6
        # Applicants' data (warehouse, online store, models, training sets) is the owner's.
        home = cwd / ".lakehouse"
        shared = [p for p in home.rglob("*") if p.stat().st_mode & 0o077]
        assert not shared, f"readable by others: {shared[:5]}"
        assert {"warehouse", "feast", "models"} <= {p.name for p in home.rglob("*")}
        second = demo(str(cwd))
        assert second.returncode == 0, second.stderr[-3000:]
        assert "[1/4] Postgres already running" in second.stdout
        assert "source already seeded: 45,000 applicants" in second.stdout
        # The source did not change, and the first demo built the marts over its prediction.
        assert "nothing to do" in second.stdout, second.stdout
        assert "Prediction through the API" in second.stdout
    finally:
        EmbeddedPostgres(Settings(home=cwd / ".lakehouse")).destroy()
        shutil.rmtree(cwd, ignore_errors=True)
