"""A promotion (and an ingest) killed with SIGKILL midway leaves every table as it was."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import polars as pl
import pytest

from lakehouse.settings import Settings
from lakehouse.storage import Storage
from lakehouse.zones import bronze, silver
from tests.conftest import env_for
from tests.helpers import churn, read, run_all, seeded
from tests.zones.test_silver import assert_same_rows, expected

SILVER = ("applicants", "applicants_history", "applicants_rejected")


def run_until_failpoint(settings: Settings, code: str, failpoint: str) -> None:
    """Run `code` in a child process, wait for it to reach `failpoint`, then SIGKILL it."""
    env = {**os.environ, **env_for(settings), "LAKEHOUSE_FAILPOINT": failpoint}
    child = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True
    )
    assert child.stderr is not None
    deadline = time.monotonic() + 120
    try:
        for line in child.stderr:
            if f"failpoint {failpoint} reached" in line:
                break
            assert time.monotonic() < deadline, "failpoint never reached"
        else:
            pytest.fail(f"child exited ({child.wait()}) before failpoint {failpoint}")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL


def snapshot(storage: Storage) -> dict[str, tuple[int, pl.DataFrame]]:
    return {t: (storage.table("silver", t).version(), read(storage, "silver", t)) for t in SILVER}


PROMOTE = (
    "from lakehouse.settings import Settings; from lakehouse.storage import Storage; "
    "from lakehouse.zones import silver; "
    "silver.promote(Storage.from_settings(Settings.from_env()), 'applicants')"
)
INGEST = (
    "from lakehouse.settings import Settings; from lakehouse.storage import Storage; "
    "from lakehouse.zones import bronze; s = Settings.from_env(); "
    "bronze.ingest(s, Storage.from_settings(s), 'applicants')"
)


def test_killed_promotion_changes_nothing_and_rerun_completes(settings: Settings) -> None:
    storage = seeded(settings, rows=300)
    run_all(settings, storage, with_gold=False)
    churn(settings, changes=300)
    bronze.ingest(settings, storage, "applicants")
    before = snapshot(storage)

    # Killed while writing the first target: no table changed.
    run_until_failpoint(settings, PROMOTE, "silver.applicants_rejected.mid-write")
    after = snapshot(storage)
    for name, (version, frame) in before.items():
        assert after[name][0] == version, name
        assert after[name][1].equals(frame), name
    assert not silver.is_current(storage, "applicants")

    # Killed midway through the MERGE of the last target: the earlier targets committed
    # whole, the current-state table is untouched.
    run_until_failpoint(settings, PROMOTE, "silver.applicants.mid-write")
    after = snapshot(storage)
    assert after["applicants"][0] == before["applicants"][0]
    assert after["applicants"][1].equals(before["applicants"][1])
    assert after["applicants_history"][0] == before["applicants_history"][0] + 1
    progress = silver.progress(storage, "applicants")
    assert progress["history"] == progress["rejected"] == bronze.last_batch(storage, "applicants")

    # The rerun finishes the job; the result equals the source.
    silver.promote(storage, "applicants")
    assert silver.is_current(storage, "applicants")
    applicants, _ = expected(settings)
    assert_same_rows(read(storage, "silver", "applicants"), applicants, "applicant_id")
    history = read(storage, "silver", "applicants_history")
    assert history.filter(pl.col("valid_to").is_null())["applicant_id"].is_unique().all()


def test_killed_first_load_creates_no_table_and_rerun_completes(settings: Settings) -> None:
    # A first load writes Parquet files into the new tables' folders, then one commit
    # per table creates it: killed in between, the table does not exist.
    storage = seeded(settings, rows=300)
    bronze.ingest(settings, storage, "applicants")
    run_until_failpoint(settings, PROMOTE, "silver.applicants_history.mid-write")
    assert storage.exists("silver", "applicants_rejected")
    assert not storage.exists("silver", "applicants_history")
    assert not storage.exists("silver", "applicants")
    assert silver.progress(storage, "applicants")["history"] is None

    # The rerun creates the missing tables; files left by the killed run are not read.
    silver.promote(storage, "applicants")
    assert silver.is_current(storage, "applicants")
    applicants, _ = expected(settings)
    assert_same_rows(read(storage, "silver", "applicants"), applicants, "applicant_id")
    history = read(storage, "silver", "applicants_history")
    assert history.height == applicants.height
    assert history["applicant_id"].is_unique().all()


def test_killed_ingest_appends_nothing(settings: Settings) -> None:
    storage = seeded(settings, rows=3000)
    bronze.ingest(settings, storage, "applicants")
    churn(settings, changes=500)
    version = storage.table("bronze", "applicants").version()
    rows = read(storage, "bronze", "applicants").height
    run_until_failpoint(settings, INGEST, "bronze.mid-write")
    assert storage.table("bronze", "applicants").version() == version
    assert read(storage, "bronze", "applicants").height == rows
    result = bronze.ingest(settings, storage, "applicants")
    assert result.rows > 0
    assert read(storage, "bronze", "applicants").height == rows + result.rows + result.deletes
