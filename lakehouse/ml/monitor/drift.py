"""The references `gold.feature_drift_daily` compares served features with.

A model version's reference summarises the training set it was fitted from (the stored
set its `training_set.json` names), for the features it uses, as the bins of
`lakehouse.transforms.drift.reference`. A version's training set never changes, so its
reference is computed once and kept beside the model as `drift_reference.json`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from lakehouse.ml import models
from lakehouse.ml.scoring import is_boolean, is_categorical
from lakehouse.storage import Storage
from lakehouse.transforms import drift
from lakehouse.zones import gold

if TYPE_CHECKING:
    import duckdb

log = logging.getLogger(__name__)

REFERENCE_FILE = "drift_reference.json"
FORMAT = 1
"""Version of the cached reference's layout and binning: a cache of another format (an
older binning) is recomputed, not trusted."""

SCHEMA = pa.schema(
    [
        ("model_version", pa.string()),
        ("feature", pa.string()),
        ("kind", pa.string()),
        ("path", pa.string()),
        ("edges", pa.list_(pa.float64())),
        ("levels", pa.list_(pa.string())),
        ("expected", pa.list_(pa.float64())),
        ("training_rows", pa.int64()),
        ("training_missing_share", pa.float64()),
    ]
)
assert tuple(SCHEMA.names) == drift.REFERENCE_COLUMNS


def version_reference(storage: Storage, version: str) -> list[dict[str, Any]] | None:
    """Return a model version's reference, one entry per feature it uses (cached).

    None for a version without a stored training set (trained before the registry kept
    them): there is nothing to compare with.
    """
    registry = models.Registry(storage)
    found = registry.find(version, REFERENCE_FILE)
    cached = json.loads(found) if found is not None else None
    if isinstance(cached, dict) and cached.get("format") == FORMAT:
        features: list[dict[str, Any]] = cached["features"]
        return features
    if registry.find(version, "training_set.json") is None:
        return None
    frame = models.stored_training_set(storage, version)
    used = json.loads(registry.get(version, "metrics.json"))["features_used"]
    out = []
    for feature in used:
        series = frame[feature]
        kind: drift.Kind = (
            "categorical" if is_categorical(series) or is_boolean(series) else "numeric"
        )
        out.append(drift.reference(feature, kind, series.astype(object).tolist()))
    registry.put(version, REFERENCE_FILE, json.dumps({"format": FORMAT, "features": out}).encode())
    return out


def references(storage: Storage, versions: Iterable[str]) -> pa.Table:
    """Return the `drift_reference` relation for these model versions.

    A version no longer in the registry (its folder removed by hand), or without a
    stored training set (trained before the registry kept them), has no reference: its
    predictions get no drift rows, and a warning says why.
    """
    known = set(models.Registry(storage).versions())
    rows: list[dict[str, Any]] = []
    for version in sorted(versions):
        if version not in known:
            log.warning(
                "model version %s served predictions but is not in the registry: "
                "no drift is measured for it",
                version,
            )
            continue
        reference = version_reference(storage, version)
        if reference is None:
            log.warning(
                "model version %s has no stored training set: no drift is measured for it",
                version,
            )
            continue
        rows.extend({"model_version": version, **r} for r in reference)
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def register(storage: Storage, con: duckdb.DuckDBPyConnection) -> None:
    """Register `drift_reference` for the versions in the `predictions` view."""
    found = con.execute("SELECT DISTINCT model_version FROM predictions").fetchall()
    versions = [v for (v,) in found]
    con.register("drift_reference", references(storage, versions))


gold.REFERENCES["drift_reference"] = register
