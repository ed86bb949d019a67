"""Training the loan-approval model from Feast, and the model registry in the lakehouse.

A training set is Feast's point-in-time join for decided applications at their
`applied_at`, labelled from silver. A trained version is a folder
`models/loan_approval/<version>/` next to the zones (local disk or S3) holding
`model.joblib`, `metrics.json` and `lineage.json` (the Delta version of every input
table, the feature references, a hash of the training set). Training runs in three steps
(the Luigi tasks `BuildTrainingSet`, `Train`, `Evaluate`): the training set is stored
under `models/loan_approval/training_sets/<sha256>/`, a fitted version first holds only
its models, and evaluation completes it with its metrics and lineage.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import polars as pl

from lakehouse.errors import LakehouseError
from lakehouse.ml import features

# `Trained` here too: models pickled before it moved to `scoring` name `lakehouse.ml.models`.
from lakehouse.ml.scoring import Trained, is_categorical
from lakehouse.storage import Storage, _split_s3, minio_client

if TYPE_CHECKING:
    import pandas as pd
    from feast import FeatureStore

MODEL = "loan_approval"
LEAKY = "previous_loan_defaults_on_file"
"""Decides the label alone for about half the rows (see the dataset README)."""
INPUT_TABLES = (
    ("silver", "loan_applications"),
    ("gold", "application_features"),
    ("gold", "applicant_features"),
)


_MIN_PER_CLASS = 8
"""Fewest rows of each label to train on: a stratified hold-out needs both in each part."""


class ModelError(LakehouseError):
    """No model, or a model that cannot be used; the message says what to run."""


# ---------------------------------------------------------------- registry storage


class Registry:
    """Files under `<warehouse>/models/` on local disk or S3."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.root = f"{storage.root}/models/{MODEL}"

    def _s3(self) -> tuple[Any, str, str]:
        bucket, prefix = _split_s3(self.root)
        return minio_client(self.storage.s3, self.storage.options), bucket, prefix

    def put(self, version: str, name: str, data: bytes) -> None:
        """Write one file of a version."""
        if self.storage.is_s3:
            client, bucket, prefix = self._s3()
            client.put_object(bucket, f"{prefix}/{version}/{name}", io.BytesIO(data), len(data))
            return
        from pathlib import Path

        path = Path(self.root) / version / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)

    def get(self, version: str, name: str) -> bytes:
        """Read one file of a version."""
        if self.storage.is_s3:
            client, bucket, prefix = self._s3()
            response = client.get_object(bucket, f"{prefix}/{version}/{name}")
            try:
                return bytes(response.read())
            finally:
                response.close()
                response.release_conn()
        from pathlib import Path

        return (Path(self.root) / version / name).read_bytes()

    def _folders_with(self, name: str) -> list[str]:
        """Return the version folders that hold a file `name`, oldest first."""
        if self.storage.is_s3:
            client, bucket, prefix = self._s3()
            names = [
                o.object_name[len(prefix) + 1 :]
                for o in client.list_objects(bucket, prefix=prefix + "/", recursive=True)
            ]
            return sorted({n.split("/")[0] for n in names if n.endswith(f"/{name}")})
        from pathlib import Path

        root = Path(self.root)
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if (p / name).is_file())

    def versions(self) -> list[str]:
        """Return the complete versions (those with `lineage.json`, written last), oldest first."""
        return self._folders_with("lineage.json")

    def folders(self) -> list[str]:
        """Return every version folder holding a model, complete or not, oldest first."""
        return self._folders_with("model.joblib")

    def find(self, version: str, name: str) -> bytes | None:
        """Read one file of a version (or training set), or None when it has none."""
        from minio.error import S3Error

        try:
            return self.get(version, name)
        except FileNotFoundError:
            return None
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchBucket"):
                return None
            raise

    def exists(self, version: str, name: str) -> bool:
        """Tell whether a version (or training set) has this file."""
        return self.find(version, name) is not None

    def latest(self) -> str:
        """Return the newest complete version, or fail with what to run."""
        versions = self.versions()
        if not versions:
            msg = f"no trained `{MODEL}` model in {self.root}; run `lakehouse train`"
            raise ModelError(msg)
        return versions[-1]


# ---------------------------------------------------------------- training set


def entity_frame(storage: Storage) -> pd.DataFrame:
    """Decided applications at their `applied_at`, labelled from silver."""
    loans = (
        pl.read_delta(storage.uri("silver", "loan_applications"), storage_options=storage.options)
        .filter(pl.col("loan_status").is_not_null())
        .select(
            "application_id",
            "applicant_id",
            pl.col("applied_at").alias("event_timestamp"),
            pl.col("loan_status").cast(pl.Int8).alias("label"),
        )
        .sort("application_id")
    )
    return loans.to_pandas()


