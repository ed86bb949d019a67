"""A gold feature table updated by its touched entities equals a full build, bit for bit.

Round after round of source changes (simulator bursts with decisions and withdrawals, an
application backfilled years back, applicants updated, applications moved to another
applicant), each followed by a run whose gold builds recompute only the entities the
change touched (`lakehouse.zones.gold_update`), each update starting from the last one.
After every round both feature tables must hold exactly the rows a full build computes
over a copy of the same silver, built in another folder.

CI runs three rounds on local disk and one on S3; `HYPOTHESIS_PROFILE=long` (or
GOLD_UPDATE_ROUNDS=N) runs more.
"""

from __future__ import annotations

import os
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from lakehouse.maintain import maintain
from lakehouse.settings import Settings
from lakehouse.source import schema
from lakehouse.source.schema import TABLES
from lakehouse.storage import Storage, _split_s3, minio_client
from lakehouse.transforms.gold import GOLD
from lakehouse.zones import bronze, gold, gold_marks, gold_update, silver
from tests.helpers import churn, insert_late_application, move_applications, read, run_all, seeded

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
ROUNDS = int(os.environ.get("GOLD_UPDATE_ROUNDS") or (12 if LONG else 3))
FEATURES = {"applicant_features": "applicant_id", "application_features": "application_id"}


def _change(settings: Settings, round_: int) -> None:
    """One round's source changes: a burst, and in turn a backfill, edits or moves."""
    churn(settings, changes=40 + 10 * round_, seed_value=100 + round_)
    kind = round_ % 3
    if kind == 0:
        insert_late_application(settings, loan_amnt=1000.0 + round_)
    elif kind == 1:
        with schema.connect(settings, autocommit=True) as conn:
            s = settings.pg_schema
            conn.execute(
                f'UPDATE "{s}".applicants SET credit_score = credit_score + 1, '
                f"updated_at = now() WHERE applicant_id % 17 = {round_ % 17}"
            )
    else:
        assert move_applications(settings, 2)


def _promote(settings: Settings, storage: Storage) -> None:
    for table in TABLES:
        bronze.ingest(settings, storage, table)
        silver.promote(storage, table)


def _copy_silver(storage: Storage, dest: Path) -> None:
    """Copy every silver table, log and files, to a local folder."""
    if not storage.is_s3:
        shutil.copytree(Path(storage.root) / "silver", dest / "silver")
        return
    client = minio_client(storage.s3, storage.options)
    bucket, prefix = _split_s3(storage.root)
    for obj in client.list_objects(bucket, prefix=f"{prefix}/silver/", recursive=True):
        name = obj.object_name
        assert name is not None
        client.fget_object(bucket, name, str(dest / name[len(prefix) + 1 :]))


def _full_build(settings: Settings, storage: Storage, folder: Path) -> dict[str, pl.DataFrame]:
    """Build both feature tables whole over a copy of silver as it is now."""
    _copy_silver(storage, folder)
    shadow_settings = replace(settings, storage_uri=str(folder))
    shadow = Storage.from_settings(shadow_settings)
    for name in FEATURES:
        assert gold.build(shadow_settings, shadow, name).recomputed is None
    return {name: read(shadow, "gold", name) for name in FEATURES}


def _sorted(frame: pl.DataFrame, key: str) -> pl.DataFrame:
    return frame.sort(key, "event_timestamp")


def _rounds(settings: Settings, tmp_path: Path, rounds: int) -> None:
    # Every round takes the path under test, however much it changes (the size guard
    # has its own test below).
    gold_update.MAX_CHANGED_SHARE, share = 1.0, gold_update.MAX_CHANGED_SHARE
    try:
        _run_rounds(settings, tmp_path, rounds)
    finally:
        gold_update.MAX_CHANGED_SHARE = share


def _run_rounds(settings: Settings, tmp_path: Path, rounds: int) -> None:
    storage = seeded(settings, rows=300)
    run_all(settings, storage)
    for round_ in range(rounds):
        _change(settings, round_)
        _promote(settings, storage)
        files = {name: len(storage.table("gold", name).file_uris()) for name in FEATURES}
        results = {name: gold.build(settings, storage, name) for name in GOLD}
        # The new rows go into a rewritten file: an update adds no file of its own.
        assert {name: len(storage.table("gold", name).file_uris()) for name in FEATURES} == files
        rows = {name: read(storage, "gold", name) for name in FEATURES}
        for name in FEATURES:
            # Only the touched entities were computed: the path under test was taken.
            recomputed = results[name].recomputed
            assert recomputed is not None, name
            assert 0 < recomputed < rows[name][FEATURES[name]].n_unique(), name
        full = _full_build(settings, storage, tmp_path / f"full-{round_}")
        for name, key in FEATURES.items():
            assert_frame_equal(_sorted(rows[name], key), _sorted(full[name], key), check_exact=True)


@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_updated_tables_equal_a_full_build(settings: Settings, tmp_path: Path) -> None:
    _rounds(settings, tmp_path, ROUNDS)


@pytest.mark.parametrize("settings", ["s3"], indirect=True)
def test_updated_tables_equal_a_full_build_on_s3(settings: Settings, tmp_path: Path) -> None:
    _rounds(settings, tmp_path, 1)


