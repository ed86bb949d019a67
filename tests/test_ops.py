"""Operations: `lakehouse status`, long-running commands, run records and JSON logs.

Every command runs as the compose services run it: a separate process, stopped by SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from lakehouse import log
from lakehouse.settings import Settings
from lakehouse.source.embedded import free_port
from tests.conftest import env_for
from tests.helpers import read, seeded, wait_until

ROOT = Path(__file__).resolve().parents[1]


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    return {**os.environ, **env_for(settings), "PYTHONPATH": str(ROOT), **extra}


def lakehouse(
    settings: Settings, *args: str, timeout: float = 300, **extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lakehouse.cli", *args],
        capture_output=True,
        text=True,
        env=_env(settings, **extra),
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )


@contextmanager
def service(settings: Settings, *args: str) -> Iterator[subprocess.Popen[str]]:
    """A long-running `lakehouse` command, like a compose service; killed if left running."""
    child = subprocess.Popen(
        [sys.executable, "-m", "lakehouse.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(settings),
        cwd=ROOT,
    )
    try:
        yield child
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()


def stop(child: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    """SIGTERM, as `docker compose stop` sends; return the exit code and the output."""
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=timeout)
    return child.returncode, out, err


def status(settings: Settings) -> dict[str, Any]:
    result = lakehouse(settings, "status", "--format", "json")
    assert result.returncode == 0, result.stderr
    document: dict[str, Any] = json.loads(result.stdout)
    return document


def lines_starting(
    child: subprocess.Popen[str], prefix: str, *, count: int, timeout: float
) -> list[str]:
    """Read a service's standard output until `count` lines start with `prefix`."""
    assert child.stdout is not None
    deadline = time.monotonic() + timeout
    found: list[str] = []
    for line in child.stdout:
        if line.startswith(prefix):
            found.append(line)
            if len(found) == count:
                return found
        assert time.monotonic() < deadline, f"{count} lines {prefix!r}... not seen: {found}"
    pytest.fail(f"the service exited ({child.wait()}) after {found}")


def source_counts(settings: Settings) -> dict[str, int]:
    with psycopg.connect(settings.pg_dsn.get()) as conn:
        return {
            t: conn.execute(f'SELECT count(*) FROM "{settings.pg_schema}".{t}').fetchone()[0]  # type: ignore[index]
            for t in ("applicants", "loan_applications")
        }


def json_lines(text: str) -> list[dict[str, Any]]:
    """Parse output that must be JSON lines only, each with the common fields."""
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    for record in records:
        assert {"ts", "level", "event", "message"} <= record.keys(), record
    return records


# Local disk only (CI time): concurrent writers on S3 are tests/zones/test_silver_writers.py.
@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_runs_under_live_changes_succeed_are_recorded_and_status_shows_them(
    settings: Settings,
) -> None:
    """The compose demo's situation: the simulator writes while the pipeline runs.

    Every run must succeed (Luigi's run-time re-check of a dependency used to fail the
    first silver task whenever a change arrived after bronze ran), land in
    `_meta.pipeline_runs`, and `status` must show the tables caught up afterwards.
    """
    seeded(settings, rows=300)

    def source_applications() -> int:
        with psycopg.connect(settings.pg_dsn.get()) as conn:
            row = conn.execute(
                f'SELECT count(*) FROM "{settings.pg_schema}".loan_applications'
            ).fetchone()
        assert row is not None
        return int(row[0])

    before = source_applications()
    with service(settings, "--log-format", "json", "simulate", "--rate", "100") as simulator:
        # The runs start under live changes: the simulator has written before the first.
        wait_until(lambda: source_applications() > before, 60, "the simulator's first writes")
        for _ in range(2):
            run = lakehouse(settings, "--log-format", "json", "run", "--no-ml")
            assert run.returncode == 0, run.stderr[-2000:]
            events = json_lines(run.stdout)
            assert events[-1]["event"] == "pipeline.done"
            assert events[-1]["tasks"], events[-1]
            assert any(e["event"] == "pipeline.task" for e in events)
        code, out, _ = stop(simulator)
    assert code == 0
    done = json_lines(out)[-1]
    assert done["event"] == "simulate.done" and done["changes"] > 0, done
    # Caught up: nothing left behind, every table current.
    assert lakehouse(settings, "run", "--no-ml").returncode == 0
    state = status(settings)
    assert [r["outcome"] for r in state["runs"]] == ["ran", "ran", "ran"]
    assert all(r["error"] is None and r["tasks"] for r in state["runs"])
    assert {s["table"]: s["rows"] for s in state["source"]} == source_counts(settings)
    tables = {t["table"]: t for t in state["tables"]}
    for name in ("bronze.applicants", "silver.applicants", "silver.loan_applications_history"):
        assert tables[name]["behind_seconds"] == 0, tables[name]
        assert tables[name]["current"] is True, tables[name]
    for name in ("application_features", "applicant_features", "approval_rate_daily"):
        assert tables[f"gold.{name}"]["current"] is True
    silver_rows = tables["silver.applicants"]["rows"] + tables["silver.applicants_rejected"]["rows"]
    assert silver_rows >= state["source"][0]["rows"]
    assert state["stream"] == [] and state["source_error"] is None
    text = lakehouse(settings, "status")
    assert text.returncode == 0
    assert "Pipeline runs (newest first)" in text.stdout
    assert "no replication slots: batch extraction feeds bronze" in text.stdout


