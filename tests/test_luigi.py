"""Luigi runs from the command line: skipping completed work, exit codes, workers, luigid."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lakehouse.maintain import maintain
from lakehouse.ml.models import Registry
from lakehouse.settings import Settings
from lakehouse.source.embedded import free_port
from lakehouse.zones import gold_marks
from tests.conftest import env_for, wait_for_port
from tests.helpers import churn, read, run_all, seeded, source_frame

ROOT = Path(__file__).resolve().parents[1]

# The tables of the data pipeline (`--ml false`): README, "Zones and tables".
DATA_TABLES = [
    ("bronze", "applicants"),
    ("bronze", "loan_applications"),
    *[
        ("silver", f"{t}{suffix}")
        for t in ("applicants", "loan_applications")
        for suffix in ("", "_history", "_rejected")
    ],
    ("gold", "applicant_features"),
    ("gold", "application_features"),
    ("gold", "approval_rate_daily"),
]


def luigi(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **env_for(settings), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "luigi", "--module", "tasks", "Pipeline", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
        check=False,
    )


@contextmanager
def central_scheduler(tmp_path: Path) -> Iterator[int]:
    """A `luigid` on a free port for one test; yields the port."""
    port = free_port()
    luigid = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "luigid"),
            "--port",
            str(port),
            "--logdir",
            str(tmp_path),
            "--state-path",
            str(tmp_path / "state.pickle"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield port
    finally:
        luigid.terminate()
        luigid.wait()


# On S3 only (CI time): completion checks there read commit logs over HTTP; the local
# pipeline end to end, twice, is the demo's test.
@pytest.mark.parametrize("settings", ["s3"], indirect=True)
def test_second_run_does_nothing_and_new_changes_run_again(settings: Settings) -> None:
    storage = seeded(settings, rows=200)
    first = luigi(settings, "--local-scheduler")
    assert first.returncode == 0, first.stderr[-3000:]
    # bronze, silver: 2 each; gold: 3; apply, materialize; training set, fit, evaluate; the
    # inference log (created empty) and its 3 marts; the wrapper.
    assert "17 ran successfully" in first.stderr
    versions = {
        t: storage.table("gold", t).version()
        for t in ("application_features", "applicant_features")
    }
    second = luigi(settings, "--local-scheduler")
    assert second.returncode == 0
    assert "Did not run any tasks" in second.stderr
    assert {t: storage.table("gold", t).version() for t in versions} == versions
    # Maintenance commits (compaction, vacuum) are no new data: nothing to rebuild,
    # re-materialize or retrain (issue 14: a new model on an identical training set).
    trained = Registry(storage).versions()
    maintain(storage, retention_hours=0)
    after = luigi(settings, "--local-scheduler")
    assert after.returncode == 0, after.stderr[-3000:]
    assert "Did not run any tasks" in after.stderr
    assert Registry(storage).versions() == trained
    before = {t: storage.table("gold", t).version() for t in versions}
    churn(settings, changes=100)
    third = luigi(settings, "--local-scheduler", "--workers", "2")
    assert third.returncode == 0, third.stderr[-3000:]
    assert "ran successfully" in third.stderr
    # Both feature tables built again (whole or updated), from silver as it is now.
    for table in versions:
        assert storage.table("gold", table).version() > before[table], table
        built = gold_marks.built_from(storage, table)
        assert built, table
        assert built == {s: storage.data_version("silver", s) for s in built}, table
    gold = storage.table("gold", "application_features")
    assert storage.data_version("gold", "application_features") == gold.version()  # rebuilt
    assert len(Registry(storage).versions()) == len(trained) + 1
    assert read(storage, "silver", "applicants").height > 190


def test_a_failed_run_exits_non_zero(base_settings: Settings) -> None:
    storage = seeded(base_settings, rows=20)
    run_all(base_settings, storage, with_gold=False)  # gold behind silver (issue 14: exit 7)
    from dataclasses import replace

    from lakehouse.settings import Secret

    broken = replace(
        base_settings, pg_dsn=Secret(f"postgresql://nobody:x@127.0.0.1:{free_port()}/none")
    )
    result = luigi(broken, "--local-scheduler")
    assert result.returncode == 6, result.stderr[-3000:]  # a failed completion check
    assert re.search(
        r"^ERROR: IngestBronze\(table=\w+\) could not check what is done: "
        r"Postgres is not reachable at LAKEHOUSE_PG_DSN",
        result.stderr,
        re.M,
    ), result.stderr[-3000:]
    # README: says why in one line (each task checks its inputs first: not once per task).
    assert result.stderr.count("could not check what is done") == 1, result.stderr[-3000:]


def test_a_run_without_a_home_says_which_it_used_and_why_nothing_ran(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKEHOUSE_")}
    result = subprocess.run(
        [sys.executable, "-m", "luigi", "--module", "tasks", "Pipeline", "--local-scheduler"],
        capture_output=True,
        text=True,
        env={**env, "PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert result.returncode == 6, result.stderr[-3000:]
    home = tmp_path / ".lakehouse"
    assert (
        f"WARNING: lakehouse home: {home} (LAKEHOUSE_HOME is not set: the current folder's "
        ".lakehouse)"
    ) in result.stderr
    assert (
        "could not check what is done: the embedded Postgres has never been started; "
        "run `lakehouse db start`"
    ) in result.stderr


def test_a_failing_task_exits_non_zero(settings: Settings) -> None:
    # A table in the source that the pipeline cannot read: the ingest task itself fails.
    storage = seeded(settings, rows=20)
    import psycopg

    with psycopg.connect(settings.pg_dsn.get(), autocommit=True) as conn:
        conn.execute(
            f'ALTER TABLE "{settings.pg_schema}".applicants ALTER COLUMN credit_score TYPE text'
        )
        conn.execute(
            f'UPDATE "{settings.pg_schema}".applicants '
            "SET credit_score = 'n/a' WHERE applicant_id = 1"
        )
    result = luigi(settings, "--local-scheduler")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "failed" in result.stderr
    assert not storage.exists("bronze", "applicants")


def test_runs_against_a_central_scheduler(base_settings: Settings, tmp_path: Path) -> None:
    seeded(base_settings, rows=50)
    with central_scheduler(tmp_path) as port:
        central = ("--scheduler-host", "127.0.0.1", "--scheduler-port", str(port))
        # The data pipeline only (`--ml false`): 50 rows are too few to train on.
        result = luigi(base_settings, *central, "--ml", "false")
        assert result.returncode == 0, result.stderr[-3000:]
        assert "8 ran successfully" in result.stderr
        again = luigi(base_settings, *central, "--ml", "false")
        assert again.returncode == 0
        assert "Did not run any tasks" in again.stderr


def test_two_runners_share_one_central_scheduler(base_settings: Settings, tmp_path: Path) -> None:
    """Two `lakehouse run` processes against one luigid, started together: the scheduler
    gives each task to one of them, both exit 0, and every table gets exactly one commit."""
    storage = seeded(base_settings, rows=200)
    env = {**os.environ, **env_for(base_settings), "PYTHONPATH": str(ROOT)}
    with central_scheduler(tmp_path) as port:
        central = ["--scheduler-host", "127.0.0.1", "--scheduler-port", str(port)]
        runners = [
            subprocess.Popen(
                [sys.executable, "-m", "lakehouse.cli", "run", "--no-ml", *central],
                env=env,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        outputs = [r.communicate(timeout=300) for r in runners]
        for runner, (out, err) in zip(runners, outputs, strict=True):
            assert runner.returncode == 0, (out, err)
    # Every table of the data pipeline is there, and no other.
    assert sorted(storage.list_tables()) == sorted(DATA_TABLES)
    # One load each: bronze's first append, silver's and gold's load after their creation
    # (created empty at version 0, so that two writers never both load a new table).
    for zone, name in DATA_TABLES:
        want = 0 if zone == "bronze" else 1
        assert storage.table(zone, name).version() == want, f"{zone}.{name}"
    # And the loads hold the data: every source row reached bronze exactly once.
    for table in ("applicants", "loan_applications"):
        query = f'SELECT count(*) AS n FROM "{base_settings.pg_schema}".{table}'
        rows = source_frame(base_settings, query)["n"][0]
        assert read(storage, "bronze", table).height == rows == 200, table


def test_one_completion_check_checks_each_task_and_opens_each_table_once(
    base_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every task checks its inputs first, so a source's check ran once per path through
    the graph, each opening its tables again: a run with nothing to do took 28 s on S3.
    One check of the pipeline now checks each task once and opens each table once."""
    import tasks
    from lakehouse.storage import Storage

    storage = seeded(base_settings, rows=50)
    run_all(base_settings, storage)
    for key, value in env_for(base_settings).items():
        monkeypatch.setenv(key, value)
    tasks.forget_context()
    opened: list[tuple[str, str, int | None]] = []
    real_open = Storage._open

    def counting_open(self: Storage, zone: str, table: str, version: int | None) -> object:
        opened.append((zone, table, version))
        return real_open(self, zone, table, version)

    monkeypatch.setattr(Storage, "_open", counting_open)
    checked: list[str] = []
    for task_class in (tasks.IngestBronze, tasks.PromoteSilver, tasks.BuildGold):
        real_current = task_class.output_current

        def counting_current(self: tasks._Task, real: object = real_current) -> bool:
            checked.append(self.task_id)
            return bool(real(self))  # type: ignore[operator]

        monkeypatch.setattr(task_class, "output_current", counting_current)
    try:
        assert tasks.Pipeline(ml=False).complete()
    finally:
        tasks.forget_context()
    assert len(checked) == len(set(checked)) == 2 + 2 + 3, checked
    assert opened and len(opened) == len(set(opened)), sorted(opened)
