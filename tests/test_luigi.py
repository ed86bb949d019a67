"""Luigi runs from the command line: skipping completed work, exit codes, workers, luigid."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lakehouse.settings import Settings
from lakehouse.source.embedded import free_port
from tests.conftest import env_for, wait_for_port
from tests.helpers import churn, read, seeded

ROOT = Path(__file__).resolve().parents[1]


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


def test_second_run_does_nothing_and_new_changes_run_again(settings: Settings) -> None:
    storage = seeded(settings, rows=200)
    first = luigi(settings, "--local-scheduler")
    assert first.returncode == 0, first.stderr[-3000:]
    # bronze, silver: 2 each; gold: 3; apply, materialize; training set, fit, evaluate; wrapper.
    assert "13 ran successfully" in first.stderr
    versions = {
        t: storage.table("gold", t).version()
        for t in ("application_features", "applicant_features")
    }
    second = luigi(settings, "--local-scheduler")
    assert second.returncode == 0
    assert "Did not run any tasks" in second.stderr
    assert {t: storage.table("gold", t).version() for t in versions} == versions
    churn(settings, changes=100)
    third = luigi(settings, "--local-scheduler", "--workers", "2")
    assert third.returncode == 0, third.stderr[-3000:]
    assert "ran successfully" in third.stderr
    assert (
        storage.table("gold", "application_features").version()
        == versions["application_features"] + 1
    )
    assert read(storage, "silver", "applicants").height > 190


def test_a_failed_run_exits_non_zero(base_settings: Settings) -> None:
    seeded(base_settings, rows=20)
    from dataclasses import replace

    from lakehouse.settings import Secret

    broken = replace(
        base_settings, pg_dsn=Secret(f"postgresql://nobody:x@127.0.0.1:{free_port()}/none")
    )
    result = luigi(broken, "--local-scheduler")
    assert result.returncode != 0
    assert "Postgres is not reachable at LAKEHOUSE_PG_DSN" in result.stderr


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
    # One load each: bronze's first append, silver's and gold's load after their creation
    # (created empty at version 0, so that two writers never both load a new table).
    for zone, name in storage.list_tables():
        want = 0 if zone == "bronze" else 1
        assert storage.table(zone, name).version() == want, f"{zone}.{name}"