def feature_refs(store: FeatureStore) -> list[str]:
    """Return the `view:feature` references of the feature service."""
    service = store.get_feature_service(features.SERVICE)
    return [
        f"{projection.name_to_use()}:{feature.name}"
        for projection in service.feature_view_projections
        for feature in projection.features
    ]


def training_set(store: FeatureStore, storage: Storage) -> pd.DataFrame:
    """Join the features in force at each application's `applied_at` (Feast, point in time)."""
    features.require_applied(store)
    entities = entity_frame(storage)
    service = store.get_feature_service(features.SERVICE)
    frame = store.get_historical_features(entity_df=entities, features=service).to_df()
    # A decision silver knows but gold does not yet (gold is behind a stream that promoted
    # silver): no feature row at all. Such rows would teach the model on missing values.
    frame = frame[frame["loan_amnt"].notna()]
    return frame.sort_values("application_id").reset_index(drop=True)


def frame_hash(frame: pd.DataFrame) -> str:
    """Hash a training set's content (column order and row order fixed)."""
    ordered = frame[sorted(frame.columns)].sort_values("application_id")
    digest = hashlib.sha256()
    digest.update(ordered.to_csv(index=False).encode())
    return digest.hexdigest()


# ---------------------------------------------------------------- model


def fit(frame: pd.DataFrame, columns: list[str], *, seed: int, threshold: float) -> Trained:
    """Fit a histogram gradient-boosted classifier with native categorical support."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    # A feature with no value at all in the fit rows (days since the previous application
    # when nobody has applied twice yet) carries nothing, and the binner rejects it.
    columns = [c for c in columns if frame[c].notna().any()]
    categories = {
        c: sorted(str(v) for v in frame[c].dropna().unique())
        for c in columns
        if is_categorical(frame[c])
    }
    trained = Trained(None, columns, categories, threshold)
    model = HistGradientBoostingClassifier(
        categorical_features=[c in categories for c in columns],
        max_iter=300,
        learning_rate=0.08,
        random_state=seed,
    )
    model.fit(trained.matrix(frame), frame["label"].to_numpy())
    trained.model = model
    return trained


def evaluate(trained: Trained, frame: pd.DataFrame) -> dict[str, Any]:
    """ROC AUC, PR AUC, precision/recall at the threshold, Brier score and calibration."""
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import (
        average_precision_score,
        brier_score_loss,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    y = frame["label"].to_numpy()
    p = trained.predict_proba(frame)
    decided = (p >= trained.threshold).astype(int)
    observed, predicted = calibration_curve(y, p, n_bins=10, strategy="quantile")
    return {
        "rows": len(y),
        "positive_rate": float(y.mean()),
        "roc_auc": float(roc_auc_score(y, p)),
        "pr_auc": float(average_precision_score(y, p)),
        "threshold": trained.threshold,
        "precision": float(precision_score(y, decided, zero_division=0)),
        "recall": float(recall_score(y, decided, zero_division=0)),
        "brier": float(brier_score_loss(y, p)),
        "calibration": [
            {"predicted": float(a), "observed": float(b)}
            for a, b in zip(predicted, observed, strict=True)
        ],
    }


_CURVE_POINTS = 200
_IMPORTANCE_ROWS = 2000


def curves(trained: Trained, frame: pd.DataFrame, seed: int) -> dict[str, Any]:
    """Return the ROC curve (at most 200 points) and permutation importances on hold-out rows.

    A histogram gradient-boosted model has no impurity importances; the permutation
    importance of a feature is how much the hold-out ROC AUC drops when its column is
    shuffled (3 shuffles, on at most 2,000 rows: well under a second).
    """
    import numpy as np
    from sklearn.inspection import permutation_importance
    from sklearn.metrics import roc_curve

    y = frame["label"].to_numpy()
    fpr, tpr, _ = roc_curve(y, trained.predict_proba(frame))
    keep = np.unique(np.linspace(0, len(fpr) - 1, min(len(fpr), _CURVE_POINTS)).round())
    found = permutation_importance(
        trained.model,
        trained.matrix(frame),
        y,
        scoring="roc_auc",
        n_repeats=3,
        random_state=seed,
        max_samples=min(len(y), _IMPORTANCE_ROWS),
    )
    importances = [
        {"feature": c, "mean": float(m), "std": float(s)}
        for c, m, s in zip(
            trained.columns, found.importances_mean, found.importances_std, strict=True
        )
    ]
    return {
        "roc": {
            "fpr": [float(fpr[int(i)]) for i in keep],
            "tpr": [float(tpr[int(i)]) for i in keep],
        },
        "permutation_importance": sorted(importances, key=lambda r: -r["mean"]),
    }


def version_curves(storage: Storage, version: str) -> dict[str, Any]:
    """Return a version's curves, as evaluated or recomputed on the same hold-out.

    Versions evaluated before the curves were recorded have them recomputed.
    """
    import joblib

    registry = Registry(storage)
    metrics = json.loads(registry.get(version, "metrics.json"))
    if "curves" in metrics:
        recorded: dict[str, Any] = metrics["curves"]
        return recorded
    record = json.loads(registry.get(version, "training_set.json"))
    _, test_rows = _split(_stored_set(storage, record["sha256"]), record["seed"])
    model = joblib.load(io.BytesIO(registry.get(version, "model.joblib")))
    return curves(model, test_rows, record["seed"])


@dataclass
class TrainResult:
    """What `train` wrote."""

    version: str
    metrics: dict[str, Any]
    lineage: dict[str, Any]


TRAINING_SETS = "training_sets"
"""Folder of the registry holding training sets: `<sha256>/training_set.parquet` and its
`manifest.json`, and `latest.json` naming the newest."""


def input_versions(storage: Storage) -> dict[str, int]:
    """Return the data version of each input table (maintenance commits are no new data)."""
    return {f"{z}.{t}": storage.data_version(z, t) for z, t in INPUT_TABLES}


def build_training_set(store: FeatureStore, storage: Storage) -> dict[str, Any]:
    """Build the training set through Feast and store it; return its manifest.

    The manifest records what the set was built from (the Delta version of every input
    table, the feature references), its row count and its SHA-256; training and
    evaluation read the stored set, so a model's lineage names exactly what it saw.
    """
    versions = input_versions(storage)
    frame = training_set(store, storage)
    counts = frame["label"].value_counts()
    if len(counts) < 2 or int(counts.min()) < _MIN_PER_CLASS:
        msg = (
            f"the training set has {len(frame)} decided applications "
            f"({', '.join(f'{int(n)} with label {k}' for k, n in counts.items()) or 'none'}); "
            f"training needs at least {_MIN_PER_CLASS} approved and {_MIN_PER_CLASS} rejected: "
            "seed or simulate more data and run the pipeline"
        )
        raise ModelError(msg)
    sha = frame_hash(frame)
    manifest = {
        "sha256": sha,
        "rows": len(frame),
        "built_at": datetime.now(UTC).isoformat(),
        "feature_service": features.SERVICE,
        "features": feature_refs(store),
        "inputs": versions,
    }
    registry = Registry(storage)
    folder = f"{TRAINING_SETS}/{sha}"
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    registry.put(folder, "training_set.parquet", buffer.getvalue())
    registry.put(folder, "manifest.json", json.dumps(manifest, indent=2).encode())
    registry.put(TRAINING_SETS, "latest.json", json.dumps(manifest, indent=2).encode())  # last
    return manifest


def latest_training_set(storage: Storage) -> dict[str, Any] | None:
    """Return the manifest of the newest stored training set, if any."""
    registry = Registry(storage)
    if not registry.exists(TRAINING_SETS, "latest.json"):
        return None
    manifest: dict[str, Any] = json.loads(registry.get(TRAINING_SETS, "latest.json"))
    return manifest


def _stored_set(storage: Storage, sha: str) -> pd.DataFrame:
    import pandas as pd

    data = Registry(storage).get(f"{TRAINING_SETS}/{sha}", "training_set.parquet")
    return pd.read_parquet(io.BytesIO(data))


def stored_training_set(storage: Storage, version: str) -> pd.DataFrame:
    """Return the training set a model version was fitted from (before its split)."""
    record = json.loads(Registry(storage).get(version, "training_set.json"))
    return _stored_set(storage, record["sha256"])


def _split(frame: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    from sklearn.model_selection import train_test_split

    fit_rows, test_rows = train_test_split(
        frame, test_size=0.25, stratify=frame["label"], random_state=seed
    )
    return fit_rows, test_rows


def fit_version(storage: Storage, manifest: dict[str, Any], *, seed: int, threshold: float) -> str:
    """Fit on a stored training set's stratified split; write a new, incomplete version.

    The version holds the model, the same model without `LEAKY` (for the comparison the
    metrics report) and `training_set.json`; `evaluate_version` completes it.
    """
    import joblib

    frame = _stored_set(storage, manifest["sha256"])
    columns = [r.split(":", 1)[1] for r in manifest["features"]]
    fit_rows, _ = _split(frame, seed)
    version = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
    registry = Registry(storage)
    for name, used in (
        ("model_without_leaky.joblib", [c for c in columns if c != LEAKY]),
        ("model.joblib", columns),  # last: a folder with it is a fitted version
    ):
        buffer = io.BytesIO()
        joblib.dump(fit(fit_rows, used, seed=seed, threshold=threshold), buffer)
        if name == "model.joblib":
            record = {"sha256": manifest["sha256"], "seed": seed}
            registry.put(version, "training_set.json", json.dumps(record).encode())
        registry.put(version, name, buffer.getvalue())
    return version


def fitted_on(storage: Storage, sha: str) -> str | None:
    """Return the newest version (complete or not) fitted on this training set."""
    registry = Registry(storage)
    for version in reversed(registry.folders()):
        if json.loads(registry.get(version, "training_set.json"))["sha256"] == sha:
            return version
    return None


def evaluate_version(storage: Storage, version: str) -> TrainResult:
    """Evaluate a fitted version on its hold-out; write its metrics and lineage (last)."""
    import joblib

    registry = Registry(storage)
    record = json.loads(registry.get(version, "training_set.json"))
    manifest = json.loads(registry.get(f"{TRAINING_SETS}/{record['sha256']}", "manifest.json"))
    frame = _stored_set(storage, record["sha256"])
    fit_rows, test_rows = _split(frame, record["seed"])
    model = joblib.load(io.BytesIO(registry.get(version, "model.joblib")))
    without = joblib.load(io.BytesIO(registry.get(version, "model_without_leaky.joblib")))
    columns = [r.split(":", 1)[1] for r in manifest["features"]]
    metrics = {
        "model": "HistGradientBoostingClassifier",
        "features_used": model.columns,
        "features_without_values": [c for c in columns if c not in model.columns],
        "split": {"train": len(fit_rows), "test": len(test_rows), "stratified": True},
        "test": evaluate(model, test_rows),
        f"test_without_{LEAKY}": evaluate(without, test_rows),
        "curves": curves(model, test_rows, record["seed"]),
    }
    lineage = {
        "version": version,
        "trained_at": datetime.now(UTC).isoformat(),
        "feature_service": manifest["feature_service"],
        "features": manifest["features"],
        "inputs": manifest["inputs"],
        "training_set": {"rows": manifest["rows"], "sha256": manifest["sha256"]},
        "seed": record["seed"],
    }
    registry.put(version, "metrics.json", json.dumps(metrics, indent=2).encode())
    registry.put(version, "lineage.json", json.dumps(lineage, indent=2).encode())  # last
    return TrainResult(version, metrics, lineage)


def train(store: FeatureStore, storage: Storage, *, seed: int, threshold: float) -> TrainResult:
    """Build the training set, fit, evaluate on a stratified hold-out, register a version."""
    manifest = build_training_set(store, storage)
    version = fit_version(storage, manifest, seed=seed, threshold=threshold)
    return evaluate_version(storage, version)


def load(storage: Storage, version: str | None = None) -> tuple[str, Trained]:
    """Load a registered model (the latest by default)."""
    import joblib

    registry = Registry(storage)
    chosen = version or registry.latest()
    if chosen not in registry.versions():
        msg = f"model version `{chosen}` is not in the registry; see `lakehouse models`"
        raise ModelError(msg)
    trained: Trained = joblib.load(io.BytesIO(registry.get(chosen, "model.joblib")))
    trained.prepare()  # an unexpected scorer failure shows here, not on every request
    return chosen, trained


def describe(storage: Storage) -> list[dict[str, Any]]:
    """Return every registered version with its metrics, oldest first."""
    registry = Registry(storage)
    out = []
    for version in registry.versions():
        metrics = json.loads(registry.get(version, "metrics.json"))
        lineage = json.loads(registry.get(version, "lineage.json"))
        out.append({"version": version, "metrics": metrics, "lineage": lineage})
    return out


def summary(metrics: dict[str, Any]) -> str:
    """One line of the headline metrics, with and without the leaky feature."""
    test = metrics["test"]
    without = metrics[f"test_without_{LEAKY}"]
    return (
        f"ROC AUC {test['roc_auc']:.3f} (without {LEAKY}: {without['roc_auc']:.3f}), "
        f"PR AUC {test['pr_auc']:.3f} ({without['pr_auc']:.3f}), "
        f"precision {test['precision']:.3f} / recall {test['recall']:.3f} at "
        f"{test['threshold']:g}, Brier {test['brier']:.3f}; {test['rows']:,} test rows"
    )
