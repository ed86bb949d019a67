"""The CLI's errors: one line naming the problem and the fix, non-zero exit, no traceback."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import luigi
import psycopg
import pytest

from lakehouse.cli import main
from lakehouse.errors import SourceError
from lakehouse.settings import Settings
from lakehouse.source.embedded import free_port
from tests.conftest import embedded_cluster, env_for, shared_tmp, wait_for_port
from tests.helpers import read, run_all, seeded


def run_cli(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    *argv: str,
) -> tuple[int, str, str]:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, message: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("error: ")
    assert message in lines[0], lines[0]


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    return lambda env, *argv: run_cli(monkeypatch, capsys, env, *argv)


def test_postgres_unreachable(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = {
        "LAKEHOUSE_HOME": str(tmp_path),
        "LAKEHOUSE_PG_DSN": f"postgresql://u:secretpw@127.0.0.1:{free_port()}/db",
    }
    code, _, err = cli(env, "seed")
    assert_one_line_error(
        code, err, "Postgres is not reachable at LAKEHOUSE_PG_DSN; start the server or fix the DSN"
    )
    assert "secretpw" not in err


def test_embedded_postgres_not_started(cli) -> None:  # type: ignore[no-untyped-def]
    home = shared_tmp("lakehouse-cli-")
    code, _, err = cli({"LAKEHOUSE_HOME": str(home)}, "seed")
    assert_one_line_error(
        code, err, "the embedded Postgres has never been started; run `lakehouse db start`"
    )


def test_wrong_password(cli, pg_server: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS lh_pw_test")
        conn.execute("CREATE ROLE lh_pw_test LOGIN PASSWORD 'right-password'")
    port = pg_server.split("@")[1].split("/")[0]
    env = {
        "LAKEHOUSE_HOME": str(tmp_path),
        "LAKEHOUSE_PG_DSN": f"postgresql://lh_pw_test:wrong-password@{port}/lakehouse",
    }
    code, _, err = cli(env, "seed")
    assert_one_line_error(
        code,
        err,
        "Postgres rejected the password (LAKEHOUSE_PG_DSN); fix the password in the DSN",
    )
    assert "wrong-password" not in err


@pytest.fixture(scope="module")
def replica_server() -> Iterator[str]:
    with embedded_cluster(
        "lakehouse-replica-", wal_level="replica", max_wal_senders="2", max_replication_slots="0"
    ) as dsn:
        yield dsn


def test_wal_level_not_logical(cli, replica_server: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = {"LAKEHOUSE_HOME": str(tmp_path), "LAKEHOUSE_PG_DSN": replica_server}
    code, _, err = cli(env, "db", "status")
    assert_one_line_error(
        code,
        err,
        "wal_level is `replica`; logical replication (CDC) needs "
        "`logical`: set wal_level = logical in postgresql.conf and "
        "restart the server",
    )


def test_run_before_seed(cli, base_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    code, _, err = cli(env_for(base_settings), "run")
    assert_one_line_error(
        code,
        err,
        f"the source has no lending tables in schema `{base_settings.pg_schema}`; run "
        "`lakehouse seed`",
    )


def test_a_second_run_in_one_process_reads_its_own_settings(cli, base_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    """Luigi tasks cache their settings per process: each in-process run starts afresh."""
    from dataclasses import replace

    for schema in ("first_schema", "second_schema"):
        code, _, err = cli(env_for(replace(base_settings, pg_schema=schema)), "run", "--no-ml")
        assert_one_line_error(code, err, f"no lending tables in schema `{schema}`")


def test_configured_server_status(cli, pg_server: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = cli(
        {"LAKEHOUSE_HOME": str(tmp_path), "LAKEHOUSE_PG_DSN": pg_server}, "db", "status"
    )
    assert code == 0
    assert "wal_level=logical" in out


def test_s3_endpoint_down(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    endpoint = f"http://127.0.0.1:{free_port()}"
    env = {
        "LAKEHOUSE_HOME": str(tmp_path),
        "LAKEHOUSE_STORAGE_URI": "s3://lakehouse/x",
        "LAKEHOUSE_S3_ENDPOINT": endpoint,
        "LAKEHOUSE_S3_ACCESS_KEY_ID": "k",
        "LAKEHOUSE_S3_SECRET_ACCESS_KEY": "s3cr3t-value",
    }
    code, _, err = cli(env, "tables")
    assert_one_line_error(
        code, err, f"S3 endpoint {endpoint} is not reachable; start it or fix LAKEHOUSE_S3_ENDPOINT"
    )
    assert "s3cr3t-value" not in err


@pytest.fixture(scope="module")
def strict_s3() -> Iterator[str]:
    """An S3 server that checks credentials (moto with auth on), so bad keys are refused."""
    port = free_port()
    env = {"INITIAL_NO_AUTH_ACTION_COUNT": "0", "PATH": "/usr/bin:/bin"}
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait()


def test_s3_bad_keys(cli, strict_s3: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    env = {
        "LAKEHOUSE_HOME": str(tmp_path),
        "LAKEHOUSE_STORAGE_URI": "s3://lakehouse/x",
        "LAKEHOUSE_S3_ENDPOINT": strict_s3,
        "LAKEHOUSE_S3_ACCESS_KEY_ID": "nobody",
        "LAKEHOUSE_S3_SECRET_ACCESS_KEY": "wrong",
    }
    code, _, err = cli(env, "run")
    assert_one_line_error(code, err, f"S3 at {strict_s3} refused the credentials")
    assert "check LAKEHOUSE_S3_ACCESS_KEY_ID and LAKEHOUSE_S3_SECRET_ACCESS_KEY" in err


def test_bad_setting(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, _, err = cli({"LAKEHOUSE_HOME": str(tmp_path), "LAKEHOUSE_BATCH_ROWS": "many"}, "tables")
    assert code == 2
    assert_one_line_error(code, err, "LAKEHOUSE_BATCH_ROWS is `many`; it must be a whole number")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["seed", "--rows", "abc"], "lakehouse seed: argument --rows: `abc` is not a whole number"),
        (["seed", "--rows", "0"], "lakehouse seed: argument --rows: `0` must be at least 1"),
        (
            ["seed", "--rows", "200000000"],
            "--rows is 200000000; give a whole number from 1 to 100,000,000",
        ),
        (["simulate", "--duration", "10"], "--duration needs --rate: give the changes per second"),
        (
            ["simulate", "--changes", "5", "--rate", "10"],
            "give either --changes or --rate (with or without --duration), not both",
        ),
        (["sql", "DROP TABLE silver.applicants"], "`lakehouse sql` is read-only: a DROP statement"),
        (["frobnicate"], "lakehouse: argument command: invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments(cli, base_settings: Settings, argv: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    seeded(base_settings, rows=5)
    before = read_count(base_settings)
    code, _, err = cli(env_for(base_settings), *argv)
    assert_one_line_error(code, err, message)
    assert read_count(base_settings) == before  # nothing half-written


def read_count(settings: Settings) -> int:
    with psycopg.connect(settings.pg_dsn.get()) as conn:
        row = conn.execute(f'SELECT count(*) FROM "{settings.pg_schema}".applicants').fetchone()
        assert row is not None
        return int(row[0])


def test_sql_errors_and_output(cli, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    storage = seeded(settings, rows=30)
    run_all(settings, storage)
    env = env_for(settings)
    code, _, err = cli(env, "sql", "SELECT * FROM gold.nope")
    assert_one_line_error(code, err, "unknown table `gold.nope`")
    code, _, err = cli(env, "sql", "SELEC 1")
    assert_one_line_error(code, err, "SQL syntax error")
    code, out, _ = cli(env, "sql", "SELECT count(*) AS n FROM silver.applicants", "--format", "csv")
    assert code == 0
    assert out == f"n\n{read(storage, 'silver', 'applicants').height}\n"
    code, out, _ = cli(env, "tables")
    assert code == 0
    assert re.search(r"^silver\.applicants\s+\|\s+1\s+\|\s+30\s+\|", out, re.M), out


def test_debug_shows_the_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LAKEHOUSE_HOME", str(tmp_path))
    monkeypatch.setenv("LAKEHOUSE_PG_DSN", f"postgresql://u:p@127.0.0.1:{free_port()}/db")
    with pytest.raises(SourceError, match=re.escape("Postgres is not reachable")):
        main(["--debug", "seed"])


def test_console_script_exit_code(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lakehouse.cli", "sql", "INSERT INTO x VALUES (1)"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "LAKEHOUSE_HOME": str(tmp_path)},
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: `lakehouse sql` is read-only: a INSERT statement is not allowed; "
        "use SELECT (tables change only through the pipeline)"
    )


def test_an_unreachable_luigi_scheduler_is_one_line(cli, base_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    seeded(base_settings, rows=5)
    port = free_port()
    config = luigi.configuration.get_config()
    if not config.has_section("core"):
        config.add_section("core")
    config.set("core", "rpc-retry-wait", "0")  # Luigi's 3 tries are 30 s apart otherwise
    try:
        code, _, err = cli(
            env_for(base_settings),
            "run",
            "--no-ml",
            "--scheduler-host",
            "127.0.0.1",
            "--scheduler-port",
            str(port),
            "--log-format",  # global options are accepted after the command too
            "text",
        )
    finally:
        config.remove_option("core", "rpc-retry-wait")
    assert_one_line_error(
        code, err, f"the Luigi scheduler at 127.0.0.1:{port} is not reachable; start `luigid"
    )


def test_simulate_writes_a_new_mix_each_call_unless_given_a_seed(  # type: ignore[no-untyped-def]
    cli, base_settings: Settings
) -> None:
    """Issue 14: the default seed repeated the same changes on every call."""
    seeded(base_settings, rows=30)
    env = env_for(base_settings)

    def seed_of(*extra: str) -> int:
        code, out, err = cli(env, "--log-format", "json", "simulate", "--changes", "20", *extra)
        assert code == 0, err
        done = [json.loads(line) for line in out.splitlines() if '"simulate.done"' in line]
        return int(done[-1]["seed"])

    assert seed_of() != seed_of()
    assert seed_of("--seed", "7") == 7
    assert seed_of() != 9
    env["LAKEHOUSE_SEED"] = "9"  # set on purpose: repeated
    assert seed_of() == 9


def test_db_and_models_report_in_json_when_asked(cli, pg_server: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`--log-format json` holds for every command's messages, not only the pipeline's."""
    env = {"LAKEHOUSE_HOME": str(tmp_path), "LAKEHOUSE_PG_DSN": pg_server}
    for argv, event in ((["db", "status"], "db.status"), (["models"], "models.empty")):
        code, out, err = cli(env, "--log-format", "json", *argv)
        assert code == 0, err
        records = [json.loads(line) for line in out.splitlines()]
        assert [r["event"] for r in records] == [event], out
    assert records[0]["message"] == "no model yet; run `lakehouse train`"


def test_the_command_line_imports_no_engine_before_a_command_runs() -> None:
    """`lakehouse --help` and a usage error stay quick: engines load with their command."""
    heavy = ("deltalake", "duckdb", "polars", "feast", "luigi", "sklearn")
    code = f"import sys, lakehouse.cli\nprint(','.join(m for m in {heavy!r} if m in sys.modules))\n"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == ""
