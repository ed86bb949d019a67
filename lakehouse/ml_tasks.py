"""What the Luigi ML tasks do, and their cheap completion checks.

Materialization and training record the Delta versions of their inputs (a small JSON
file next to the Feast registry, and the model's lineage), so a task is complete exactly
when nothing it read has changed since.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from lakehouse import features, models
from lakehouse.settings import Settings
from lakehouse.storage import Storage

_GOLD_VIEWS = ("application_features", "applicant_features")


def _state_file(settings: Settings) -> Any:
    return settings.home / "feast" / "materialized.json"


def _gold_versions(storage: Storage) -> dict[str, int]:
    return {name: storage.table("gold", name).version() for name in _GOLD_VIEWS}


def applied(settings: Settings, storage: Storage) -> bool:
    """Tell whether the feature service is registered."""
    if not (settings.home / "feast" / "registry.db").exists():
        return False
    try:
        features.require_applied(features.feature_store(settings, storage))
    except features.FeatureStoreError:
        return False
    return True


def apply(settings: Settings, storage: Storage) -> list[str]:
    """Register the Feast repository."""
    return features.apply(features.feature_store(settings, storage))


def materialized(settings: Settings, storage: Storage) -> bool:
    """Tell whether the online store holds the current gold versions."""
    path = _state_file(settings)
    if not path.exists():
        return False
    return json.loads(path.read_text()).get("gold") == _gold_versions(storage)


def materialize(settings: Settings, storage: Storage) -> datetime:
    """Materialize up to now (incrementally after the first time); record what it saw."""
    versions = _gold_versions(storage)
    path = _state_file(settings)
    since = None
    if path.exists():
        since = datetime.fromisoformat(json.loads(path.read_text())["end"])
    end = features.materialize(features.feature_store(settings, storage), since)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"gold": versions, "end": end.isoformat()}))
    tmp.replace(path)
    return end


def trained(settings: Settings, storage: Storage) -> bool:
    """Tell whether the latest model was trained on the current input versions."""
    registry = models.Registry(storage)
    versions = registry.versions()
    if not versions:
        return False
    lineage = json.loads(registry.get(versions[-1], "lineage.json"))
    current = {f"{z}.{t}": storage.table(z, t).version() for z, t in models.INPUT_TABLES}
    return bool(lineage.get("inputs") == current)


def train(settings: Settings, storage: Storage) -> models.TrainResult:
    """Train and register a model version."""
    store = features.feature_store(settings, storage)
    return models.train(store, storage, seed=settings.seed, threshold=settings.model_threshold)
