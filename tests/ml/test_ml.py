"""Feast over gold, training and the registry: point in time, no leakage, lineage."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import polars as pl
import psycopg
import pytest
from deltalake import DeltaTable

from lakehouse import environment
from lakehouse.ml import features, models
from lakehouse.ml import online as online_store
from lakehouse.ml import tasks as ml_tasks
from lakehouse.ml.online import VIEWS
from lakehouse.settings import Secret, Settings
from lakehouse.storage import Storage, minio_client
from tests.conftest import env_for
from tests.helpers import churn, insert_late_application, read, run_all
from tests.ml.conftest import Lake, served_model

FEATURES = [
    "loan_amnt", "loan_intent", "loan_int_rate", "loan_percent_income", "loan_to_income",
    "rate_spread", "credit_score_band", "person_age", "person_gender", "person_education",
    "person_income", "person_emp_exp", "person_home_ownership", "cb_person_cred_hist_length",
    "credit_score", "previous_loan_defaults_on_file",
]  # fmt: skip
APPLICANT = [
    "application_count", "approved_count", "rejected_count", "mean_loan_amnt",
    "days_since_last_application",
]  # fmt: skip


def brute_force(lake: Lake) -> pd.DataFrame:
    """The training set by hand: latest gold rows at or before `applied_at`, per entity."""
    loans = read(lake.storage, "silver", "loan_applications").filter(
        pl.col("loan_status").is_not_null()
    )
    apps = read(lake.storage, "gold", "application_features")
    people = read(lake.storage, "gold", "applicant_features")
    rows = []
    by_app = {k: g for (k,), g in apps.group_by("application_id")}
    by_person = {k: g.sort("event_timestamp") for (k,), g in people.group_by("applicant_id")}
    for loan in loans.iter_rows(named=True):
        t = loan["applied_at"]
        row = {"application_id": loan["application_id"], "label": loan["loan_status"]}
        app = by_app.get(loan["application_id"])
        app = None if app is None else app.filter(pl.col("event_timestamp") <= t)
        for name in FEATURES:
            row[name] = (
                None if app is None or app.height == 0 else app.sort("event_timestamp")[name][-1]
            )
        # The history part, independently: gold.applicant_features as of applied_at.
        person = by_person.get(loan["applicant_id"])
        person = None if person is None else person.filter(pl.col("event_timestamp") <= t)
        for name in APPLICANT:
            row[name] = None if person is None or person.height == 0 else person[name][-1]
        if row["days_since_last_application"] is not None:
            assert person is not None
            since_row = (t - person["event_timestamp"][-1]).total_seconds() / 86400
            row["days_since_last_application"] += since_row
        rows.append(row)
    return pd.DataFrame(rows).sort_values("application_id").reset_index(drop=True)


def _same(a: object, b: object) -> bool:
    if a is None or (isinstance(a, float) and pd.isna(a)) or a is pd.NA:
        return b is None or (isinstance(b, float) and pd.isna(b)) or b is pd.NA
    if isinstance(a, float) or isinstance(b, float):
        return b is not None and not pd.isna(b) and abs(float(a) - float(b)) < 1e-9  # type: ignore[arg-type]
    return bool(a == b)


def test_feast_training_set_equals_brute_force_as_of_join(lake: Lake) -> None:
    got = models.training_set(lake.store, lake.storage)  # type: ignore[arg-type]
    want = brute_force(lake)
    assert len(got) == len(want) > 500
    assert got["application_id"].tolist() == want["application_id"].tolist()
    assert got["label"].tolist() == want["label"].tolist()
    for name in FEATURES + APPLICANT:
        bad = [
            (i, a, b)
            for i, a, b in zip(got["application_id"], got[name], want[name], strict=True)
            if not _same(a, b)
        ]
        assert not bad, (name, bad[:3])


# Local disk only (CI time): logic over frames the S3 lake's other tests already read from S3.
@pytest.mark.parametrize("lake", ["local"], indirect=True)
def test_no_feature_uses_data_from_after_applied_at(lake: Lake) -> None:
    """Later source changes (decisions, updates, new applications) change no existing row."""
    before = models.training_set(lake.store, lake.storage)  # type: ignore[arg-type]
    churn(lake.settings, changes=300, seed_value=11)
    run_all(lake.settings, lake.storage)
    after = models.training_set(lake.store, lake.storage)  # type: ignore[arg-type]
    common = before.merge(after, on="application_id", suffixes=("_before", "_after"))
    # Applications decided in the churn join the training set; withdrawn ones leave it.
    assert len(common) > 0.8 * len(before)
    for name in FEATURES + APPLICANT:
        changed = [
            i
            for i, a, b in zip(
                common["application_id"],
                common[f"{name}_before"],
                common[f"{name}_after"],
                strict=True,
            )
            if not _same(a, b)
        ]
        assert not changed, (name, changed[:5])


def test_online_values_equal_latest_gold(lake: Lake) -> None:
    ml_tasks.materialize(lake.settings, lake.storage)
    assert ml_tasks.materialized(lake.settings, lake.storage)
    apps = read(lake.storage, "gold", "application_features")
    latest = apps.sort("event_timestamp").group_by("application_id").last().sort("application_id")
    sample = latest.head(40)
    online = lake.store.get_online_features(  # type: ignore[attr-defined]
        features=[f"application_features:{n}" for n in FEATURES + APPLICANT],
        entity_rows=[{"application_id": int(i)} for i in sample["application_id"]],
    ).to_dict()
    for name in FEATURES + APPLICANT:
        for a, b in zip(online[name], sample[name].to_list(), strict=True):
            assert _same(a, b), (name, a, b)
    people = read(lake.storage, "gold", "applicant_features")
    last = people.sort("event_timestamp").group_by("applicant_id").last().sort("applicant_id")
    sample = last.head(40)
    online = lake.store.get_online_features(  # type: ignore[attr-defined]
        features=[f"applicant_features:{n}" for n in APPLICANT],
        entity_rows=[{"applicant_id": int(i)} for i in sample["applicant_id"]],
    ).to_dict()
    for name in APPLICANT:
        for a, b in zip(online[name], sample[name].to_list(), strict=True):
            assert _same(a, b), (name, a, b)
    first = latest.row(0, named=True)
    check_reads_go_on_while_a_materialization_writes(
        lake, first["application_id"], first["loan_amnt"]
    )


def test_late_rows_reach_the_online_store(lake: Lake) -> None:
    """A row reaching gold long after its event time (a backfill, a pipeline down for
    days) is still materialized: the incremental window follows what changed in gold."""
    ml_tasks.materialize(lake.settings, lake.storage)
    app_id = insert_late_application(lake.settings)  # long before the last window
    run_all(lake.settings, lake.storage)
    assert not ml_tasks.materialized(lake.settings, lake.storage)
    ml_tasks.materialize(lake.settings, lake.storage)
    assert ml_tasks.materialized(lake.settings, lake.storage)
    online = lake.store.get_online_features(  # type: ignore[attr-defined]
        features=["application_features:loan_amnt"], entity_rows=[{"application_id": app_id}]
    ).to_dict()
    assert online["loan_amnt"] == [1234.5]


def check_reads_go_on_while_a_materialization_writes(
    lake: Lake, application_id: int, loan_amnt: float
) -> None:
    """A writer holding SQLite's write lock with its pages spilled (what a large
    materialization does) does not lock the API's reads out: the store is in WAL mode.

    Out of WAL mode the read waits for SQLite's lock timeout and raises "database is
    locked"; in it, the read answers the committed value (gold's, as the caller read it).
    """
    db = online_store.sqlite_path(lake.settings)
    writer = sqlite3.connect(db, timeout=0)
    try:
        assert writer.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        writer.execute("PRAGMA cache_size = 1")  # spill at once, as a big write does
        writer.execute("BEGIN IMMEDIATE")
        writer.execute('UPDATE "lakehouse__application_features" SET "values" = "values"')
        reader = features.feature_store(lake.settings, lake.storage)
        online = reader.get_online_features(
            features=["application_features:loan_amnt"],
            entity_rows=[{"application_id": application_id}],
        ).to_dict()
        assert online["loan_amnt"] == [loan_amnt]
    finally:
        writer.rollback()
        writer.close()


def _online_everything(store: object, storage: Storage) -> dict[str, dict[str, list[object]]]:
    """Read every view's features for every entity gold has (and one it has not)."""
    out = {}
    for view, key, table in (
        ("application_features", "application_id", "application_features"),
        ("applicant_features", "applicant_id", "applicant_features"),
        ("applicant_profile", "applicant_id", "applicant_features"),
    ):
        definition = store.get_feature_view(view)  # type: ignore[attr-defined]
        ids = sorted({int(i) for i in read(storage, "gold", table)[key]})
        out[view] = store.get_online_features(  # type: ignore[attr-defined]
            features=[f"{view}:{f.name}" for f in definition.features],
            entity_rows=[{key: i} for i in [*ids, -1]],
        ).to_dict()
    return out


