"""Monitoring marts benchmark: building quality and drift over a large inference log.

Run by hand (about 5 minutes at 1M predictions)::

    .venv/bin/python benchmarks/monitoring.py                      # 1M logged predictions
    .venv/bin/python benchmarks/monitoring.py --predictions 100000

Under a temporary home with an embedded Postgres (fsync off): `lakehouse seed --rows
45000` and `lakehouse run` (a trained model). Then N predictions are logged the way the
API lands them (appends of 10,000 rows to `bronze.predictions`, the schema of
`lakehouse.ml.monitor.inference_log`): feature vectors drawn from the model's training
set, scored by the model, spread over 30 days, for applications in silver (so outcomes
join), with the amounts of the last 5 days scaled by 1.5 (a drift to find).

Measured, each in a child process (wall time and its own peak RSS), 3 rounds, fresh
tables each round: the three monitoring builds `lakehouse run` makes
(`gold.prediction_outcomes`, `gold.model_quality_daily`, `gold.feature_drift_daily`, by
`lakehouse.zones.gold.build`). In the same run:

- **Floor**: DuckDB reading what the marts must read, in one plain query each over the
  same Delta table, with no bookkeeping and no write: the log joined to silver's
  outcomes and grouped per version and day (quality's floor), and every feature
  extracted from the JSON vectors and counted per day (drift's floor).
- **Baseline**: the same figures the way a notebook computes them: the log and silver to
  pandas, `json.loads` per vector, then scikit-learn's `roc_auc_score` and
  `brier_score_loss` per version and day, and numpy's quantile bins for PSI per feature
  and day.

The Markdown report is printed and written to `benchmarks/results/monitoring-<timestamp>.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from features import (  # the sibling benchmark's helpers
    FAST_PG,
    PEAK_RSS,
    RESULTS,
    ROOT,
    child_env,
    git_state,
    lakehouse,
    log,
    run_child,
    size,
)

ROUNDS = 3
LANDING = 10_000
"""Rows per append, as the API lands them by default (`LAKEHOUSE_PREDICTION_LOG_RECORDS`)."""
DAYS = 30

BUILD = """
import sys, time
import lakehouse.ml.monitor.drift  # provides the drift references
from lakehouse.settings import Settings
from lakehouse.storage import Storage
from lakehouse.zones import gold

