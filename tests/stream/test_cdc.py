"""CDC end to end: snapshot hand-off, exactly-once delivery, silver from changes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import polars as pl
import psycopg
import pytest

from lakehouse.settings import Settings
from lakehouse.source import schema
from lakehouse.source.simulate import simulate
from lakehouse.storage import Storage
from lakehouse.zones import bronze, silver
from stream import changes, liveness, setup
from tests.conftest import env_for
from tests.helpers import read, run_all, seeded, wait_until
from tests.stream.helpers import (
    Witness,
    assert_exactly_once,
    current_lsn,
    stream_settings,
    stream_while,
    wait_landed,
)
from tests.zones.test_silver import assert_same_rows, expected


def alive(settings: Settings) -> tuple[int, str]:
    """Run `lakehouse stream alive` (the liveness probe); return its code and first clause."""
    done = subprocess.run(
        [sys.executable, "-m", "lakehouse.cli", "stream", "alive"],
        env={**os.environ, **env_for(settings)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, (done.stdout + done.stderr).split(";")[0].strip()


def assert_silver_equals_source(settings: Settings, storage: Storage) -> None:
    applicants, loans = expected(settings)
    assert_same_rows(read(storage, "silver", "applicants"), applicants, "applicant_id")
    assert_same_rows(read(storage, "silver", "loan_applications"), loans, "application_id")


class Writer:
    """Writes realistic changes to the source in a loop until stopped."""

    def __init__(self, settings: Settings, *, pause: float = 0.01) -> None:
        self.settings = settings
        self.pause = pause
        self.stop = threading.Event()
        self.total = 0
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        with schema.connect(self.settings, autocommit=True) as conn:
            round_ = 0
            while not self.stop.is_set():
                result = simulate(
                    conn, self.settings.pg_schema, changes=20, batch_size=5, seed=1000 + round_
                )
                self.total += result.total
                round_ += 1
                time.sleep(self.pause)

    def __enter__(self) -> Writer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def test_snapshot_hands_off_to_the_stream_under_load(settings: Settings) -> None:
    settings = stream_settings(settings)
    storage = seeded(settings, rows=300)
    run_all(settings, storage, with_gold=False)  # the batch path ran before CDC started
    witness = Witness(settings)
    with Writer(settings) as writer:
        time.sleep(0.3)
        results = setup.setup(settings, storage)  # snapshot taken while writes go on
        assert all(r.created for r in results)
        snapshot_lsn = {r.table: r.snapshot_lsn for r in results}
        stream_while(settings, storage, lambda: time.sleep(1.5))
        writer.stop.set()
    assert writer.total > 0
    stream_while(settings, storage, lambda: None)  # land the writer's last transactions
    for table, lsn in snapshot_lsn.items():
        assert lsn is not None
        assert assert_exactly_once(witness, storage, table, lsn) > 0
    # The batch path still runs: bronze extraction stands aside, silver takes the changes.
    for table in snapshot_lsn:
        assert bronze.ingest(settings, storage, table).mode == "stream"
    run_all(settings, storage, with_gold=False)
    assert_silver_equals_source(settings, storage)
    assert all(silver.is_current(storage, t) for t in snapshot_lsn)
    # Setup again is a no-op: same slots, no new snapshot.
    assert not any(r.created for r in setup.setup(settings, storage))


def test_silver_from_changes_key_change_toast_truncate(settings: Settings) -> None:
    settings = stream_settings(settings)
    storage = seeded(settings, rows=200)
    setup.setup(settings, storage)
    s = settings.pg_schema
    big = os.urandom(6000).hex()  # incompressible: stored out of line (TOAST)
    valid_7 = expected(settings)[0].filter(pl.col("applicant_id") == 7)
    assert valid_7.height == 1  # applicant 7 starts valid

    def work() -> None:
        with schema.connect(settings, autocommit=True) as conn:
            conn.execute(
                f'INSERT INTO "{s}".applicants (applicant_id, person_age, person_gender, '
                "person_education, person_income, person_emp_exp, person_home_ownership, "
                "cb_person_cred_hist_length, credit_score, previous_loan_defaults_on_file) "
                "VALUES (900001, 30, 'male', 'Master', 50000, 5, 'RENT', 4, 700, 'No')"
            )
            conn.execute(
                f'UPDATE "{s}".applicants SET applicant_id = 900002 WHERE applicant_id = 900001'
            )
            conn.execute(
                f'UPDATE "{s}".applicants SET person_home_ownership = %s WHERE applicant_id = 7',
                (big,),
            )
            conn.execute(f'UPDATE "{s}".applicants SET credit_score = 701 WHERE applicant_id = 7')
            conn.execute(f'DELETE FROM "{s}".loan_applications WHERE application_id <= 5')
            simulate(conn, s, changes=150, batch_size=10, seed=5)
            conn.execute(f'TRUNCATE "{s}".loan_applications')
            simulate(conn, s, changes=150, batch_size=10, seed=6)

    stream_while(settings, storage, work, promote=True)
    # The speed layer already merged everything: the batch path has nothing left to do.
    assert all(silver.is_current(storage, t) for t in ("applicants", "loan_applications"))
    assert silver.promote(storage, "applicants").rows == {}
    # Applicant 7's last versions broke a rule: it left silver (README, "Silver equals
    # the source"), and history closed its last valid version, the seeded one.
    applicants, loans = expected(settings)
    assert 7 not in applicants["applicant_id"]
    assert_same_rows(read(storage, "silver", "applicants"), applicants, "applicant_id")
    assert_same_rows(read(storage, "silver", "loan_applications"), loans, "application_id")
    history_7 = read(storage, "silver", "applicants_history").filter(pl.col("applicant_id") == 7)
    assert history_7["is_current"].to_list() == [False]
    assert history_7["valid_to"].null_count() == 0
    assert_same_rows(history_7, valid_7, "applicant_id")

    log = read(storage, "bronze", "applicants_changes")
    toast = (
        log.filter((pl.col("credit_score") == 701) & (pl.col("applicant_id") == 7))
        .sort("_commit_lsn", "_seq")
        .tail(1)
    )
    assert toast["_unchanged"].to_list() == [["person_home_ownership"]]
    assert toast["person_home_ownership"].to_list() == [None]
    # The unchanged value was carried from the previous version (both are rejected: not a
    # known category, so the raw values are in the rejects table).
    rejected = read(storage, "silver", "applicants_rejected").filter(pl.col("applicant_id") == 7)
    assert sorted(rejected["credit_score"].to_list())[-1] == 701
    assert set(rejected["person_home_ownership"]) == {big}

    history = read(storage, "silver", "applicants_history")
    moved = history.filter(pl.col("applicant_id").is_in([900001, 900002]))
    assert moved.filter(pl.col("applicant_id") == 900001)["valid_to"].null_count() == 0
    assert moved.filter(pl.col("applicant_id") == 900002)["valid_to"].to_list() == [None]
    assert (
        read(storage, "bronze", "loan_applications_changes")["_op"].to_list().count("truncate") == 1
    )


# Local disk only (CI time): the batching logic is storage-independent; the S3 stream runs in the
# kill and hand-off tests.
@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_added_column_reaches_bronze_and_silver_keeps_working(settings: Settings) -> None:
    settings = stream_settings(settings)
    storage = seeded(settings, rows=100)
    setup.setup(settings, storage)
    s = settings.pg_schema

    def work() -> None:
        with schema.connect(settings, autocommit=True) as conn:
            simulate(conn, s, changes=50, batch_size=10, seed=1)
            conn.execute(f'ALTER TABLE "{s}".applicants ADD COLUMN nickname text')
            conn.execute(
                f"UPDATE \"{s}\".applicants SET nickname = 'n' || applicant_id "
                "WHERE applicant_id <= 10"
            )
            simulate(conn, s, changes=50, batch_size=10, seed=2)

    stream_while(settings, storage, work)
    log = read(storage, "bronze", "applicants_changes")
    assert log.schema["nickname"] == pl.Utf8
    named = log.filter(pl.col("nickname").is_not_null())
    assert sorted(named["nickname"].to_list()) == sorted(f"n{i}" for i in range(1, 11))
    run_all(settings, storage, with_gold=False)
    # Silver keeps its own columns (the new one stays in bronze until silver adopts it).
    applicants, loans = expected(settings)
    assert_same_rows(
        read(storage, "silver", "applicants"), applicants.drop("nickname"), "applicant_id"
    )
    assert_same_rows(read(storage, "silver", "loan_applications"), loans, "application_id")


def lakehouse_stream(
    settings: Settings, *args: str, failpoint: str | None = None
) -> subprocess.Popen[str]:
    env = {**os.environ, **env_for(settings)}
    if failpoint:
        env["LAKEHOUSE_FAILPOINT"] = failpoint
    return subprocess.Popen(
        [sys.executable, "-m", "lakehouse.cli", "stream", *args],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )


def wait_for_line(child: subprocess.Popen[str], text: str, timeout: float = 60) -> None:
    assert child.stderr is not None
    deadline = time.monotonic() + timeout
    for line in child.stderr:
        if text in line:
            return
        assert time.monotonic() < deadline, f"{text!r} not seen"
    pytest.fail(f"child exited ({child.wait()}) before printing {text!r}")


def wait_active(settings: Settings, active: bool, timeout: float = 60) -> None:
    """Wait until both slots are (or are no longer) in use by a consumer."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(settings.pg_dsn.get(), autocommit=True) as conn:
        while True:
            rows = conn.execute(
                "SELECT bool_and(active) = %s FROM pg_replication_slots WHERE slot_name LIKE %s",
                (active, f"lakehouse_{settings.pg_schema}_%"),
            ).fetchone()
            if rows and rows[0]:
                return
            assert time.monotonic() < deadline, f"slots never became active={active}"
            time.sleep(0.1)