# The online store does not depend on where the tables live: local disk only.
@pytest.mark.parametrize("lake", ["local"], indirect=True)
def test_online_features_equal_feasts_own_sqlite_store(lake: Lake, tmp_path: Path) -> None:
    """Issue 16: the lakehouse online store, SQLite and Postgres, written in bulk by
    `lakehouse` materialization, answers `get_online_features` for every entity exactly as
    Feast's own SQLite store does after Feast's own materialization up to the same end."""
    from feast import FeatureStore

    end = ml_tasks.materialize(lake.settings, lake.storage).end
    on_pg = replace(lake.settings, feast_online_store="postgres")
    try:
        assert ml_tasks.materialize(on_pg, lake.storage).end >= end
        ours_pg = _online_everything(features.feature_store(on_pg, lake.storage), lake.storage)
    finally:
        with psycopg.connect(lake.settings.pg_dsn.get(), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{lake.settings.pg_schema}_online" CASCADE')
    lake.store = features.feature_store(lake.settings, lake.storage)
    features.apply(lake.store)  # type: ignore[arg-type]  # the registry's store back to SQLite
    ours = _online_everything(lake.store, lake.storage)

    source = (features.repo_path() / "feature_store.yaml").read_text()
    ours_type = "type: lakehouse.ml.online.store.LakehouseSqliteOnlineStore"
    assert ours_type in source
    yaml = tmp_path / "stock.yaml"
    yaml.write_text(
        source.replace(ours_type, "type: sqlite").replace(
            "${LAKEHOUSE_HOME}/feast/online.db", str(tmp_path / "stock.db")
        )
    )
    stock = FeatureStore(fs_yaml_file=yaml)
    assert stock.config.online_store.type == "sqlite"
    try:
        features.apply(stock)
        stock.materialize(
            start_date=datetime(1970, 1, 2, tzinfo=UTC), end_date=end, feature_views=list(VIEWS)
        )
        feasts = _online_everything(stock, lake.storage)
    finally:
        features.apply(lake.store)  # type: ignore[arg-type]
    assert all(len(feasts[v][k]) > 1000 for v, k in (("application_features", "loan_amnt"),))
    for view in VIEWS:
        assert ours[view].keys() == feasts[view].keys()
        for name in feasts[view]:
            assert _same_lists(ours[view][name], feasts[view][name]), (view, name)
            assert _same_lists(ours_pg[view][name], feasts[view][name]), (view, name)


def _same_lists(a: list[object], b: list[object]) -> bool:
    return len(a) == len(b) and all(
        x == y or (isinstance(x, float) and isinstance(y, float) and x != x and y != y)
        for x, y in zip(a, b, strict=True)
    )


# The online store does not depend on where the tables live: local disk only.
@pytest.mark.parametrize("lake", ["local"], indirect=True)
def test_postgres_online_store_serves_the_latest_gold_values(lake: Lake) -> None:
    """LAKEHOUSE_FEAST_ONLINE_STORE=postgres with its own DSN (LAKEHOUSE_FEAST_PG_DSN), as in
    the compose demo: a features role that owns only the online schema applies and
    materializes, a serving role that may only SELECT reads, and the values read equal the
    latest gold rows."""
    from psycopg.conninfo import make_conninfo
    from psycopg.sql import SQL, Identifier

    admin = lake.settings.pg_dsn.get()
    online_schema = f"{lake.settings.pg_schema}_online"
    writer, reader = f"{lake.settings.pg_schema}_features", f"{lake.settings.pg_schema}_serving"
    with psycopg.connect(admin, autocommit=True) as conn:
        for role, password in ((writer, "w'pass word"), (reader, "r-pass")):
            conn.execute(
                SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    Identifier(role), psycopg.sql.Literal(password)
                )
            )
        conn.execute(
            SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(
                Identifier(online_schema), Identifier(writer)
            )
        )
        conn.execute(
            SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
                Identifier(online_schema), Identifier(reader)
            )
        )
        conn.execute(
            SQL(
                "ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} GRANT SELECT ON TABLES TO {}"
            ).format(Identifier(writer), Identifier(online_schema), Identifier(reader))
        )

    def as_role(role: str, password: str) -> Settings:
        dsn = make_conninfo(admin, user=role, password=password)
        return replace(lake.settings, feast_online_store="postgres", feast_pg_dsn=Secret(dsn))

    try:
        writing = as_role(writer, "w'pass word")
        store = features.feature_store(writing, lake.storage)
        assert type(store.config.online_store).__name__ == "LakehousePostgresOnlineStoreConfig"
        # Switching stores: the first materialization into it applies (creates its tables).
        ml_tasks.materialize(writing, lake.storage)
        with psycopg.connect(admin) as conn:
            owners = dict(
                conn.execute(
                    "SELECT tablename, tableowner FROM pg_tables WHERE schemaname = %s",
                    (online_schema,),
                ).fetchall()
            )
        assert owners.get("lakehouse__application_features") == writer, owners
        assert set(owners.values()) == {writer}
        serving = features.feature_store(as_role(reader, "r-pass"), lake.storage)
        apps = read(lake.storage, "gold", "application_features")
        latest = apps.sort("event_timestamp").group_by("application_id").last()
        sample = latest.sort("application_id").tail(25)
        online = serving.get_online_features(
            features=[f"application_features:{n}" for n in FEATURES + APPLICANT],
            entity_rows=[{"application_id": int(i)} for i in sample["application_id"]],
        ).to_dict()
        for name in FEATURES + APPLICANT:
            for a, b in zip(online[name], sample[name].to_list(), strict=True):
                assert _same(a, b), (name, a, b)
        assert_api_reads_as_feast(serving, [*sample["application_id"].to_list(), 10**12])
        with (
            psycopg.connect(make_conninfo(admin, user=reader, password="r-pass")) as conn,
            pytest.raises(psycopg.errors.InsufficientPrivilege),
        ):
            conn.execute(
                SQL("DELETE FROM {}").format(
                    Identifier(online_schema, "lakehouse__application_features")
                )
            )
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(Identifier(online_schema)))
            for role in (writer, reader):
                with contextlib.suppress(psycopg.errors.UndefinedObject):
                    conn.execute(SQL("DROP OWNED BY {}").format(Identifier(role)))
                conn.execute(SQL("DROP ROLE IF EXISTS {}").format(Identifier(role)))
        # The environment and the registry's infrastructure back to SQLite.
        features.apply(features.feature_store(lake.settings, lake.storage))