@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_status_against_a_running_pipeline_and_stream(settings: Settings) -> None:
    """The compose services at once: stream (--setup --promote), pipeline every 2 s,
    simulator; status shows the active slots, their lag and the runs, then all catch up and
    every service stops on SIGTERM with exit code 0."""
    seeded(settings, rows=300)
    with (
        service(settings, "--log-format", "json", "stream", "--setup", "--promote") as stream,
        service(settings, "--log-format", "json", "run", "--no-ml", "--every", "2") as runner,
        service(settings, "simulate", "--rate", "50") as simulator,
    ):

        def live() -> dict[str, Any] | None:
            state = status(settings)
            slots = state["stream"]
            ok = (
                len(slots) == 2
                and all(s["active"] and s["changes"] > 0 for s in slots)
                and any(r["outcome"] == "ran" for r in state["runs"])
            )
            return state if ok else None

        state = wait_until(live, 120, "active slots with landed changes and a pipeline run")
        for slot in state["stream"]:
            assert isinstance(slot["lag_bytes"], int) and slot["lag_bytes"] >= 0
            assert slot["landed_lsn"] and slot["slot"].startswith("lakehouse_")
        assert state["source_error"] is None and state["tables_error"] is None
        assert {"bronze.applicants_changes", "silver.applicants"} <= {
            t["table"] for t in state["tables"]
        }
        code, _, _ = stop(simulator)
        assert code == 0

        def caught_up() -> bool:
            tables = {t["table"]: t for t in status(settings)["tables"]}
            return all(
                tables[f"silver.{t}"]["behind_seconds"] == 0
                for t in ("applicants", "loan_applications")
            )

        wait_until(caught_up, 120, "silver to hold the source's newest change")
        code, out, err = stop(runner)
        assert code == 0, err[-2000:]
        assert any(e["event"] == "pipeline.done" for e in json_lines(out))
        code, out, err = stop(stream)
        assert code == 0, err[-2000:]
        messages = [e["message"] for e in json_lines(out)]
        assert any("slot lakehouse_" in m and "created" in m for m in messages), messages
        assert messages[-1].startswith("stopped; every change received was landed (")
        progress = [e for e in json_lines(out) if e["event"] == "stream.progress"]
        assert progress, "no progress line while streaming"
        assert {"changes", "buffered", "freshness_seconds", "total"} <= set(progress[0])


@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_a_service_survives_failed_runs_records_them_and_stops_cleanly(
    settings: Settings,
) -> None:
    """`run --every`: a failing run is logged and recorded, the next one is tried, and
    SIGTERM ends the service with exit code 0 (as `maintain --every` does)."""
    with service(settings, "run", "--no-ml", "--every", "1") as runner:  # nothing seeded
        wait_until(lambda: len(status(settings)["runs"]) >= 2, 60, "two recorded runs")
        code, _, err = stop(runner)
    assert code == 0
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) >= 2
    assert "the source has no lending tables in schema" in errors[0]
    assert "(next try in 1s)" in errors[0]
    runs = status(settings)["runs"]
    assert {r["outcome"] for r in runs} == {"failed"}
    assert "run `lakehouse seed`" in runs[0]["error"]
    with service(settings, "maintain", "--every", "1") as maintainer:
        # Two passes: the first compacts the run records (one small commit per run
        # otherwise), the second shows the service carries on after it.
        passes = lines_starting(maintainer, "_meta.pipeline_runs: ", count=2, timeout=60)
        assert maintainer.poll() is None  # still serving
        code, _, err = stop(maintainer)
    assert code == 0, err
    assert passes[0].startswith(f"_meta.pipeline_runs: compacted {len(runs)} files into 1,")
    assert passes[1].startswith("_meta.pipeline_runs: compacted 0 files into 0,")