def wait_for_a_commit(child: subprocess.Popen[str], storage: Storage) -> None:
    """Wait until a stream just started lands a micro-batch in either change log."""

    def commits() -> int:
        return sum(
            storage.table("bronze", changes.changes_table(t)).version() + 1
            for t in ("applicants", "loan_applications")
            if storage.exists("bronze", changes.changes_table(t))
        )

    landed = commits()
    try:
        wait_until(
            lambda: child.poll() is not None or commits() > landed,
            60,
            "a micro-batch landed by the stream",
            every=0.1,
        )
    except AssertionError:
        child.kill()  # a consumer left running keeps its slot and the cluster up
        child.wait()
        raise
    assert child.poll() is None, child.communicate()[1][-2000:]


def test_sigkill_at_random_points_loses_and_duplicates_nothing(settings: Settings) -> None:
    settings = stream_settings(settings)
    storage = seeded(settings, rows=300)
    witness = Witness(settings)
    results = setup.setup(settings, storage)
    rng = random.Random(7)
    with Writer(settings, pause=0.02):
        # Killed between a Delta commit and telling the server: the replay must be skipped.
        child = lakehouse_stream(settings, failpoint="stream.applicants.after-commit")
        wait_for_line(child, "failpoint stream.applicants.after-commit reached")
        child.send_signal(signal.SIGKILL)
        child.wait()
        for _ in range(3):  # killed at random points, once each has landed a batch
            wait_active(settings, active=False)
            child = lakehouse_stream(settings)
            wait_for_a_commit(child, storage)
            time.sleep(rng.uniform(0.0, 1.0))
            child.send_signal(signal.SIGKILL)
            child.wait()
            assert child.returncode == -signal.SIGKILL
    wait_active(settings, active=False)
    # A killed stream leaves its heartbeat: once old, the liveness probe fails.
    beat = liveness.heartbeat_path(settings)
    os.utime(beat, (time.time() - 600, time.time() - 600))
    code, said = alive(settings)
    assert code == 1 and said.startswith("stream not alive: last turn 60"), said
    end = current_lsn(settings)
    child = lakehouse_stream(settings)
    wait_landed(settings, storage, end, timeout=120)
    assert alive(settings)[0] == 0  # the new one beats; the old file was no proof
    child.send_signal(signal.SIGTERM)  # graceful: lands what it holds, exits 0
    assert child.wait(timeout=60) == 0
    assert not beat.exists()  # stopped: not alive
    for r in results:
        assert r.snapshot_lsn is not None
        assert_exactly_once(witness, storage, r.table, r.snapshot_lsn)
    run_all(settings, storage, with_gold=False)
    assert_silver_equals_source(settings, storage)