def test_a_materialization_in_progress_stops_neither_training_nor_serving(lake: Lake) -> None:
    """Feast marks views MATERIALIZING while it loads them; other processes still read."""
    from feast.feature_view import FeatureViewState

    ml_tasks.materialize(lake.settings, lake.storage)
    writer = features.feature_store(lake.settings, lake.storage)
    for name in VIEWS:
        writer.set_feature_view_state(name, FeatureViewState.MATERIALIZING)
    try:
        reader = features.feature_store(lake.settings, lake.storage)
        view = reader.get_feature_view("application_features")
        assert view.state == FeatureViewState.MATERIALIZING
        assert len(models.training_set(reader, lake.storage)) > 500
        app_id = int(read(lake.storage, "gold", "application_features")["application_id"][0])
        online = reader.get_online_features(
            features=reader.get_feature_service(features.SERVICE),
            entity_rows=[{"application_id": app_id}],
        ).to_dict()
        assert online["loan_amnt"][0] is not None
    finally:
        for name in VIEWS:
            writer.set_feature_view_state(name, FeatureViewState.AVAILABLE_ONLINE)


def test_the_feast_registry_is_never_seen_half_written(lake: Lake, tmp_path: Path) -> None:
    """Readers in other processes read the registry file while a materialization rewrites it."""
    import threading

    from feast.repo_config import RegistryConfig

    from lakehouse.ml.registry import AtomicFileRegistryStore

    assert type(lake.store.registry._registry_store) is AtomicFileRegistryStore  # type: ignore[attr-defined]
    proto = lake.store.registry.proto()  # type: ignore[attr-defined]
    views = len(proto.feature_views)
    assert views >= 3
    store = AtomicFileRegistryStore(RegistryConfig(path=str(tmp_path / "registry.db")), tmp_path)
    store.update_registry_proto(proto)
    done = threading.Event()

    def rewrite() -> None:
        for _ in range(300):
            store.update_registry_proto(proto)
        done.set()

    thread = threading.Thread(target=rewrite)
    thread.start()
    reads = 0
    while not done.is_set():
        assert len(store.get_registry_proto().feature_views) == views
        reads += 1
    thread.join()
    assert reads > 10
    assert not [p for p in tmp_path.iterdir() if p.name != "registry.db"]  # no temp left


