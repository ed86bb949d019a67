"""The feature store and model section of `lakehouse status`."""

from __future__ import annotations

import json
from typing import Any

from lakehouse.ml import models
from lakehouse.ml import tasks as ml_tasks
from lakehouse.settings import Settings
from lakehouse.storage import Storage


def features(settings: Settings, storage: Storage) -> dict[str, Any]:
    """Return the online store's state and the latest model's."""
    state = ml_tasks.materialized_state(settings)
    registry = models.Registry(storage)
    versions = registry.versions()
    out: dict[str, Any] = {
        "online_store": settings.feast_online_store,
        "materialized_up_to": state.get("end") if state else None,
        "online_store_current": ml_tasks.materialized(settings, storage) if state else False,
        "model_version": versions[-1] if versions else None,
        "model_current": ml_tasks.trained(settings, storage) if versions else False,
    }
    if versions:
        metrics = json.loads(registry.get(versions[-1], "metrics.json"))
        out["model_summary"] = models.summary(metrics)
    return out