def test_two_bytewax_processes_share_the_slots(base_settings: Settings, tmp_path: Path) -> None:
    from lakehouse.source.embedded import free_port

    settings = stream_settings(base_settings)
    storage = seeded(settings, rows=100)
    witness = Witness(settings)
    results = setup.setup(settings, storage)
    addresses = ";".join(f"127.0.0.1:{free_port()}" for _ in range(2))
    env = {**os.environ, **env_for(settings)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bytewax.run", "stream.cdc:flow", "-i", str(i), "-a", addresses],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        wait_active(settings, active=True)
        with psycopg.connect(settings.pg_dsn.get(), autocommit=True) as conn:
            pids = conn.execute(
                "SELECT count(DISTINCT active_pid) FROM pg_replication_slots "
                "WHERE slot_name LIKE %s",
                (f"lakehouse_{settings.pg_schema}_%",),
            ).fetchone()
            assert pids == (2,)  # one consumer per slot
            simulate(conn, settings.pg_schema, changes=300, batch_size=10, seed=3)
        wait_landed(settings, storage, current_lsn(settings))
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=60) for p in procs]
    assert codes == [0, 0], [p.stderr.read() if p.stderr else "" for p in procs]
    for r in results:
        assert r.snapshot_lsn is not None
        assert assert_exactly_once(witness, storage, r.table, r.snapshot_lsn) > 0
    run_all(settings, storage, with_gold=False)
    assert_silver_equals_source(settings, storage)


