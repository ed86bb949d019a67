"""What `lakehouse status` flags from the monitoring marts: drifting features, falling AUC.

The marts (`gold.feature_drift_daily`, `gold.model_quality_daily`) hold the statistics;
the thresholds are settings applied here, when they are read. Only the model versions
that served on the newest day of the log are judged (a replaced version's old drift is
history, not an alarm), each on its latest day with enough data to judge
(`LAKEHOUSE_MONITOR_MIN_COUNT` predictions, or outcomes for AUC): a day of three
predictions says nothing.
"""

from __future__ import annotations

import json
from typing import Any

import polars as pl

from lakehouse.ml import models
from lakehouse.settings import Settings
from lakehouse.storage import Storage


def _read(storage: Storage, name: str) -> pl.DataFrame | None:
    dt = storage.table_or_none("gold", name)
    if dt is None:
        return None
    frame = pl.from_arrow(dt.to_pyarrow_table())
    assert isinstance(frame, pl.DataFrame)
    return frame


def _current(frame: pl.DataFrame) -> pl.Series:
    """Return the versions that served on the newest day of a mart (judged or not)."""
    return frame.filter(pl.col("day") == frame["day"].max())["model_version"].unique()


def _judged_days(frame: pl.DataFrame, current: pl.Series, usable: pl.Expr) -> pl.DataFrame:
    """Each current version's latest day among the `usable` rows."""
    return (
        frame.filter(pl.col("model_version").is_in(current.implode()) & usable)
        .group_by("model_version")
        .agg(pl.col("day").max())
    )


def drifting(settings: Settings, frame: pl.DataFrame) -> list[dict[str, Any]]:
    """Return the drifting features of the current model versions, with the reason."""
    if frame.is_empty():
        return []
    enough = settings.monitor_min_count
    days = _judged_days(frame, _current(frame), pl.col("predictions") >= enough)
    judged = frame.join(days, on=["model_version", "day"])
    out = []
    for row in judged.sort("model_version", "feature").iter_rows(named=True):
        reasons = []
        # The statistics are over the values present: judged on enough of them (a feature
        # missing 97% of the time gives a handful a day, and a handful looks drifted).
        # (A table built before the column existed: until its rebuild, all of them.)
        values = row.get("present", row["predictions"]) >= enough
        numeric = row["kind"] == "numeric"
        if values and numeric and (row["psi"] or 0) > settings.drift_psi:
            reasons.append(f"PSI {row['psi']:.3f} > {settings.drift_psi:g}")
        if values and not numeric and (row["js_distance"] or 0) > settings.drift_js:
            reasons.append(
                f"Jensen-Shannon distance {row['js_distance']:.3f} > {settings.drift_js:g}"
            )
        rise = row["missing_share"] - (row["training_missing_share"] or 0)
        if rise > settings.drift_missing:
            reasons.append(
                f"missing {row['missing_share']:.1%} (training "
                f"{row['training_missing_share'] or 0:.1%})"
            )
        if reasons:
            out.append(
                {
                    "model_version": row["model_version"],
                    "day": row["day"].isoformat(),
                    "feature": row["feature"],
                    "predictions": row["predictions"],
                    "reasons": reasons,
                }
            )
    return out


def falling(
    settings: Settings, frame: pl.DataFrame, evaluation: dict[str, float]
) -> list[dict[str, Any]]:
    """Return the current model versions whose day's AUC fell below evaluation by the margin."""
    if frame.filter(pl.col("roc_auc").is_not_null()).is_empty():
        return []
    # Current: serving on the newest day of the log, whether its outcomes are known yet
    # or not (they come later); judged on its latest day with enough of them.
    usable = pl.col("roc_auc").is_not_null() & (
        pl.col("with_outcome") >= settings.monitor_min_count
    )
    days = _judged_days(frame, _current(frame), usable)
    out = []
    for row in frame.join(days, on=["model_version", "day"]).iter_rows(named=True):
        evaluated = evaluation.get(row["model_version"])
        if evaluated is not None and row["roc_auc"] < evaluated - settings.quality_auc_margin:
            out.append(
                {
                    "model_version": row["model_version"],
                    "day": row["day"].isoformat(),
                    "roc_auc": row["roc_auc"],
                    "evaluation_roc_auc": evaluated,
                    "with_outcome": row["with_outcome"],
                }
            )
    return out


def flags(settings: Settings, storage: Storage) -> dict[str, Any]:
    """Return the monitoring section of `lakehouse status`."""
    drift = _read(storage, "feature_drift_daily")
    quality = _read(storage, "model_quality_daily")
    if drift is None and quality is None:
        return {"built": False}
    evaluation = {}
    registry = models.Registry(storage)
    for version in registry.versions():
        metrics = json.loads(registry.get(version, "metrics.json"))
        evaluation[version] = float(metrics["test"]["roc_auc"])
    return {
        "built": True,
        "drifting": drifting(settings, drift) if drift is not None else [],
        "falling_auc": falling(settings, quality, evaluation) if quality is not None else [],
        "newest_day": str(drift["day"].max()) if drift is not None and drift.height else None,
    }
