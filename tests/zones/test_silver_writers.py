"""Several writers on one silver table: each step lands once, a loser lands nothing.

Issue 13, reproduction 1: two `lakehouse run` on one warehouse both committed the same
promotion (history held every key twice, `_rejected` twice as many rows), because the
progress read at the start was never checked at commit time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import polars as pl
import pytest

from lakehouse.settings import Settings
from lakehouse.storage import Storage
from lakehouse.zones import bronze, silver
from tests.conftest import env_for
from tests.helpers import churn, read, seeded
from tests.zones.test_silver import assert_same_rows, expected

PROMOTE = (
    "from lakehouse.settings import Settings; from lakehouse.storage import Storage; "
    "from lakehouse.zones import silver; "
    "r = silver.promote(Storage.from_settings(Settings.from_env()), 'applicants'); "
    "print('retries', r.retries, 'rows', sum(r.rows.values()))"
)


def assert_each_version_once(storage: Storage) -> None:
    """No key twice in current, no version twice in history or rejects, one open version."""
    for table, key in (("applicants", "applicant_id"), ("loan_applications", "application_id")):
        current = read(storage, "silver", table)
        assert current[key].is_unique().all(), f"{table}: a key twice"
        history = read(storage, "silver", f"{table}_history")
        assert history.select(key, "_lsn", "_seq").is_unique().all(), f"{table}_history: twice"
        opened = history.filter(pl.col("valid_to").is_null())
        assert opened[key].is_unique().all()
        assert sorted(opened[key]) == sorted(current[key])
        if storage.exists("silver", f"{table}_rejected"):
            rejected = read(storage, "silver", f"{table}_rejected")
            assert rejected.select(key, "_lsn", "_seq").is_unique().all()
            assert rejected.filter(pl.col("is_current"))[key].is_unique().all()


def test_a_writer_that_read_before_another_committed_lands_nothing_twice(
    settings: Settings,
) -> None:
    storage = seeded(settings, rows=300)
    for table in ("loan_applications", "applicants"):
        bronze.ingest(settings, storage, table)
    silver.promote(storage, "applicants")
    churn(settings, changes=200)
    bronze.ingest(settings, storage, "applicants")
    # Writer A reads the targets and computes, then waits just before its first commit...
    env = {
        **os.environ,
        **env_for(settings),
        "LAKEHOUSE_FAILPOINT": "silver.applicants_rejected.mid-write",
        "LAKEHOUSE_FAILPOINT_PAUSE": "3",
    }
    child = subprocess.Popen(
        [sys.executable, "-c", PROMOTE],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stderr is not None
    for line in child.stderr:
        if "failpoint silver.applicants_rejected.mid-write reached" in line:
            break
    else:
        pytest.fail(f"writer A ended early: {child.wait()}")
    # ...while writer B promotes the same batch, to the end.
    silver.promote(storage, "applicants")
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    # A's commit found B's and landed nothing; it planned again and found nothing to do.
    assert out.split()[:2] == ["retries", "1"], out
    assert out.split()[3] == "0", out
    assert silver.is_current(storage, "applicants")
    applicants, _ = expected(settings)
    assert_same_rows(read(storage, "silver", "applicants"), applicants, "applicant_id")
    history = read(storage, "silver", "applicants_history")
    assert history.select("applicant_id", "_lsn", "_seq").is_unique().all()


def test_writers_in_threads_race_on_every_step(settings: Settings) -> None:
    """Four writers at once, several rounds: every version once, silver equals the source."""
    storage = seeded(settings, rows=400)
    for round_ in range(3):
        churn(settings, changes=150, seed_value=round_)
        for table in ("loan_applications", "applicants"):
            bronze.ingest(settings, storage, table)
        errors: list[BaseException] = []

        def writer(errors: list[BaseException] = errors) -> None:
            try:
                for table in ("applicants", "loan_applications"):
                    silver.promote(Storage.from_settings(settings), table)
            except BaseException as exc:  # re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=writer) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
    assert all(silver.is_current(storage, t) for t in ("applicants", "loan_applications"))
    assert_each_version_once(storage)
    applicants, loans = expected(settings)
    assert_same_rows(read(storage, "silver", "applicants"), applicants, "applicant_id")
    assert_same_rows(read(storage, "silver", "loan_applications"), loans, "application_id")


def test_two_pipeline_runs_at_once_on_one_warehouse(settings: Settings) -> None:
    """The reproduction as a user met it: two `lakehouse run` started together."""
    storage = seeded(settings, rows=2000)
    env = {**os.environ, **env_for(settings)}
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "lakehouse.cli", "run", "--no-ml"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outcomes = [r.communicate(timeout=600) for r in runs]
    # Each run did the work or found it done (the second ingest of a table waits for the
    # first, then finds nothing new; a promotion that lost a race found it done).
    assert [r.returncode for r in runs] == [0, 0], outcomes
    again = subprocess.run(
        [sys.executable, "-m", "lakehouse.cli", "run", "--no-ml"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout, again.stdout
    assert_each_version_once(storage)
    rejected = read(storage, "silver", "applicants_rejected")
    assert rejected.height == rejected["applicant_id"].n_unique()
    applicants, loans = expected(settings)
    assert_same_rows(read(storage, "silver", "applicants"), applicants, "applicant_id")
    assert_same_rows(read(storage, "silver", "loan_applications"), loans, "application_id")


def test_a_view_read_while_another_writer_committed_is_planned_again(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that read `_rejected` before another writer's promotion and the other
    targets after it sees them out of commit order: that is a race, not a broken silver
    (the property test found it as 'one promotion ahead ... rebuild silver')."""
    from lakehouse.zones import silver_state

    storage = seeded(settings, rows=60)
    bronze.ingest(settings, storage, "applicants")
    silver.promote(storage, "applicants")
    stale = storage.table("silver", "applicants_rejected")
    churn(settings, changes=40)
    bronze.ingest(settings, storage, "applicants")
    silver.promote(storage, "applicants")  # the other writer: every target one step on
    real = silver_state.Targets.read
    torn: list[bool] = []

    def read_torn(cls: type, storage: Storage, table: str) -> silver_state.Targets:
        view = real(storage, table)
        if not torn:
            torn.append(True)
            view.tables["rejected"] = stale
            view.marks["rejected"] = silver_state.read_marks(stale, table, "rejected")
        return view

    monkeypatch.setattr(silver_state.Targets, "read", classmethod(read_torn))
    result = silver.promote(storage, "applicants")
    assert torn and result.retries == 1 and sum(result.rows.values()) == 0
    applicants, _ = expected(settings)
    assert_same_rows(read(storage, "silver", "applicants"), applicants, "applicant_id")


