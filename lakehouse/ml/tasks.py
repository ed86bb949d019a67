"""What the Luigi ML tasks do, and their cheap completion checks.

Materialization and training record the Delta versions of their inputs (a small JSON
file next to the Feast registry, and the model's lineage), so a task is complete exactly
when nothing it read has changed since.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from lakehouse.ml import features, models
from lakehouse.ml import online as online_store
from lakehouse.settings import Settings
from lakehouse.storage import Storage

_GOLD_VIEWS = ("application_features", "applicant_features")


def state_file(settings: Settings) -> Any:
    """Where the last materialization into this home's online store is recorded."""
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
    return f"sqlite:{online_store.sqlite_path(settings)}"


def _state(settings: Settings) -> dict[str, Any] | None:
    path = state_file(settings)
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

    The store itself is looked at: it must hold rows in every view, from the full load
    the last materialization recorded (a lost, emptied or recreated store is reloaded in
    full). Row counts are not compared: the stream adds rows between materializations.
    """
    state = _state(settings)
    return (
        state is not None
        and state.get("gold") == _gold_versions(storage)
        and online_store.intact(settings, state.get("loads"))
    )


@contextlib.contextmanager
def one_at_a_time(settings: Settings) -> Iterator[None]:
    """Hold the materialization lock: one materialization writes the store at a time.

    Two at once could each pin another gold version and the older one land last, its
    state then telling the next run to diff from the wrong version. The second waits.
    """
    import fcntl

    path = settings.home / "feast" / "materialize.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class Materialized:
    """What a materialization did: its end, and per view the rows written and removed."""

    end: datetime
    views: list[Any]
    """`lakehouse.ml.materialize.Written` per view."""

    def summary(self) -> str:
        """Say it in one line."""
        parts = []
        for w in self.views:
            how = "in full" if w.full else "changed"
            parts.append(f"{w.view} {w.upserted} {how}, {w.deleted} removed")
        return "; ".join(parts)


def materialize(settings: Settings, storage: Storage) -> Materialized:
    """Materialize up to now (only changed entities after the first time); record it."""
    with one_at_a_time(settings):
        return _materialize(settings, storage)


def _materialize(settings: Settings, storage: Storage) -> Materialized:
    from lakehouse import duck
    from lakehouse.ml import materialize as load
    from lakehouse.ml.online.store import _LakehouseOnlineStore
    from lakehouse.zones.gold_marks import built_from, inputs_mark
    from lakehouse.zones.gold_rows import watermark

    tables = {name: storage.table("gold", name) for name in _GOLD_VIEWS}
    versions = {name: storage.data_version("gold", name, dt) for name, dt in tables.items()}
    # Which silver tables each gold table was built from (`gold_marks.inputs_mark`).
    inputs = {name: inputs_mark(dt, name) for name, dt in tables.items()}
    state = _state(settings)
    if state is not None and not online_store.intact(settings, state.get("loads")):
        state = None  # the store was lost or emptied behind our back: reload it in full
        online_store.forget_orphans(settings)
    store = features.feature_store(settings, storage)
    if state is None:
        # A first load into this online store (or another store than last time): `apply`
        # creates its tables; the registry alone may have been applied with the old one.
        features.apply(store)
    online = store._get_provider().online_store
    if not isinstance(online, _LakehouseOnlineStore):
        msg = "feature_store.yaml must select the lakehouse online store (see README)"
        raise features.FeatureStoreError(msg)
    target = online.tables(store.config)
    by_uri = {storage.uri("gold", name): name for name in _GOLD_VIEWS}
    views = [store.get_feature_view(name) for name in online_store.VIEWS]
    end = load.now()
    con = duck.connect(settings, storage)
    written = []
    try:
        for feast_view in views:
            view = load.View.of(feast_view)
            gold_name = by_uri[view.source]
            current = tables[gold_name].version()
            silver = watermark(built_from(storage, gold_name, tables[gold_name]), gold_name)
            emptied = target.ensure(view.name, view.fields, view.key_kind)
            anew = (
                state is not None
                and state.get("inputs", inputs).get(gold_name) != inputs[gold_name]
            )
            if anew and not emptied:
                # Silver made anew since: its versions count from 0, and every row from it
                # would look older than the stored ones. They are all replaced, in full.
                target.forget_versions(view.name)
            if state is not None and not emptied and not anew:
                try:
                    done = load.incremental(
                        con,
                        target,
                        view,
                        state["gold"][gold_name],
                        current,
                        datetime.fromisoformat(state["end"]),
                        end,
                        silver,
                    )
                    written.append(done)
                    continue
                except LookupError:
                    pass  # the last materialized version is gone: load this view in full
            written.append(load.full(con, target, view, current, end, silver))
    finally:
        con.close()
    start = datetime.fromisoformat(state["end"]) if state else load.FIRST
    load.record_in_registry(store, views, start, end)
    path = state_file(settings)
    tmp = path.with_suffix(".tmp")
    record = {
        "online_store": _online_store(settings),
        "gold": versions,
        "inputs": inputs,
        "end": end.isoformat(),
        "loads": {view.name: target.load(view.name) for view in views},
    }
    tmp.write_text(json.dumps(record))
    tmp.replace(path)
    return Materialized(end, written)


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