# The Delta tables a training set is built from (README, "Training"), written out here
# rather than taken from `models`.
TRAINING_INPUTS = (
    "silver.loan_applications",
    "gold.application_features",
    "gold.applicant_features",
)


def assert_stored_training_set(lake: Lake, recorded: dict[str, object]) -> None:
    """The training set stored under `training_sets/<sha256>/` holds one row per decided
    application in silver, labelled with its decision, and its SHA-256 is of that content
    (sorted columns, rows by application_id, as CSV), hashed here."""
    sha = recorded["sha256"]
    path = f"{lake.storage.root}/models/loan_approval/training_sets/{sha}/training_set.parquet"
    if lake.storage.is_s3:
        bucket, key = path.removeprefix("s3://").split("/", 1)
        response = minio_client(lake.storage.s3, lake.storage.options).get_object(bucket, key)
        try:
            data = bytes(response.read())
        finally:
            response.close()
            response.release_conn()
    else:
        data = Path(path).read_bytes()
    stored = pd.read_parquet(io.BytesIO(data))
    stored = stored[sorted(stored.columns)].sort_values("application_id")
    decided = (
        read(lake.storage, "silver", "loan_applications")
        .filter(pl.col("loan_status").is_not_null())
        .sort("application_id")
    )
    assert recorded["rows"] == len(stored) == decided.height
    assert stored["application_id"].tolist() == decided["application_id"].to_list()
    assert stored["label"].tolist() == decided["loan_status"].to_list()
    assert sha == hashlib.sha256(stored.to_csv(index=False).encode()).hexdigest()