@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_a_writer_outpaced_by_another_is_done_once_its_goal_is_taken_in(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Beside a writer that always commits first (the stream's speed layer promoting every
    second), `lakehouse verify` and the pipeline's promotion lost 8 times in a row and
    failed (the compose rehearsal, under load). A call asks for silver as of its start:
    once another writer has taken that in, the call is done."""
    storage = seeded(settings, rows=60)
    bronze.ingest(settings, storage, "applicants")
    silver.promote(storage, "applicants")
    churn(settings, changes=20)
    bronze.ingest(settings, storage, "applicants")
    real_run = silver._run
    rivals: list[int] = []

    def outpaced(*args: object) -> None:
        # Each attempt of the caller: a rival promotes first (taking in all there is),
        # then more arrives, so the caller always has something left to plan.
        if len(rivals) <= silver.ATTEMPTS:
            rivals.append(1)
            monkeypatch.setattr(silver, "_run", real_run)
            try:
                silver.promote(storage, "applicants")
            finally:
                monkeypatch.setattr(silver, "_run", outpaced)
            churn(settings, changes=3)
            bronze.ingest(settings, storage, "applicants")
        real_run(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(silver, "_run", outpaced)
    result = silver.promote(storage, "applicants")
    assert len(rivals) == 1 and result.retries == 1
    monkeypatch.setattr(silver, "_run", real_run)
    silver.promote(storage, "applicants")  # what came after the call: the next one's
    applicants, _ = expected(settings)
    assert_same_rows(read(storage, "silver", "applicants"), applicants, "applicant_id")
