"""Online features as fresh as the stream: the speed layer's writes to the online store.

With `lakehouse stream --promote`, every micro-batch that changes silver is followed by a
refresh here: the silver history tables are compared with the versions the online store
last reflected (`gold_rows.affected`), the gold feature rows of every entity that change
can touch are recomputed from silver (`gold_rows.rows_for`: the batch's transforms, the
same rows to the bit), and each entity's latest row goes to the online store, marked with
the silver state it comes from. Gold itself is not written: the next batch run builds the
same rows, and its materialization leaves these alone unless it has a newer state.

The online store must have been loaded by a batch materialization first (`lakehouse
run`): the speed layer keeps a store fresh, it does not create one. Refreshes hold the
materialization lock (one writer at a time) and record what they reflected in
`$LAKEHOUSE_HOME/feast/fresh.json`, which `lakehouse status` reads.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl

from lakehouse.errors import TableNotFoundError
from lakehouse.settings import Settings
from lakehouse.storage import KeptTables, Storage, opened_once
from lakehouse.zones import gold_rows
from lakehouse.zones.silver_state import as_one_promotion_left

log = logging.getLogger(__name__)

_VIEWS = {  # online view -> (gold table, entity key)
    "application_features": ("application_features", "application_id"),
    "applicant_features": ("applicant_features", "applicant_id"),
    "applicant_profile": ("applicant_features", "applicant_id"),
}


@dataclass
class Refreshed:
    """What one refresh did (also the record `lakehouse status` reads)."""

    at: str
    silver: dict[str, int]
    """The silver data versions the online store now reflects."""
    applicants: int
    applications: int
    upserted: int
    deleted: int
    seconds: float


def record_path(settings: Settings) -> Path:
    """Where the last refresh is recorded."""
    return settings.home / "feast" / "fresh.json"


def last(settings: Settings) -> dict[str, Any] | None:
    """Return the last refresh's record, if any."""
    path = record_path(settings)
    if not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


_UNSEEN = object()