@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_what_cannot_be_updated_exactly_or_cheaply_is_built_whole(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change touching most of the table, and a table built by another definition (an
    upgrade changed its SQL), are built whole: old rows are never patched."""
    storage = seeded(settings, rows=200)
    run_all(settings, storage)
    with schema.connect(settings, autocommit=True) as conn:
        conn.execute(
            f'UPDATE "{settings.pg_schema}".applicants SET credit_score = credit_score + 1, '
            "updated_at = now()"
        )
    _promote(settings, storage)
    built = gold.build(settings, storage, "applicant_features")
    assert built.built and built.recomputed is None
    churn(settings, changes=10, seed_value=3)
    _promote(settings, storage)
    built = gold.build(settings, storage, "applicant_features")
    assert built.built and built.recomputed is not None  # a small change: updated
    churn(settings, changes=10, seed_value=4)
    _promote(settings, storage)
    with monkeypatch.context() as patched:
        patched.setattr(gold_marks, "definition", lambda name: 12345)
        built = gold.build(settings, storage, "applicant_features")
        assert built.built and built.recomputed is None
    # The table application_features reads changed definition, silver did not: its
    # rows would keep the old one's values. Built whole.
    spec = GOLD["applicant_features"]
    monkeypatch.setitem(gold.ALL_GOLD, "applicant_features", replace(spec, sql=spec.sql + " "))
    for name in FEATURES:
        built = gold.build(settings, storage, name)
        assert built.built and built.recomputed is None, name
    monkeypatch.undo()
    # A version the last build read, vacuumed: nothing to diff from. Built whole.
    churn(settings, changes=10, seed_value=5)
    _promote(settings, storage)
    for name in FEATURES:
        gold.build(settings, storage, name, incremental=False)
    churn(settings, changes=10, seed_value=6)
    _promote(settings, storage)
    churn(settings, changes=10, seed_value=8)
    _promote(settings, storage)
    maintain(storage, retention_hours=0)
    built = gold.build(settings, storage, "applicant_features")
    assert built.built and built.recomputed is None


@pytest.mark.parametrize("settings", ["local", "s3"], indirect=True)
def test_updates_racing_each_other_and_maintain_land_once(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three runs update both feature tables at once from the same state while
    `lakehouse maintain` compacts: each table lands one update, the others find it done
    (or say they lost), and the rows are a full build's, each entity's once."""
    from lakehouse.errors import StorageError

    monkeypatch.setattr(gold, "_FILE_ROWS", 40)  # files for maintain to compact
    monkeypatch.setattr(gold, "_BATCH", 40)
    storage = seeded(settings, rows=200)
    run_all(settings, storage)
    assert len(storage.table("gold", "application_features").file_uris()) > 1
    churn(settings, changes=30, seed_value=21)
    insert_late_application(settings, loan_amnt=777.0)
    _promote(settings, storage)
    results: list[gold.GoldResult] = []
    errors: list[BaseException] = []

    def builder() -> None:
        try:
            mine = Storage.from_settings(settings)
            results.extend(gold.build(settings, mine, name) for name in FEATURES)
        except BaseException as exc:  # re-raised below
            errors.append(exc)

    def maintainer() -> None:
        for _ in range(3):
            try:
                maintain(Storage.from_settings(settings), retention_hours=168)
            except StorageError:
                pass  # lost to a build: says so, changes nothing
            except BaseException as exc:  # re-raised below
                errors.append(exc)

    threads = [threading.Thread(target=builder) for _ in range(3)]
    threads.append(threading.Thread(target=maintainer))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    landed = [r for r in results if r.built]
    assert sorted(r.table for r in landed) == sorted(FEATURES)  # one update each
    assert all(r.recomputed is not None for r in landed)
    assert all(gold_marks.is_current(storage, name) for name in FEATURES)
    full = _full_build(settings, Storage.from_settings(settings), tmp_path / "full")
    for name, key in FEATURES.items():
        rows = read(storage, "gold", name)
        assert rows.select(key, "event_timestamp").is_duplicated().sum() == 0, name
        assert_frame_equal(_sorted(rows, key), _sorted(full[name], key), check_exact=True)


@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_silver_made_anew_is_no_common_past(settings: Settings, tmp_path: Path) -> None:
    """Silver tables deleted and promoted again (as Troubleshooting advises) start their
    versions over: the version gold recorded now names another table's state, and the
    update must not diff against it. The build is whole, and equals a full build."""
    storage = seeded(settings, rows=200)
    run_all(settings, storage)
    recorded = gold_marks.built_from(storage, "applicant_features")["applicants_history"]
    with schema.connect(settings, autocommit=True) as conn:
        conn.execute(
            f'UPDATE "{settings.pg_schema}".applicants SET credit_score = credit_score + 3, '
            "updated_at = now() WHERE applicant_id % 5 = 0"
        )
    for target in ("applicants", "applicants_history", "applicants_rejected"):
        shutil.rmtree(storage.uri("silver", target))
    _promote(settings, storage)
    again = Storage.from_settings(settings)
    assert again.data_version("silver", "applicants_history") == recorded  # same number
    results = {name: gold.build(settings, again, name) for name in FEATURES}
    assert all(r.built and r.recomputed is None for r in results.values()), results
    full = _full_build(settings, again, tmp_path / "full")
    for name, key in FEATURES.items():
        rows = read(again, "gold", name)
        assert_frame_equal(_sorted(rows, key), _sorted(full[name], key), check_exact=True)