def test_training_writes_a_complete_registry_entry(lake: Lake) -> None:
    result = ml_tasks.train(lake.settings, lake.storage)
    registry = models.Registry(lake.storage)
    assert registry.latest() == result.version
    lineage = json.loads(registry.get(result.version, "lineage.json"))
    metrics = json.loads(registry.get(result.version, "metrics.json"))
    # The tables the training set is read from: labels from silver, features from gold.
    assert lineage["inputs"] == {
        name: DeltaTable(
            lake.storage.uri(*name.split(".")), storage_options=lake.storage.options
        ).version()
        for name in TRAINING_INPUTS
    }
    assert sorted(r.split(":")[1] for r in lineage["features"]) == sorted(FEATURES + APPLICANT)
    assert_stored_training_set(lake, lineage["training_set"])
    for key in ("test", f"test_without_{models.LEAKY}"):
        m = metrics[key]
        assert 0.5 < m["roc_auc"] <= 1 and 0 < m["pr_auc"] <= 1 and 0 <= m["brier"] < 0.25
        assert len(m["calibration"]) >= 5
    assert metrics["split"]["stratified"] is True
    version, model = models.load(lake.storage)
    assert version == result.version and model.columns
    assert ml_tasks.trained(lake.settings, lake.storage)
    out = subprocess.run(
        [sys.executable, "-m", "lakehouse.cli", "models"],
        env={**os.environ, **env_for(lake.settings)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert result.version in out and "ROC AUC" in out


# Local disk only (CI time): logic over frames the S3 lake's other tests already read from S3.
@pytest.mark.parametrize("lake", ["local"], indirect=True)
def test_training_steps_complete_a_version_only_when_evaluated(lake: Lake) -> None:
    """The Luigi steps: a training set for the current inputs, a fitted version (not yet
    listed nor served), then its evaluation, which completes it."""
    before = served_model(lake)
    churn(lake.settings, changes=150, seed_value=23)
    run_all(lake.settings, lake.storage)
    assert not ml_tasks.trained(lake.settings, lake.storage)
    assert not ml_tasks.training_set_built(lake.settings, lake.storage)
    manifest = ml_tasks.build_training_set(lake.settings, lake.storage)
    assert ml_tasks.training_set_built(lake.settings, lake.storage)
    assert not ml_tasks.fitted(lake.settings, lake.storage)
    assert_stored_training_set(lake, manifest)

    version = ml_tasks.fit(lake.settings, lake.storage)
    assert ml_tasks.fitted(lake.settings, lake.storage)
    assert not ml_tasks.trained(lake.settings, lake.storage)
    registry = models.Registry(lake.storage)
    assert version in registry.folders() and version not in registry.versions()
    assert registry.latest() == before  # a fitted version is not served before evaluation

    result = ml_tasks.evaluate(lake.settings, lake.storage)
    assert result.version == version == registry.latest()
    assert ml_tasks.trained(lake.settings, lake.storage)
    assert result.lineage["training_set"] == {
        "rows": manifest["rows"],
        "sha256": manifest["sha256"],
    }
    assert result.lineage["inputs"] == manifest["inputs"]


# On S3 only (CI time): the CLI's S3 route (DuckDB secret, delta-rs options) is the one
# that can break; local paths are the demo's and the other tests'.
@pytest.mark.parametrize("lake", ["s3"], indirect=True)
def test_feast_cli_from_the_repository_folder(lake: Lake) -> None:
    """`feast apply`, `feast materialize-incremental` and `feast ui` work from `feature_repo/`."""
    env = {**os.environ, **env_for(lake.settings), **environment.feast_env(lake.settings)}
    feast = Path(sys.executable).parent / "feast"
    commands = [["apply"]]
    if not lake.settings.is_s3:  # on S3 the DuckDB secret is set by `lakehouse features`
        commands.append(["materialize-incremental", "2100-01-01T00:00:00"])
    for argv in commands:
        done = subprocess.run(
            [str(feast), *argv],
            cwd=features.repo_path(),
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
    # `feast ui` serves the registry (it needs Feast's grpcio extra).
    import urllib.request

    from lakehouse.source.embedded import free_port

    port = free_port()
    ui = subprocess.Popen(
        [str(feast), "ui", "--host", "127.0.0.1", "--port", str(port)],
        cwd=features.repo_path(),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert ui.poll() is None, ui.communicate()[1][-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/projects-list.json") as r:
                    projects = json.loads(r.read())
                break
            except OSError:
                assert time.monotonic() < deadline, "feast ui did not answer"
                time.sleep(0.5)
        assert any("lakehouse" in (p.get("id"), p.get("name")) for p in projects["projects"]), (
            projects
        )
    finally:
        ui.terminate()
        ui.wait(timeout=30)


# Local disk only (CI time): logic over frames the S3 lake's other tests already read from S3.
@pytest.mark.parametrize("lake", ["local"], indirect=True)
def test_prediction_api_contract(lake: Lake, tmp_path: Path, clients: Any) -> None:
    from fastapi.testclient import TestClient

    from lakehouse.ml.serve import create_app

    empty = replace(lake.settings, storage_uri=str(tmp_path / "no-models"))
    if lake.settings.is_s3:
        empty = replace(lake.settings, storage_uri=lake.settings.warehouse + "-empty")
    no_model = TestClient(create_app(empty))
    answer = no_model.post("/predict", json={"application_id": 1})
    assert answer.status_code == 503
    assert "run `lakehouse train`" in answer.json()["detail"]
    assert no_model.get("/healthz").json() == {"status": "ok"}  # alive: no restart helps
    not_ready = no_model.get("/readyz")
    assert not_ready.status_code == 503
    assert "run `lakehouse train`" in not_ready.json()["detail"]

    served = served_model(lake)
    ml_tasks.materialize(lake.settings, lake.storage)
    client = clients(create_app(lake.settings))
    assert client.get("/health").json() == {"status": "ok", "model_version": served}
    assert client.get("/readyz").json() == {"status": "ready", "model_version": served}
    listed = client.get("/models").json()
    assert listed and "roc_auc" in listed[-1]["test"]
    assert "/predict" in client.get("/openapi.json").json()["paths"]

    app_id = int(read(lake.storage, "silver", "loan_applications")["application_id"].max())
    answer = client.post("/predict", json={"application_id": app_id})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert 0 <= body["probability"] <= 1
    assert body["decision"] == ("approve" if body["probability"] >= 0.5 else "reject")
    assert body["model_version"] == served
    assert set(body["features"]) == set(FEATURES + APPLICANT)
    # Served by application_id: exactly the gold row training saw (no training/serving skew).
    gold_row = (
        read(lake.storage, "gold", "application_features")
        .filter(pl.col("application_id") == app_id)
        .row(0, named=True)
    )
    for name in FEATURES + APPLICANT:
        assert _same(body["features"][name], gold_row[name]), name

    applicant = int(read(lake.storage, "silver", "applicants")["applicant_id"].min())
    loan = {"loan_amnt": 5000, "loan_intent": "EDUCATION", "loan_int_rate": 11.5}
    answer = client.post("/predict", json={"applicant_id": applicant, "loan": loan})
    assert answer.status_code == 200, answer.text
    served = answer.json()["features"]
    assert served["loan_amnt"] == 5000
    # A new loan: the applicant's history now (their latest applicant_features row).
    people = read(lake.storage, "gold", "applicant_features").filter(
        pl.col("applicant_id") == applicant
    )
    latest = people.sort("event_timestamp").row(-1, named=True)
    for name in ("application_count", "approved_count", "rejected_count", "person_income"):
        assert served[name] == latest[name], name

    assert client.post("/predict", json={"application_id": 10**12}).status_code == 404
    for bad in (
        {},
        {"application_id": "x"},
        {"application_id": -1},
        {"applicant_id": applicant},
        {"applicant_id": applicant, "loan": {**loan, "loan_intent": "YACHT"}},
        {"application_id": app_id, "applicant_id": applicant, "loan": loan},
    ):
        answer = client.post("/predict", json=bad)
        assert answer.status_code == 422, (bad, answer.text)
        assert answer.json()["detail"]

    # Anything unexpected is a 500 whose JSON detail names it: here a newer model version
    # whose model file is corrupt.
    registry = models.Registry(lake.storage)
    latest = registry.latest()
    broken = "99999999T000000000000Z"
    for name in ("metrics.json", "lineage.json"):
        registry.put(broken, name, registry.get(latest, name))
    registry.put(broken, "model.joblib", b"not a model")
    try:
        raw = TestClient(create_app(lake.settings), raise_server_exceptions=False)
        answer = raw.post("/predict", json={"application_id": app_id})
        assert answer.status_code == 500
        assert answer.json()["detail"].startswith("internal error: "), answer.text
    finally:
        _remove_version(lake.storage, broken)


def assert_api_reads_as_feast(store: Any, application_ids: list[int]) -> None:
    """The API's reader of the feature service gives, for each application, exactly what
    Feast's `get_online_features(...).to_dict()` gives: same names, types and values."""
    from lakehouse.ml.online.reader import ServiceReader

    service = store.get_feature_service(features.SERVICE)
    reader = ServiceReader.of(store, service)
    assert reader is not None, "the lakehouse store and service are read directly"
    for application_id in application_ids:
        entity = {"application_id": int(application_id)}
        expected = store.get_online_features(features=service, entity_rows=[entity]).to_dict()
        want = {k: v[0] for k, v in expected.items() if k != "application_id"}
        got = reader.read(entity)
        assert sorted(got) == sorted(want), application_id
        for name, value in want.items():
            assert (type(got[name]), repr(got[name])) == (type(value), repr(value)), name


# Local disk only (CI time): the reads are the store's, tested on both databases above.
@pytest.mark.parametrize("lake", ["local"], indirect=True)
def test_the_api_reads_what_feast_reads_and_answers_as_fastapi_does(
    lake: Lake, monkeypatch: pytest.MonkeyPatch, clients: Any
) -> None:
    """`/predict`'s two shortcuts change no answer.

    The reader: every application in the online store, and one that is not, read as Feast
    reads it. The fast path (`lakehouse.ml.fastpath`): each request is sent as
    `application/json` (the fast path) and as another JSON type (FastAPI's route); status,
    body and content type are identical, and the fast path served the valid ones.
    """

    from lakehouse.ml import serve

    # No model check in the middle of the requests (it sends one to the thread pool).
    monkeypatch.setattr(serve, "REFRESH_SECONDS", 3600.0)
    served_model(lake)
    ml_tasks.materialize(lake.settings, lake.storage)
    store = features.feature_store(lake.settings, lake.storage)
    ids = read(lake.storage, "gold", "application_features")["application_id"].unique()
    assert len(ids) > 500
    assert_api_reads_as_feast(store, [*sorted(ids.to_list()), 10**12])

    app = serve.create_app(lake.settings)
    routed: list[str] = []
    fastapi_app = app.app

    async def counting(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            routed.append(scope["path"])
        await fastapi_app(scope, receive, send)

    app.app = counting
    client = clients(app, raise_server_exceptions=False)
    first = int(ids.min())
    assert client.post("/predict", json={"application_id": first}).status_code == 200
    applicant = int(read(lake.storage, "silver", "applicants")["applicant_id"].min())
    loan = {"loan_amnt": 5000, "loan_intent": "EDUCATION", "loan_int_rate": 11.5}
    valid = [
        json.dumps({"application_id": int(i)}) for i in sorted(ids.to_list())[:: len(ids) // 40]
    ] + [json.dumps({"applicant_id": applicant, "loan": loan})]
    invalid = [
        json.dumps({"application_id": 10**12}),  # 404
        "{}",
        '{"application_id": "7"}',
        '{"application_id": true}',
        '{"application_id": 7.0}',
        f'{{"application_id": {2**63}}}',
        '{"applicant_id": 1, "loan": {"loan_amnt": NaN, "loan_intent": "EDUCATION", '
        '"loan_int_rate": 11.5}}',
        "[1, 2]",
        "not json",
        "",
    ]
    # The same request id both ways (the answers carry it); one the API refuses (400).
    cases = [(body, f"case-{i}") for i, body in enumerate(valid + invalid)]
    cases.append((valid[0], "not a request id"))
    for body, request_id in cases:
        routed.clear()
        fast = client.post(
            "/predict",
            content=body,
            headers={"content-type": "application/json", "x-request-id": request_id},
        )
        fast_routed = list(routed)
        # A `+json` type: FastAPI parses it as JSON, the fast path leaves it to FastAPI.
        plain = client.post(
            "/predict",
            content=body,
            headers={"content-type": "application/x-test+json", "x-request-id": request_id},
        )
        if "loan" in body and fast.status_code == 200:
            # A new loan's history is moved to now: the two answers differ by that moment.
            a, b = fast.json(), plain.json()
            days = "days_since_last_application"
            moved = a["features"].pop(days), b["features"].pop(days)
            assert moved == (None, None) or abs(moved[0] - moved[1]) < 0.01, moved
            assert a == b
        else:
            assert (fast.status_code, fast.content) == (plain.status_code, plain.content), body
        assert fast.headers["content-type"] == plain.headers["content-type"], body
        assert fast.headers.get("x-request-id") == plain.headers.get("x-request-id"), body
        if body in valid and request_id.startswith("case-"):
            assert fast.status_code == 200, fast.text
            assert fast.json()["request_id"] == fast.headers["x-request-id"] == request_id
            assert fast_routed == [], "answered by the fast path"
        else:
            refused = (400,) if request_id == "not a request id" else (404, 422)
            assert fast.status_code in refused, (body, request_id, fast.text)
            assert fast_routed == ["/predict"], "answered by FastAPI"
    assert fast.status_code == 400 and "X-Request-ID must be" in fast.json()["detail"]
    assert client.get("/openapi.json").status_code == 200


def _remove_version(storage: Storage, version: str) -> None:
    registry = models.Registry(storage)
    if storage.is_s3:
        client, bucket, prefix = registry._s3()
        for obj in client.list_objects(bucket, prefix=f"{prefix}/{version}/", recursive=True):
            client.remove_object(bucket, obj.object_name)
    else:
        import shutil

        shutil.rmtree(Path(registry.root) / version)
    assert version not in registry.folders()


# Values at the edges of what silver's rules accept (tests/transforms/test_quality.py holds
# each rule at its boundary); BIG is the largest key Postgres, Arrow and Feast all hold.
BIG = 2**63 - 1
EDGE_APPLICANTS = {
    # applicant_id: (age, emp_exp, income, credit history, score, gender, education, home, defaults)
    BIG: (100, 86, 10_000_000.0, 80, 850, "male", "Doctorate", "OTHER", "Yes"),
    BIG - 1: (18, 0, 1_000.0, 0, 300, "female", "High School", "RENT", "No"),
}
EDGE_LOANS = {
    # application_id: (applicant, amount, intent, rate, share of income, applied_at, status)
    BIG: (BIG, 1_000_000.0, "DEBTCONSOLIDATION", 36.0, 0.1, "now", 1),
    BIG - 1: (BIG, 100.0, "PERSONAL", 1.0, 0.0, "2000-01-01 00:00:00+00", 0),
    BIG - 2: (BIG - 1, 1_000.0, "MEDICAL", 36.0, 1.0, "2000-01-01 00:00:00+00", 1),
    BIG - 3: (BIG - 1, 100.0, "VENTURE", 1.0, 0.1, "now", None),
}
# Values Postgres accepts that a later stage could not hold: silver rejects each by name.
EDGE_REJECTS = {
    BIG - 10: ("0001-01-01 00:00:00+00", "applied_at_range"),
    BIG - 11: ("1677-09-21 00:00:00+00", "applied_at_range"),
    BIG - 12: ("infinity", "applied_at_representable"),
    BIG - 13: ("1999-12-31 23:59:59.999999+00", "applied_at_range"),
}


@pytest.mark.parametrize("lake", ["local"], indirect=True)
def test_every_accepted_value_reaches_training_the_online_store_and_predict(
    lake: Lake, clients: Any
) -> None:
    """A value that passes silver's rules goes through gold, Feast offline and online and
    `/predict` without an exception; one that a later stage could not hold (a year Feast's
    pandas timestamps cannot represent, infinity) is rejected in silver by a named rule,
    and the run around it completes."""

    from lakehouse.ml.serve import create_app

    s = psycopg.sql.Identifier(lake.settings.pg_schema)
    with psycopg.connect(lake.settings.pg_dsn.get(), autocommit=True) as conn:
        for key, values in EDGE_APPLICANTS.items():
            conn.execute(
                psycopg.sql.SQL(
                    "INSERT INTO {s}.applicants (applicant_id, person_age, person_emp_exp, "
                    "person_income, cb_person_cred_hist_length, credit_score, person_gender, "
                    "person_education, person_home_ownership, previous_loan_defaults_on_file, "
                    "created_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, "
                    "'2000-01-01 00:00:00+00')"
                ).format(s=s),
                (key, *values),
            )
        loans = {k: (v[0], *v[1:5], v[5], v[6]) for k, v in EDGE_LOANS.items()}
        for key, (when, _) in EDGE_REJECTS.items():
            loans[key] = (BIG, 5_000.0, "EDUCATION", 10.0, 0.0, when, 0)
        for key, (applicant, amount, intent, rate, share, when, status) in loans.items():
            conn.execute(
                psycopg.sql.SQL(
                    "INSERT INTO {s}.loan_applications (application_id, applicant_id, "
                    "loan_amnt, loan_intent, loan_int_rate, loan_percent_income, applied_at, "
                    "loan_status) VALUES (%s, %s, %s, %s, %s, %s, %s::timestamptz, %s)"
                ).format(s=s),
                (key, applicant, amount, intent, rate, share, when, status),
            )
    run_all(lake.settings, lake.storage)

    silver = read(lake.storage, "silver", "loan_applications")
    assert set(EDGE_LOANS) <= set(silver["application_id"].to_list())
    rejected = read(lake.storage, "silver", "loan_applications_rejected").filter(
        pl.col("is_current") & pl.col("application_id").is_in(list(EDGE_REJECTS))
    )
    assert dict(zip(rejected["application_id"], rejected["_rule"], strict=True)) == {
        k: rule for k, (_, rule) in EDGE_REJECTS.items()
    }
    # Offline: the labelled edge loans are in the training set with every loan feature.
    training = models.training_set(lake.store, lake.storage)  # type: ignore[arg-type]
    labelled = [k for k, v in EDGE_LOANS.items() if v[6] is not None]
    rows = training[training["application_id"].isin(labelled)]
    assert sorted(rows["application_id"].tolist()) == sorted(labelled)
    # (Applicant features are as of applied_at: a loan dated 2000 predates the applicant's
    # versions here, which were written now, so only the loan's own features are known.)
    assert rows[["loan_amnt", "loan_int_rate", "loan_percent_income"]].notna().all().all()
    # Online and served: every edge application and applicant, and loans at the API's bounds.
    ml_tasks.materialize(lake.settings, lake.storage)
    if not models.Registry(lake.storage).versions():
        ml_tasks.train(lake.settings, lake.storage)
    client = clients(create_app(lake.settings))
    gold = read(lake.storage, "gold", "application_features")
    for key, (_, amount, *_rest) in EDGE_LOANS.items():
        answer = client.post("/predict", json={"application_id": key})
        assert answer.status_code == 200, (key, answer.text)
        assert answer.json()["features"]["loan_amnt"] == amount
        versions = gold.filter(pl.col("application_id") == key).sort("event_timestamp")
        latest = versions.row(-1, named=True)
        for name in FEATURES + APPLICANT:
            assert _same(answer.json()["features"][name], latest[name]), (key, name)
    for applicant in EDGE_APPLICANTS:
        for amount, rate in ((100, 1), (1_000_000, 36)):
            loan = {"loan_amnt": amount, "loan_intent": "VENTURE", "loan_int_rate": rate}
            answer = client.post("/predict", json={"applicant_id": applicant, "loan": loan})
            assert answer.status_code == 200, (applicant, loan, answer.text)
            assert 0 <= answer.json()["probability"] <= 1
    for too_big in ({"application_id": BIG + 1}, {"applicant_id": BIG + 1, "loan": loan}):
        assert client.post("/predict", json=too_big).status_code == 422


# The online store's health does not depend on the warehouse: local disk only (CI time).
@pytest.mark.parametrize("lake", ["local"], indirect=True)
def test_a_lost_or_emptied_online_store_is_reloaded_in_full(lake: Lake, clients: Any) -> None:
    """Deleting the SQLite file, emptying its tables, or dropping the Postgres tables: the
    API answers 503 naming the fix (and creates nothing), completion sees it, and the next
    materialization reloads every row, not the last window."""
    from fastapi.testclient import TestClient

    from lakehouse.ml.serve import ONLINE_STORE_MISSING, create_app

    ml_tasks.materialize(lake.settings, lake.storage)
    if not models.Registry(lake.storage).versions():
        ml_tasks.train(lake.settings, lake.storage)
    assert ml_tasks.materialized(lake.settings, lake.storage)
    app_id = int(read(lake.storage, "gold", "application_features")["application_id"].max())
    client = clients(create_app(lake.settings))
    assert client.post("/predict", json={"application_id": app_id}).status_code == 200

    db = online_store.sqlite_path(lake.settings)
    for suffix in ("", "-wal", "-shm"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)
    for request in ({"application_id": app_id}, {"applicant_id": 1, "loan": LOAN}):
        answer = client.post("/predict", json=request)
        assert (answer.status_code, answer.json()) == (503, {"detail": ONLINE_STORE_MISSING})
    assert not db.exists(), "the API created the online store's file"
    assert not ml_tasks.materialized(lake.settings, lake.storage)
    ml_tasks.materialize(lake.settings, lake.storage)
    # Every application gold holds up to now, not the last window's (issue 14: 31 of 4,996).
    gold = read(lake.storage, "gold", "application_features")
    now = datetime.now(UTC).replace(tzinfo=None)
    due = gold.filter(pl.col("event_timestamp").dt.replace_time_zone(None) <= now)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        (online,) = conn.execute(
            'SELECT count(DISTINCT entity_key) FROM "lakehouse__application_features"'
        ).fetchone()
    assert online == due["application_id"].n_unique()
    full = online_store.row_counts(lake.settings)
    assert full is not None and all(full.values())
    assert ml_tasks.materialized(lake.settings, lake.storage)
    assert client.post("/predict", json={"application_id": app_id}).status_code == 200

    with sqlite3.connect(db) as conn:  # emptied, the file and tables left
        for view in full:
            conn.execute(f'DELETE FROM "lakehouse__{view}"')
    answer = client.post("/predict", json={"application_id": app_id})
    assert (answer.status_code, answer.json()) == (503, {"detail": ONLINE_STORE_MISSING})
    assert not ml_tasks.materialized(lake.settings, lake.storage)
    ml_tasks.materialize(lake.settings, lake.storage)
    assert online_store.row_counts(lake.settings) == full

    on_pg = replace(lake.settings, feast_online_store="postgres")
    try:
        ml_tasks.materialize(on_pg, lake.storage)
        assert online_store.row_counts(on_pg) == full
        with psycopg.connect(lake.settings.pg_dsn.get(), autocommit=True) as conn:
            conn.execute(
                f'DROP TABLE "{lake.settings.pg_schema}_online"."lakehouse__application_features"'
            )
        assert online_store.row_counts(on_pg) is None
        assert not ml_tasks.materialized(on_pg, lake.storage)
        answer = TestClient(create_app(on_pg)).post("/predict", json={"application_id": app_id})
        assert (answer.status_code, answer.json()) == (503, {"detail": ONLINE_STORE_MISSING})
        ml_tasks.materialize(on_pg, lake.storage)
        assert online_store.row_counts(on_pg) == full
    finally:
        # As found for the module's other tests: no Postgres online schema (the Postgres
        # store test creates its own), the registry's infrastructure back to SQLite, and
        # a store whose SQLite connection is not to the file deleted above.
        with psycopg.connect(lake.settings.pg_dsn.get(), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{lake.settings.pg_schema}_online" CASCADE')
        lake.store = features.feature_store(lake.settings, lake.storage)
        features.apply(lake.store)  # type: ignore[arg-type]


LOAN = {"loan_amnt": 5000, "loan_intent": "VENTURE", "loan_int_rate": 10}
