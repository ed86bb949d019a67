"""What the report shows, read from the lakehouse (the I/O side of the report)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import polars as pl

from lakehouse import duck
from lakehouse.settings import Settings
from lakehouse.status import Status
from lakehouse.storage import Storage

if TYPE_CHECKING:
    import duckdb

log = logging.getLogger(__name__)

SOURCE_TABLES = ("applicants", "loan_applications")


@dataclass
class ReportData:
    """Everything the page draws; a part that could not be read holds why instead."""

    at: datetime
    warehouse: str
    status: Status
    versions_per_day: dict[str, pl.DataFrame] = field(default_factory=dict)
    """Per source table: `day`, `versions` accepted into silver that day (by `valid_from`)."""
    rejects_per_day: dict[str, pl.DataFrame] = field(default_factory=dict)
    """Per source table: `day`, `rule`, `rejects` (versions that failed that rule first)."""
    model: dict[str, Any] | None = None
    """The served (latest) model: version, metrics, curves."""
    quality: pl.DataFrame | None = None
    drift: pl.DataFrame | None = None
    errors: dict[str, str] = field(default_factory=dict)


def _query(con: duckdb.DuckDBPyConnection, sql: str) -> pl.DataFrame:
    frame = pl.from_arrow(con.execute(sql).to_arrow_table())
    assert isinstance(frame, pl.DataFrame)
    return frame


def _table(storage: Storage, zone: str, name: str) -> pl.DataFrame | None:
    dt = storage.table_or_none(zone, name)
    if dt is None:
        return None
    frame = pl.from_arrow(dt.to_pyarrow_table())
    assert isinstance(frame, pl.DataFrame)
    return frame


def collect(settings: Settings, storage: Storage) -> ReportData:
    """Read every part of the report; a part that fails is named on the page, not fatal."""
    from lakehouse import status as state_of
    from lakehouse.errors import described
    from lakehouse.ml import models
    from lakehouse.ml import status as ml_status

    data = ReportData(
        at=datetime.now(UTC),
        warehouse=storage.root,
        status=state_of.collect(settings, storage, ml_status.features),
    )

    def rows() -> None:
        con = duck.connect(settings, storage)  # one connection: each loads the extensions
        try:
            _rows(con)
        finally:
            con.close()

    def _rows(con: duckdb.DuckDBPyConnection) -> None:
        for table in SOURCE_TABLES:
            history = storage.uri("silver", f"{table}_history")
            rejected = storage.uri("silver", f"{table}_rejected")
            if storage.table_or_none("silver", f"{table}_history") is not None:
                data.versions_per_day[table] = _query(
                    con,
                    f"SELECT CAST(valid_from AS DATE) AS day, count(*) AS versions "
                    f"FROM {duck.scan(history)} GROUP BY ALL ORDER BY day",
                )
            if storage.table_or_none("silver", f"{table}_rejected") is not None:
                data.rejects_per_day[table] = _query(
                    con,
                    f"SELECT CAST(valid_from AS DATE) AS day, _rule AS rule, count(*) AS rejects "
                    f"FROM {duck.scan(rejected)} GROUP BY ALL ORDER BY day, rule",
                )

    def model() -> None:
        registry = models.Registry(storage)
        versions = registry.versions()
        if versions:
            version = versions[-1]
            data.model = {
                "version": version,
                "metrics": json.loads(registry.get(version, "metrics.json")),
                "lineage": json.loads(registry.get(version, "lineage.json")),
                "curves": models.version_curves(storage, version),
            }

    def monitoring() -> None:
        data.quality = _table(storage, "gold", "model_quality_daily")
        data.drift = _table(storage, "gold", "feature_drift_daily")

    for part, read in (("rows", rows), ("model", model), ("monitoring", monitoring)):
        try:
            read()
        except Exception as exc:  # the page says which part is missing and why
            log.warning("report: %s could not be read: %s", part, described(exc))
            data.errors[part] = described(exc)
    return data