def test_idle_table_slot_advances_and_status_shows_it(base_settings: Settings) -> None:
    settings = stream_settings(base_settings)
    storage = seeded(settings, rows=50)
    setup.setup(settings, storage)
    s = settings.pg_schema

    def only_applicants() -> None:
        with schema.connect(settings, autocommit=True) as conn:
            for i in range(1, 30):
                conn.execute(
                    f'UPDATE "{s}".applicants SET credit_score = 600 + %s WHERE applicant_id = %s',
                    (i, i),
                )

    stream_while(settings, storage, only_applicants)
    # wait_landed (inside) required the idle loan_applications log to reach the WAL end too.
    status = {t.table: t for t in setup.status(settings, storage)}
    assert status["applicants"].changes == 29
    assert status["loan_applications"].changes == 0
    assert status["loan_applications"].landed_lsn is not None
    out = subprocess.run(
        [sys.executable, "-m", "lakehouse.cli", "stream", "status"],
        env={**os.environ, **env_for(settings)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    # Every published change has landed: "caught up", however much other WAL was written.
    rows = out.splitlines()[2:4]  # below the header and its rule
    assert [line.split("|")[4].strip() for line in rows] == ["caught up"] * 2, out
    assert changes.slot_name(s, "loan_applications") in out


@pytest.mark.parametrize(
    ("ddl", "message"),
    [
        ("ALTER TABLE {s}.applicants DROP COLUMN credit_score", "was dropped or renamed"),
        ("ALTER TABLE {s}.applicants ALTER COLUMN person_age TYPE bigint", "changed type"),
    ],
)
def test_incompatible_schema_change_stops_with_a_clear_error(
    base_settings: Settings, ddl: str, message: str
) -> None:
    settings = stream_settings(base_settings)
    storage = seeded(settings, rows=50)
    setup.setup(settings, storage)
    s = f'"{settings.pg_schema}"'
    with schema.connect(settings, autocommit=True) as conn:
        conn.execute(f"UPDATE {s}.applicants SET person_income = 1 WHERE applicant_id = 1")
        conn.execute(ddl.format(s=s))
        conn.execute(f"UPDATE {s}.applicants SET person_income = 2 WHERE applicant_id = 2")
    child = lakehouse_stream(settings)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: source column ")
    assert message in lines[0]
    # The change before the DDL landed; nothing after it did, and the slot still holds it.
    log = read(storage, "bronze", "applicants_changes")
    assert log["person_income"].to_list() == [1.0]


# Local disk only (CI time): the batching logic is storage-independent; the S3 stream runs in the
# kill and hand-off tests.
@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_huge_transaction_is_split_and_held_from_silver_until_complete(
    settings: Settings,
) -> None:
    """A transaction bigger than a micro-batch lands in pieces; silver waits for its end."""
    settings = replace(stream_settings(settings), stream_batch_rows=500)
    storage = seeded(settings, rows=50)
    witness = Witness(settings)
    results = setup.setup(settings, storage)
    s = settings.pg_schema

    def big() -> None:
        with schema.connect(settings, autocommit=True) as conn:
            conn.execute(
                f'UPDATE "{s}".applicants SET credit_score = 700 + applicant_id % 100'
            )  # 50 rows
            with conn.transaction():
                for _ in range(60):  # 3,000 changes in one transaction
                    conn.execute(f'UPDATE "{s}".applicants SET person_income = person_income + 1')

    stream_while(settings, storage, big)
    log = read(storage, "bronze", "applicants_changes")
    commits = storage.table("bronze", "applicants_changes").version()
    assert log.height == 50 + 3000
    # Only rows of the split transaction may lack their end LSN.
    assert log.filter(pl.col("_end_lsn").is_null())["_xid"].n_unique() <= 1
    assert commits >= 3000 // 500  # split into micro-batches of at most 500 changes
    for r in results:
        assert r.snapshot_lsn is not None
        assert_exactly_once(witness, storage, r.table, r.snapshot_lsn)
    run_all(settings, storage, with_gold=False)
    assert_silver_equals_source(settings, storage)


def test_maintain_compacts_the_stream_small_files(settings: Settings) -> None:
    from lakehouse.maintain import maintain

    settings = stream_settings(settings)
    storage = seeded(settings, rows=50)
    setup.setup(settings, storage)

    def files() -> int:
        if not storage.exists("bronze", "applicants_changes"):
            return 0
        return len(storage.table("bronze", "applicants_changes").file_uris())

    def trickle(rounds: int) -> None:
        with schema.connect(settings, autocommit=True) as conn:
            for i in range(rounds):

                def grew(landed: int = files()) -> bool:
                    return files() > landed

                simulate(conn, settings.pg_schema, changes=20, batch_size=5, seed=i)
                # A micro-batch of it landed before the next: a small file each.
                wait_until(grew, 60, "a new file in bronze.applicants_changes", every=0.1)

    stream_while(settings, storage, lambda: trickle(4))
    before = read(storage, "bronze", "applicants_changes").sort("_commit_lsn", "_seq")
    files_before = files()
    assert files_before >= 4
    results = {r.table: r for r in maintain(storage, retention_hours=168)}
    assert "bronze.applicants_changes" in results
    after = read(storage, "bronze", "applicants_changes").sort("_commit_lsn", "_seq")
    assert len(storage.table("bronze", "applicants_changes").file_uris()) < files_before
    assert after.equals(before)
    # The stream carries on after maintenance, from where it was.
    stream_while(settings, storage, lambda: trickle(1))
    assert read(storage, "bronze", "applicants_changes").height > before.height
