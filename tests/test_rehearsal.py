"""The compose stack rehearsed: every service started as its container would run it.

No container engine here, so `python -m lakehouse.deploy.rehearse` plays each service as a
local process (Postgres through the image's entrypoint with the system's binaries, moto
with IAM checks for MinIO) and checks that the system converges, then stops it. The run
is CI-sized: the seed is 3,000 rows instead of 45,000 (`--override`), everything else is
the compose file's own.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lakehouse.deploy.compose import ComposeError, Project, read_env_file
from lakehouse.deploy.supervisor import Supervisor
from tests.conftest import shared_tmp

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "compose" / "docker-compose.yml"


def project() -> Project:
    return Project(COMPOSE_FILE, read_env_file(COMPOSE_FILE.parent / ".env.example"))


def test_the_compose_stack_converges_and_every_service_exits_0(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lakehouse.deploy.rehearse",
            str(COMPOSE_FILE),
            "--override",
            "seed=seed --rows 3000",
            "--timeout",
            "600",
            "--report",
            str(report),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        cwd=ROOT,
    )
    print(done.stdout)  # the run log, shown with -s or when this fails
    assert done.returncode == 0, done.stdout + done.stderr
    seen = json.loads(report.read_text())
    services = set(project().services)
    assert set(seen["services"]) == services
    assert seen["exit_codes"] == dict.fromkeys(services, 0)
    converged = seen["converged"]
    assert converged["bucket_only"] == "lakehouse"
    assert converged["stream"]["role"] == "lakehouse_cdc"
    assert converged["stream"]["walsenders"] >= 2 and converged["stream"]["changes"] > 0
    assert converged["predict"]["decision"] in ("approve", "reject")
    assert len(converged["verify"]) == 2
    assert converged["pipeline_run"]["outcome"] == "ran"
    with_checks = {n for n, s in project().services.items() if s.get("healthcheck")}
    assert set(seen["healthchecks"]) == with_checks
    assert {"stream", "api"} <= with_checks
    assert set(converged["status_sections"]) == {
        "source",
        "tables",
        "stream",
        "runs",
        "verifications",
        "features",
    }
    # Each got its image's stop signal, and each lakehouse service logged it as it came.
    assert "stream: SIGTERM -> exited 0" in done.stdout
    assert "postgres: SIGINT -> exited 0" in done.stdout
    assert "every service exited 0 on its stop signal, and said so in its log" in done.stdout


def test_a_stream_on_the_superuser_fails_and_nothing_is_left_running(tmp_path: Path) -> None:
    """The rehearsal goes red on a planted violation, and stops every service it started."""
    import psutil

    folder = tmp_path / "compose"
    shutil.copytree(COMPOSE_FILE.parent, folder)
    planted = folder / COMPOSE_FILE.name
    text = planted.read_text()
    cdc = "postgresql://lakehouse_cdc:${PG_CDC_PASSWORD:?cp .env.example .env}@postgres"
    assert text.count(cdc) == 1
    planted.write_text(text.replace(cdc, "postgresql://postgres:${PG_SUPERUSER_PASSWORD}@postgres"))
    workdir = shared_tmp("lakehouse-rehearsal-")  # pytest's tmp_path is private to root
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lakehouse.deploy.rehearse",
            str(planted),
            "--override",
            "seed=seed --rows 300",
            "--timeout",
            "300",
            "--workdir",
            str(workdir),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "rehearsal failed: stream: replicates as postgres, which is not least-privilege" in (
        done.stdout
    )
    assert "Traceback" not in done.stdout + done.stderr
    # Every service ran in the workdir or named it (cwd, data folder, state file).
    left = [
        p.info["cmdline"]
        for p in psutil.process_iter(["cmdline", "cwd"])
        if str(workdir) in " ".join([p.info["cwd"] or "", *(p.info["cmdline"] or [])])
    ]
    assert left == []
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def supervisor(tmp_path_factory: pytest.TempPathFactory) -> Supervisor:
    return Supervisor(project(), tmp_path_factory.mktemp("rehearsal"), 20000, lambda _: None)


def test_hostnames_and_ports_are_mapped_where_a_service_reaches_them(
    supervisor: Supervisor,
) -> None:
    env = supervisor.environment("pipeline")
    assert "@127.0.0.1:25432/lakehouse" in env["LAKEHOUSE_PG_DSN"]
    assert env["LAKEHOUSE_S3_ENDPOINT"] == "http://127.0.0.1:29000"
    assert env["LAKEHOUSE_HOME"] == str(supervisor.workdir / "volumes" / "lakehouse-home")
    argv = supervisor._rewrite_argv("pipeline", supervisor.project.argv("pipeline"))
    assert argv[1:] == [
        "run",
        "--scheduler-host",
        "127.0.0.1",
        "--scheduler-port",
        "28082",
        "--every",
        "300",
    ]
    # A service's name as a word is not a host: `lakehouse seed` stays `seed`.
    assert supervisor._rewrite_argv("seed", ["lakehouse", "seed"]) == ["lakehouse", "seed"]
    # Its own ports, in its command and its healthcheck; wildcard binds become loopback.
    assert supervisor._rewrite_argv("api", ["serve", "--host", "0.0.0.0", "--port", "8000"]) == [
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        "28000",
    ]
    probe = "urlopen('http://127.0.0.1:8082/', timeout=4)"
    assert supervisor.rewrite(probe, "luigid") == "urlopen('http://127.0.0.1:28082/', timeout=4)"
    assert supervisor.rewrite(":9000", "minio") == ":29000"
    # luigid has no lakehouse-home volume: its HOME is its own container layer.
    luigid = supervisor.environment("luigid")["LAKEHOUSE_HOME"]
    assert luigid == str(supervisor.workdir / "containers" / "luigid" / "var" / "lib" / "lakehouse")


def test_a_port_no_service_listens_on_is_an_error(supervisor: Supervisor) -> None:
    with pytest.raises(ComposeError, match="does not listen on 5433"):
        supervisor.port("postgres", 5433)


def test_a_missing_secret_names_the_variable(tmp_path: Path) -> None:
    env = read_env_file(COMPOSE_FILE.parent / ".env.example")
    del env["PG_CDC_PASSWORD"]
    with pytest.raises(ComposeError, match="PG_CDC_PASSWORD is not set"):
        Project(COMPOSE_FILE, env)
