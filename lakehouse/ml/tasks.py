"""What the Luigi ML tasks do, and their cheap completion checks.

Materialization and training record the Delta versions of their inputs (a small JSON
file next to the Feast registry, and the model's lineage), so a task is complete exactly
when nothing it read has changed since.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from lakehouse.ml import features, models, online_store
from lakehouse.settings import Settings
from lakehouse.storage import Storage

_GOLD_VIEWS = ("application_features", "applicant_features")


def _state_file(settings: Settings) -> Any:
    return settings.home / "feast" / "materialized.json"


def _gold_versions(storage: Storage) -> dict[str, int]:
    return {name: storage.data_version("gold", name) for name in _GOLD_VIEWS}


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


def _online_store(settings: Settings) -> str:
    """Name the online store the state file speaks of (switching stores reloads all)."""
    if settings.feast_online_store == "postgres":
        from psycopg.conninfo import conninfo_to_dict

        from lakehouse.environment import online_dsn

        info = conninfo_to_dict(online_dsn(settings))  # no password in the name
        where = f"{info.get('host', '')}:{info.get('port', '')}/{info.get('dbname', '')}"
        return f"postgres:{where}/{settings.pg_schema}_online"
    return f"sqlite:{settings.home / 'feast' / 'online_store.db'}"


def _state(settings: Settings) -> dict[str, Any] | None:
    path = _state_file(settings)
    if not path.exists():
        return None
    state: dict[str, Any] = json.loads(path.read_text())
    if state.get("online_store") != _online_store(settings):
        return None
    return state


def materialized_state(settings: Settings) -> dict[str, Any] | None:
    """Return what the last materialization into this online store recorded, if any."""
    return _state(settings)


def materialized(settings: Settings, storage: Storage) -> bool:
    """Tell whether this online store holds the current gold versions.

    The store itself is looked at: it must exist and hold the rows the last
    materialization left (a lost or emptied store is reloaded in full).
    """
    state = _state(settings)
    return (
        state is not None
        and state.get("gold") == _gold_versions(storage)
        and state.get("online_rows") == online_store.row_counts(settings)
    )


def _earliest_change(
    settings: Settings, storage: Storage, before: dict[str, int]
) -> datetime | None:
    """Return the earliest event time among gold rows added or changed since `before`.

    Rows can reach gold long after their event time (a pipeline down for days, a late
    batch); a window on event time alone would never load them. Comparing each gold table
    with its version at the last materialization finds them, whatever their time. Raises
    `LookupError` when that version is gone (vacuumed): the caller reloads everything.
    """
    import duckdb

    from lakehouse import duck

    earliest: datetime | None = None
    con = duck.connect(settings, storage)
    try:
        for name, version in before.items():
            uri = storage.uri("gold", name)
            if storage.data_version("gold", name) == version:
                continue
            try:
                (found,) = con.execute(
                    f"SELECT min(event_timestamp) FROM (SELECT * FROM {duck.scan(uri)} "
                    f"EXCEPT SELECT * FROM {duck.scan(uri, version)})"
                ).fetchone()  # type: ignore[misc]
            except duckdb.Error as exc:
                msg = f"gold.{name} version {version}: {exc}"
                raise LookupError(msg) from None
            if found is not None and (earliest is None or found < earliest):
                earliest = found
    finally:
        con.close()
    return earliest


def materialize(settings: Settings, storage: Storage) -> datetime:
    """Materialize up to now (incrementally after the first time); record what it saw."""
    versions = _gold_versions(storage)
    state = _state(settings)
    if state is not None and state.get("online_rows") != online_store.row_counts(settings):
        state = None  # the store was lost or changed behind our back: reload it in full
        online_store.forget_orphans(settings)
    since = changed_from = None
    if state is not None:
        try:
            changed_from = _earliest_change(settings, storage, state["gold"])
            since = datetime.fromisoformat(state["end"])
        except LookupError:
            since = None  # the last materialized versions are gone: reload everything
    store = features.feature_store(settings, storage)
    if state is None:
        # A first load into this online store (or another store than last time): `apply`
        # creates its tables; the registry alone may have been applied with the old one.
        features.apply(store)
    end = features.materialize(store, since, changed_from)
    path = _state_file(settings)
    tmp = path.with_suffix(".tmp")
    record = {
        "online_store": _online_store(settings),
        "gold": versions,
        "end": end.isoformat(),
        "online_rows": online_store.row_counts(settings),
    }
    tmp.write_text(json.dumps(record))
    tmp.replace(path)
    return end


def _current_inputs(storage: Storage) -> dict[str, int]:
    return models.input_versions(storage)


def training_set_built(settings: Settings, storage: Storage) -> bool:
    """Tell whether the newest stored training set was built from the current inputs."""
    manifest = models.latest_training_set(storage)
    return manifest is not None and manifest["inputs"] == _current_inputs(storage)


def build_training_set(settings: Settings, storage: Storage) -> dict[str, Any]:
    """Build and store the training set through Feast."""
    return models.build_training_set(features.feature_store(settings, storage), storage)


def fitted(settings: Settings, storage: Storage) -> bool:
    """Tell whether a version has been fitted on the newest training set."""
    manifest = models.latest_training_set(storage)
    return manifest is not None and models.fitted_on(storage, manifest["sha256"]) is not None


def fit(settings: Settings, storage: Storage) -> str:
    """Fit a new version on the newest training set; return the version."""
    manifest = models.latest_training_set(storage)
    if manifest is None:
        msg = "no training set has been built; run `lakehouse train` (or the Luigi pipeline)"
        raise models.ModelError(msg)
    return models.fit_version(
        storage, manifest, seed=settings.repeatable_seed, threshold=settings.model_threshold
    )


def trained(settings: Settings, storage: Storage) -> bool:
    """Tell whether the latest complete model was trained on the current input versions."""
    registry = models.Registry(storage)
    versions = registry.versions()
    if not versions:
        return False
    lineage = json.loads(registry.get(versions[-1], "lineage.json"))
    return bool(lineage.get("inputs") == _current_inputs(storage))


def evaluate(settings: Settings, storage: Storage) -> models.TrainResult:
    """Evaluate the version fitted on the newest training set, completing it."""
    manifest = models.latest_training_set(storage)
    version = None if manifest is None else models.fitted_on(storage, manifest["sha256"])
    if manifest is None or version is None:
        msg = "no fitted model to evaluate; run `lakehouse train` (or the Luigi pipeline)"
        raise models.ModelError(msg)
    return models.evaluate_version(storage, version)


def train(settings: Settings, storage: Storage) -> models.TrainResult:
    """Build the training set, fit and evaluate: a complete version (`lakehouse train`)."""
    store = features.feature_store(settings, storage)
    return models.train(
        store, storage, seed=settings.repeatable_seed, threshold=settings.model_threshold
    )