settings = Settings.from_env()
storage = Storage.from_settings(settings)
start = time.perf_counter()
gold.build(settings, storage, sys.argv[1])
print(f"build_seconds={time.perf_counter() - start}", file=sys.stderr)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report
# the benchmark's own peak (the million rows it generated) as its own.
peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(f"peak_rss_kib={int(peak.split()[1])}", file=sys.stderr)
"""


def log_predictions(settings: Any, storage: Any, n: int) -> int:
    """Land `n` predictions in `bronze.predictions` as the API would; return the appends."""
    import numpy as np
    import pyarrow as pa
    from deltalake import write_deltalake

    from lakehouse.ml import models
    from lakehouse.ml.monitor import inference_log

    version, trained = models.load(storage)
    frame = models.stored_training_set(storage, version)
    rng = np.random.default_rng(7)
    rows = frame.iloc[rng.integers(0, len(frame), n)].reset_index(drop=True)
    day = rng.integers(0, DAYS, n)
    late = day >= DAYS - 5
    rows.loc[late, "loan_amnt"] = rows.loc[late, "loan_amnt"] * 1.5
    probability = trained.predict_proba(rows)
    start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start -= timedelta(days=DAYS)
    served = [start + timedelta(days=int(d), seconds=int(s)) for d, s in
              zip(day, rng.integers(0, 86_400, n), strict=True)]  # fmt: skip
    columns = trained.columns
    vectors = rows[columns].astype(object).where(rows[columns].notna(), None)
    features = [json.dumps(dict(zip(columns, v, strict=True))) for v in vectors.itertuples(False)]
    table = pa.table(
        {
            "request_id": [f"bench-{i}" for i in range(n)],
            "served_at": pa.array(served, pa.timestamp("us", tz="UTC")),
            "model_version": [version] * n,
            "application_id": pa.array(rows["application_id"], pa.int64()),
            "applicant_id": pa.nulls(n, pa.int64()),
            "features": features,
            "probability": probability,
            "decision": np.where(probability >= trained.threshold, "approve", "reject"),
            "threshold": [trained.threshold] * n,
            "latency_ms": rng.uniform(0.3, 2.0, n),
            "features_event_ts": pa.nulls(n, pa.timestamp("us", tz="UTC")),
            "online_refreshed_at": pa.nulls(n, pa.timestamp("us", tz="UTC")),
            "writer": ["bench"] * n,
        }
    ).cast(inference_log.SCHEMA)
    inference_log.ensure_table(storage)
    uri = storage.uri("bronze", "predictions")
    appends = 0
    for offset in range(0, n, LANDING):
        write_deltalake(
            uri, table.slice(offset, LANDING), mode="append", storage_options=storage.options
        )
        appends += 1
    return appends


def floors(settings: Any, storage: Any) -> dict[str, float]:
    """Time the plain DuckDB queries that read what the marts read."""
    from lakehouse import duck
    from lakehouse.ml import models

    version = models.Registry(storage).latest()
    used = models.stored_training_set(storage, version).columns
    paths = [f'$."{c}"' for c in used if c not in ("application_id", "applicant_id", "label")]
    predictions = duck.scan(storage.uri("bronze", "predictions"))
    silver = duck.scan(storage.uri("silver", "loan_applications"))
    queries = {
        "quality": f"""
            SELECT p.model_version, CAST(p.served_at AS DATE) AS day, count(*),
                   avg(p.probability), avg(a.loan_status)
            FROM {predictions} AS p JOIN {silver} AS a USING (application_id)
            WHERE a.loan_status IS NOT NULL GROUP BY ALL""",
        "drift": f"""
            SELECT day, count(*), sum(len(list_filter(v, lambda x: x IS NULL)))
            FROM (SELECT CAST(served_at AS DATE) AS day,
                         json_extract_string(features, {paths!r}) AS v FROM {predictions})
            GROUP BY ALL""",
    }
    out = {}
    for name, sql in queries.items():
        times = []
        for _ in range(ROUNDS):
            con = duck.connect(settings, storage)
            start = time.perf_counter()
            con.execute(sql).fetchall()
            times.append(time.perf_counter() - start)
            con.close()
        out[name] = statistics.median(times)
    return out


def baseline(storage: Any) -> float:
    """Time the notebook way: pandas, json.loads, scikit-learn and numpy per group."""
    import numpy as np
    import polars as pl
    from sklearn.metrics import brier_score_loss, roc_auc_score

    from lakehouse.ml import models

    start = time.perf_counter()
    log_frame = pl.read_delta(
        storage.uri("bronze", "predictions"), storage_options=storage.options
    ).to_pandas()
    silver = pl.read_delta(
        storage.uri("silver", "loan_applications"), storage_options=storage.options
    ).to_pandas()[["application_id", "loan_status"]]
    log_frame["day"] = log_frame["served_at"].dt.date
    joined = log_frame.merge(silver.dropna(), on="application_id")
    for _, group in joined.groupby(["model_version", "day"]):
        y = group["loan_status"].to_numpy()
        if 0 < y.sum() < len(y):
            roc_auc_score(y, group["probability"])
        brier_score_loss(y, group["probability"])
    vectors = [json.loads(v) for v in log_frame["features"]]
    version = log_frame["model_version"].iloc[0]
    training = models.stored_training_set(storage, version)
    for column in vectors[0]:
        if training[column].dtype.kind not in "fiu":
            continue
        edges = np.unique(np.quantile(training[column].dropna(), np.arange(1, 10) / 10))
        expected = np.bincount(np.searchsorted(edges, training[column].dropna()), minlength=10)
        values = np.array([v[column] if v[column] is not None else np.nan for v in vectors])
        for day in log_frame["day"].unique():
            served = values[(log_frame["day"] == day).to_numpy()]
            served = served[~np.isnan(served)]
            a = np.bincount(np.searchsorted(edges, served), minlength=len(expected))
            a = np.maximum(a / max(1, a.sum()), 1e-4)
            e = np.maximum(expected / expected.sum(), 1e-4)
            float(np.sum((a - e) * np.log(a / e)))
    return time.perf_counter() - start


def run(n: int) -> list[str]:
    from lakehouse.settings import Settings
    from lakehouse.source.embedded import EmbeddedPostgres
    from lakehouse.storage import Storage
    from lakehouse.transforms.gold import MONITORING

    scratch = Path(tempfile.mkdtemp(prefix="lakehouse-monbench-", dir="/tmp"))
    scratch.chmod(0o755)  # as root, the `postgres` OS user must traverse it
    home = scratch / "home"
    home.mkdir(mode=0o755)
    env = child_env(home)
    pg = EmbeddedPostgres(Settings(home=home), extra_options=FAST_PG)
    previous = os.environ.get("LAKEHOUSE_HOME")
    os.environ["LAKEHOUSE_HOME"] = str(home)
    try:
        pg.start()
        log("seeding 45,000 rows and running the pipeline with training")
        lakehouse(env, "seed", "--rows", "45000")
        lakehouse(env, "run")
        settings = Settings.from_env(env)
        storage = Storage.from_settings(settings)
        log(f"logging {n:,} predictions")
        started = time.perf_counter()
        appends = log_predictions(settings, storage, n)
        logged_in = time.perf_counter() - started
        builds: dict[str, list[tuple[float, float, int]]] = {name: [] for name in MONITORING}
        for round_ in range(ROUNDS):
            log(f"round {round_ + 1}: the monitoring builds")
            for name in MONITORING:
                shutil.rmtree(Path(storage.uri("gold", name)), ignore_errors=True)
            for name in MONITORING:  # outcomes first: quality reads them
                child = run_child(env, BUILD, name)
                builds[name].append((child.values["build_seconds"], child.seconds, child.peak_rss))
        log("floors and baseline")
        floor = floors(settings, storage)
        base = [baseline(storage) for _ in range(ROUNDS)]
        rows = storage.table("gold", "feature_drift_daily").count()
        status = run_child(env, PEAK_RSS, "status").stdout
        monitoring = status[status.index("  monitoring") :] if "  monitoring" in status else status
    finally:
        pg.destroy()
        if previous is None:
            os.environ.pop("LAKEHOUSE_HOME", None)
        else:
            os.environ["LAKEHOUSE_HOME"] = previous
        shutil.rmtree(scratch, ignore_errors=True)

    def median(name: str, i: int) -> float:
        return statistics.median(b[i] for b in builds[name])

    ours = sum(median(name, 0) for name in MONITORING)
    quality = median("prediction_outcomes", 0) + median("model_quality_daily", 0)
    lines = [
        f"## Monitoring marts at {n:,} logged predictions",
        "",
        f"- commit {git_state()}; {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; "
        f"load average at the end {os.getloadavg()[0]:.2f}",
        f"- logged in {appends} appends of {LANDING:,} in {logged_in:.1f} s; "
        f"`gold.feature_drift_daily` has {rows:,} rows",
        "",
        "| build | median of 3 (s) | each round (s) | child wall (s) | peak RSS |",
        "|---|---|---|---|---|",
    ]
    for name in MONITORING:
        each = ", ".join(f"{b[0]:.2f}" for b in builds[name])
        peak = max(b[2] for b in builds[name])
        lines.append(
            f"| `gold.{name}` | {median(name, 0):.2f} | {each} | {median(name, 1):.2f} | "
            f"{size(peak)} |"
        )
    lines += [
        "",
        "| comparison | seconds | ratio |",
        "|---|---|---|",
        f"| quality (outcomes + daily quality) against its floor | {quality:.2f} vs "
        f"{floor['quality']:.2f} | {quality / floor['quality']:.1f}x the floor |",
        f"| drift against its floor (every feature out of the JSON) | "
        f"{median('feature_drift_daily', 0):.2f} vs {floor['drift']:.2f} | "
        f"{median('feature_drift_daily', 0) / floor['drift']:.1f}x the floor |",
        f"| all three against the notebook baseline (median of 3: "
        f"{', '.join(f'{b:.1f}' for b in base)}) | {ours:.2f} vs {statistics.median(base):.2f} "
        f"| {statistics.median(base) / ours:.1f}x faster |",
        "",
        "`lakehouse status` after the builds (its monitoring lines):",
        "",
        "```text",
        monitoring.rstrip(),
        "```",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--predictions", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    lines = run(args.predictions)
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"monitoring-{datetime.now(UTC):%Y%m%d-%H%M%S}.md"
    out.write_text(text)
    log(f"written to {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