class Refresher:
    """Keeps the online store's rows of changed entities current with silver."""

    def __init__(self, settings: Settings, storage: Storage) -> None:
        self.settings = settings
        self.storage = storage
        self.seen: dict[str, int] | None = None
        """Silver versions (readable ones) the online store reflects."""
        self._inputs: object = _UNSEEN
        """The gold inputs the last materialization recorded (`ml.tasks`), as last seen."""
        self._lock = threading.Lock()
        self._kept = KeptTables(storage)  # used under the lock only
        self._store: Any = None
        self._con: Any = None  # one DuckDB connection, its extensions loaded once

    def warm(self) -> None:
        """Open Feast and DuckDB ahead of the first refresh (seconds of imports).

        Called in a background thread when the stream starts; a failure is left for the
        first refresh to report.
        """
        from lakehouse import duck
        from lakehouse.ml import tasks as ml_tasks

        if ml_tasks.materialized_state(self.settings) is None:
            return  # nothing to keep fresh yet: no Feast import for nothing
        try:
            with self._lock:
                self._feast()
                if self._con is None:
                    self._con = duck.connect(self.settings, self.storage)
        except Exception as exc:  # the refresh that needs it says so
            log.debug("online refresher not warmed up: %s", exc)

    def _start(self, now: dict[str, int]) -> dict[str, int]:
        """Start from the silver versions gold was built from (readable), else from now."""
        from lakehouse.zones.gold_marks import built_from, same_inputs

        start = built_from(self.storage, "application_features")
        if not set(start) >= set(gold_rows.SOURCES):
            log.warning("gold was never built: online features refresh from now on")
            return now
        if not same_inputs(self.storage, "application_features"):
            log.warning(
                "silver tables were made anew (or gold predates this version) since gold was "
                "built: online features stay as they are until the next batch run rebuilds "
                "gold and reloads them; fresh from then on"
            )
            return now
        return {name: start[name] for name in gold_rows.SOURCES}

    def _feast(self) -> Any:
        if self._store is None:
            from lakehouse.ml import features

            self._store = features.feature_store(self.settings, self.storage)
        return self._store

    def refresh(self) -> Refreshed | None:
        """Write the online rows of what changed in silver since the last refresh.

        Returns None when nothing changed, or when there is no online store to keep fresh
        yet (no batch materialization into it).
        """
        from lakehouse.ml import tasks as ml_tasks

        with self._lock, opened_once(self._kept):  # the tables opened here are the ones read
            state = ml_tasks.materialized_state(self.settings)
            if state is None:
                return None
            inputs = state.get("inputs")
            if inputs != self._inputs and self._inputs is not _UNSEEN:
                # A materialization reloaded the store from gold built on silver made anew,
                # over rows this refresher wrote since: diff again from gold's own state.
                self.seen = None
            self._inputs = inputs
            # Never half a promotion: the speed layer's next one may be committing now.
            tables = as_one_promotion_left(self.storage, list(gold_rows.SOURCES))
            for name in gold_rows.SOURCES:
                if name not in tables:
                    msg = f"table `silver.{name}` does not exist yet; run `lakehouse run`"
                    raise TableNotFoundError(msg)
            now = {n: dt.version() for n, dt in tables.items()}
            if self.seen is None:
                self.seen = self._start(now)
            if now == self.seen:
                return None
            data = {n: self.storage.data_version("silver", n, dt) for n, dt in tables.items()}
            with ml_tasks.one_at_a_time(self.settings):
                done = self._refresh(self.seen, now, data)
            self.seen = now
            return done

    def _refresh(
        self, before: dict[str, int], now: dict[str, int], data: dict[str, int]
    ) -> Refreshed:
        from lakehouse.ml import materialize
        from lakehouse.ml.online.store import _LakehouseOnlineStore

        started = time.perf_counter()
        if self._con is None:
            from lakehouse import duck

            self._con = duck.connect(self.settings, self.storage)
        try:
            changed = gold_rows.affected(self.storage, before, now)
        except LookupError as exc:  # the version last reflected was vacuumed
            log.warning("online refresh skipped (%s); the next batch run catches up", exc)
            changed = gold_rows.Affected(frozenset(), frozenset(), frozenset())
        rows = gold_rows.rows_for(self.settings, self.storage, changed, now, self._con)
        store = self._feast()
        online = store._get_provider().online_store
        assert isinstance(online, _LakehouseOnlineStore)
        tables = online.tables(store.config)
        end = datetime.now(UTC)
        upserted = deleted = 0
        for view_name, (gold_table, key) in _VIEWS.items():
            view = materialize.View.of(store.get_feature_view(view_name))
            frame = (
                rows.application_features if key == "application_id" else rows.applicant_features
            )
            wanted = rows.applications if key == "application_id" else rows.applicants
            latest = _latest(frame, key, end)
            version = gold_rows.watermark(data, gold_table)
            encoded = materialize.encoded(view, latest.rename({key: "entity_key"}))
            tables.upsert(view_name, encoded, version)
            gone = sorted(set(wanted) - set(latest[key].to_list()))
            tables.delete(view_name, gone, version)
            upserted += encoded.height
            deleted += len(gone)
        done = Refreshed(
            at=end.isoformat(),
            silver=data,
            applicants=len(rows.applicants),
            applications=len(rows.applications),
            upserted=upserted,
            deleted=deleted,
            seconds=round(time.perf_counter() - started, 3),
        )
        path = record_path(self.settings)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(done)))
        tmp.replace(path)
        return done


def _latest(frame: pl.DataFrame, key: str, end: datetime) -> pl.DataFrame:
    """Each entity's latest row at or before `end`, with `event_ts` in microseconds."""
    due = frame.filter(pl.col("event_timestamp") <= end)
    return (
        due.sort(key, "event_timestamp")
        .group_by(key, maintain_order=True)
        .last()
        .with_columns(event_ts=pl.col("event_timestamp").dt.epoch("us"))
    )