def test_json_logs_carry_no_secrets(tmp_path: Path) -> None:
    """An error in JSON is one JSON line on stderr; the DSN's password never appears."""
    password = "s3cr3t-Pa55"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LAKEHOUSE_")},
        "LAKEHOUSE_HOME": str(tmp_path),
        "LAKEHOUSE_PG_DSN": f"postgresql://app:{password}@127.0.0.1:{free_port()}/db",
        "LAKEHOUSE_LOG_FORMAT": "json",
        "PYTHONPATH": str(ROOT),
    }
    result = subprocess.run(
        [sys.executable, "-m", "lakehouse.cli", "seed"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    (record,) = json_lines(result.stderr)
    assert record["level"] == "error" and record["kind"] == "SourceError"
    assert "Postgres is not reachable at LAKEHOUSE_PG_DSN" in record["message"]
    assert password not in result.stderr + result.stdout
    # A usage error is JSON too (the format is known before the arguments are parsed).
    bad = subprocess.run(
        [sys.executable, "-m", "lakehouse.cli", "run", "--every", "soon"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert bad.returncode == 2
    (record,) = json_lines(bad.stderr)
    assert "argument --every: `soon` is not a number" in record["message"]


def test_redact_hides_passwords_in_any_form() -> None:
    cases = {
        "postgresql://app:pw-1@db:5432/x": "postgresql://app:****@db:5432/x",
        "host=db password=pw-2 user=app": "host=db password=**** user=app",
        "password: 'pw 3'": "password: ****",
        "aws_secret_access_key=abc/def": "aws_secret_access_key=****",
        "http://minio:9000/bucket": "http://minio:9000/bucket",
    }
    for text, expected in cases.items():
        assert log.redact(text) == expected


@pytest.mark.parametrize("settings", ["local"], indirect=True)
@pytest.mark.parametrize("workers", [1, 2])
def test_serve_answers_and_stops_with_exit_0(settings: Settings, workers: int) -> None:
    """`lakehouse serve --workers N`: N server processes built from the environment
    answer, and SIGTERM stops them all with exit 0 (one worker re-raised it: -15)."""
    import urllib.error
    import urllib.request

    import psutil

    port = free_port()
    with service(settings, "serve", "--port", str(port), "--workers", str(workers)) as server:

        def health() -> dict[str, Any] | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    answer: dict[str, Any] = json.loads(r.read())
                    return answer
            except OSError:
                return None

        answer = wait_until(health, 120, "the API to answer")
        assert answer == {"status": "ok", "model_version": None}
        # For orchestrators: alive, and not ready (no model yet) with the reason.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            assert json.loads(r.read()) == {"status": "ok"}
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5)
        assert refused.value.code == 503
        assert "no trained model yet" in json.loads(refused.value.read())["detail"]
        if workers > 1:
            children = psutil.Process(server.pid).children(recursive=True)
            assert sum("multiprocessing" in " ".join(p.cmdline()) for p in children) >= workers
        code, out, err = stop(server)
    assert code == 0, err[-2000:]
    assert f"with {workers} worker(s)" in out
    # Each worker tried to load the model before its first request, and said it stopped.
    assert out.count("not ready yet: no trained model") == workers, out
    assert out.count("stop signal: requests in progress answered") == workers, out


def _wait_for_line(lines: list[str], wanted: str, child: subprocess.Popen[str]) -> None:
    """Wait until a line of the child's stderr (read by a thread into `lines`) says `wanted`."""
    wait_until(
        lambda: any(wanted in line for line in lines) or child.poll() is not None,
        120,
        wanted,
    )
    assert any(wanted in line for line in lines), "".join(lines)[-3000:]


def _ctrl_c(child: subprocess.Popen[str]) -> None:
    """Press Ctrl-C once and wait until the child's handler has run.

    Two SIGINTs sent back to back can arrive before Python runs its handler for the first,
    and then count as one. The child waits in a failpoint's sleep: the signal interrupts
    that system call, Python runs the handler, and the sleep resumes. So the handler has
    run once the signal is no longer pending and the main thread is back in that call.
    """
    proc = Path(f"/proc/{child.pid}")
    waiting = (proc / "syscall").read_text().split()[0]
    child.send_signal(signal.SIGINT)
    bit = 1 << (signal.SIGINT - 1)

    def handled() -> bool:
        status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines())
        pending = int(status["SigPnd"], 16) | int(status["ShdPnd"], 16)
        return not pending & bit and (proc / "syscall").read_text().split()[0] == waiting

    deadline = time.monotonic() + 30
    while not handled():
        assert child.poll() is None, "the child exited on the first Ctrl-C"
        assert time.monotonic() < deadline, "the first Ctrl-C was not handled"
        time.sleep(0.01)


@contextmanager
def _service_at_failpoint(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, failpoint: str, *args: str
) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """A service paused at `failpoint` (mid-step); yields it and its stderr lines so far."""
    monkeypatch.setenv("LAKEHOUSE_FAILPOINT", failpoint)
    with service(settings, *args) as child:
        lines: list[str] = []
        assert child.stderr is not None
        stderr = child.stderr

        def collect() -> None:
            for line in stderr:
                lines.append(line)

        reader = threading.Thread(target=collect)
        reader.start()
        _wait_for_line(lines, f"failpoint {failpoint} reached", child)
        try:
            yield child, lines
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
            reader.join()


@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_ctrl_c_finishes_the_step_in_hand_and_a_second_ctrl_c_interrupts(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README, *Operations*: a service stopped by Ctrl-C finishes the step in hand and
    exits 0; a second Ctrl-C interrupts (exit 130, `interrupted`), and what it interrupted
    landed nothing (pipeline steps are atomic Delta commits)."""
    from tests.zones.test_silver import assert_same_rows, expected

    storage = seeded(settings, rows=40)
    failpoint = "gold.application_features.mid-write"  # files written, commit not yet made
    run = ("run", "--no-ml", "--every", "3600")

    with _service_at_failpoint(settings, monkeypatch, failpoint, *run) as (runner, lines):
        _ctrl_c(runner)
        runner.send_signal(signal.SIGINT)
        assert runner.wait(timeout=60) == 130
    assert lines[-1] == "interrupted\n", "".join(lines)[-3000:]
    assert "Traceback" not in "".join(lines)
    assert not storage.exists("gold", "application_features")  # its build landed nothing

    monkeypatch.setenv("LAKEHOUSE_FAILPOINT_PAUSE", "3")  # then the step goes on
    with _service_at_failpoint(settings, monkeypatch, failpoint, *run) as (runner, lines):
        _ctrl_c(runner)
        assert not storage.exists("gold", "application_features")  # still in the step
        assert runner.wait(timeout=120) == 0, "".join(lines)[-3000:]
        assert runner.stdout is not None
        out = runner.stdout.read()
    assert "tasks ran in" in out, out
    # The step finished: silver equals the source, gold holds every application in it.
    applicants, loans = expected(settings)
    assert_same_rows(read(storage, "silver", "applicants"), applicants, "applicant_id")
    assert_same_rows(read(storage, "silver", "loan_applications"), loans, "application_id")
    built = read(storage, "gold", "application_features")["application_id"]
    assert sorted(built.unique()) == sorted(loans["application_id"])


@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_a_second_ctrl_c_interrupts_a_stream_landing_its_batch(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for `lakehouse stream`: the first Ctrl-C lets it land what it holds; a
    second one, while that landing hangs, interrupts it with exit 130, committing nothing."""
    from stream import setup
    from tests.stream.helpers import stream_settings

    settings = stream_settings(settings)
    storage = seeded(settings, rows=10)
    setup.setup(settings, storage)
    with psycopg.connect(settings.pg_dsn.get(), autocommit=True) as conn:
        conn.execute(
            f'UPDATE "{settings.pg_schema}".applicants SET credit_score = 701 '
            "WHERE applicant_id = 1"
        )
    failpoint = "stream.applicants.before-commit"
    with _service_at_failpoint(settings, monkeypatch, failpoint, "stream") as (stream, lines):
        _ctrl_c(stream)
        stream.send_signal(signal.SIGINT)
        assert stream.wait(timeout=60) == 130
    assert lines[-1] == "interrupted\n", "".join(lines)[-3000:]
    assert "Traceback" not in "".join(lines) and "panicked" not in "".join(lines)
    assert not storage.exists("bronze", "applicants_changes")
