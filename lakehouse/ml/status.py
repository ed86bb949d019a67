"""The feature store and model section of `lakehouse status`, with online freshness.

Freshness of the online store is measured against silver, which the tables section
measures against the source: the online store reflects a silver state (the one the last
stream refresh read, or the one gold was built from when the last materialization is
current), and is behind by the age of the oldest silver commit it does not reflect yet.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from lakehouse.errors import described
from lakehouse.ml import fresh, models
from lakehouse.ml import tasks as ml_tasks
from lakehouse.ml.monitor import inference_log, watch
from lakehouse.settings import Settings
from lakehouse.storage import Storage
from lakehouse.zones.gold_rows import SOURCES


def features(settings: Settings, storage: Storage) -> dict[str, Any]:
    """Return the online store's state and freshness, and the latest model's."""
    state = ml_tasks.materialized_state(settings)
    current = ml_tasks.materialized(settings, storage) if state else False
    registry = models.Registry(storage)
    versions = registry.versions()
    out: dict[str, Any] = {
        "online_store": settings.feast_online_store,
        "materialized_up_to": state.get("end") if state else None,
        "online_store_current": current,
        **(online_freshness(settings, storage, current) if state else {}),
        "model_version": versions[-1] if versions else None,
        "model_current": ml_tasks.trained(settings, storage) if versions else False,
        "prediction_log": inference_log.summary(settings),
        "monitoring": _monitoring(settings, storage),
    }
    if versions:
        metrics = json.loads(registry.get(versions[-1], "metrics.json"))
        out["model_summary"] = models.summary(metrics)
    return out


def _monitoring(settings: Settings, storage: Storage) -> dict[str, Any]:
    """Return the monitoring flags, or why they could not be read (the rest stays)."""
    try:
        return watch.flags(settings, storage)
    except Exception as exc:
        return {"error": described(exc)}


def online_freshness(settings: Settings, storage: Storage, materialized: bool) -> dict[str, Any]:
    """Return which silver state the online store reflects and how far behind silver it is."""
    from lakehouse.zones.gold_marks import built_from

    now = {name: storage.data_version("silver", name) for name in SOURCES}
    candidates = []
    refreshed = fresh.last(settings)
    if refreshed is not None:
        candidates.append(refreshed["silver"])
    if materialized:
        candidates.append(built_from(storage, "application_features"))
    reflected = {name: max((c.get(name, -1) for c in candidates), default=-1) for name in SOURCES}
    behind = 0.0
    at = datetime.now(UTC)
    for name in SOURCES:
        if reflected[name] < now[name]:
            first_missing = _committed_at(storage, name, reflected[name] + 1)
            if first_missing is not None:
                behind = max(behind, (at - first_missing).total_seconds())
    return {
        "online_reflects_silver": reflected,
        "online_current_with_silver": all(reflected[n] >= now[n] for n in SOURCES),
        "online_behind_silver_seconds": round(behind, 3),
        "online_refreshed_by_stream_at": refreshed["at"] if refreshed else None,
    }


def _committed_at(storage: Storage, table: str, version: int) -> datetime | None:
    """Return when a silver version was committed (from its Delta log entry)."""
    entry = storage.commit_log("silver", table, version)
    if entry is None:
        return None
    for line in entry.decode().splitlines():
        info = json.loads(line).get("commitInfo")
        if info and "timestamp" in info:
            return datetime.fromtimestamp(info["timestamp"] / 1000, tz=UTC)
    return None
