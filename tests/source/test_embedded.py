"""The embedded cluster: lifecycle through the CLI, with system or pgserver binaries."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from lakehouse.errors import SourceError
from lakehouse.settings import Settings
from lakehouse.source.embedded import EmbeddedPostgres, find_bin_dir, pgserver_bin_dir
from tests.conftest import shared_tmp


def cli(
    home: str, *args: str, extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ["PATH"], "LAKEHOUSE_HOME": home, **(extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "lakehouse.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("binaries", ["system", "pgserver"])
def test_db_lifecycle(binaries: str) -> None:
    home = shared_tmp("lakehouse-db-")
    extra = {}
    if binaries == "pgserver":
        wheel = pgserver_bin_dir()
        assert wheel is not None, "pgserver is a dependency: its binaries must be installed"
        extra["LAKEHOUSE_PG_BIN"] = str(wheel)
    try:
        started = cli(str(home), "db", "start", extra=extra)
        assert started.returncode == 0, started.stderr
        assert started.stdout.startswith("started: postgresql://lakehouse@127.0.0.1:")
        assert cli(str(home), "db", "start").stdout.startswith("already running")
        status = cli(str(home), "db", "status")
        assert status.returncode == 0 and "wal_level=logical" in status.stdout
        url = cli(str(home), "db", "url").stdout.strip()
        assert ":" not in url.split("@")[0].removeprefix("postgresql://")  # no password shown
        dsn = EmbeddedPostgres(Settings(home=home)).dsn()
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SHOW wal_level").fetchone()
            assert row == ("logical",)
            version = conn.execute("SHOW server_version_num").fetchone()
            assert version is not None
            if binaries == "pgserver":
                assert version[0].startswith("16")
        assert (home / "postgres" / "password").stat().st_mode & 0o077 == 0
        assert cli(str(home), "db", "stop").stdout.strip() == "stopped"
        stopped = cli(str(home), "db", "status")
        assert stopped.returncode == 1 and stopped.stdout.startswith("not running")
    finally:
        EmbeddedPostgres(Settings(home=home)).destroy()
        shutil.rmtree(home, ignore_errors=True)


def test_finds_system_binaries_first(pg_server: str) -> None:
    """Without LAKEHOUSE_PG_BIN the cluster runs the system's Postgres (the installation
    `pg_config` describes), not the pgserver wheel's, which is installed too. Seen from
    the running server (the session's cluster, started with the default settings): the
    executable of a backend, and the version it reports."""
    pg_config = shutil.which("pg_config")
    assert pg_config is not None, "install PostgreSQL's server and pg_config (CI has them)"

    def ask(option: str) -> str:
        return subprocess.run(
            [pg_config, option], capture_output=True, text=True, check=True
        ).stdout.strip()

    major = re.match(r"PostgreSQL (\d+)", ask("--version"))
    assert major is not None
    with psycopg.connect(pg_server) as conn:
        row = conn.execute("SELECT pg_backend_pid(), current_setting('server_version_num')")
        pid, version = row.fetchone()  # type: ignore[misc]
        running = Path(f"/proc/{pid}/exe").resolve(strict=True)  # while the backend lives
    assert running == (Path(ask("--bindir")) / "postgres").resolve()
    assert int(version) // 10_000 == int(major.group(1))


def test_a_configured_folder_without_binaries_is_an_error_not_ignored(tmp_path: Path) -> None:
    for configured in ("/nonexistent", str(tmp_path)):
        with pytest.raises(SourceError, match=re.escape(f"LAKEHOUSE_PG_BIN is `{configured}`")):
            find_bin_dir(configured)
    assert find_bin_dir(str(find_bin_dir())) == find_bin_dir()


def test_runs_as_an_unprivileged_owner_when_root() -> None:
    if os.geteuid() != 0:
        assert EmbeddedPostgres(Settings(home=shared_tmp("lh-")))._owner() is None
        return
    assert EmbeddedPostgres(Settings(home=shared_tmp("lh-")))._owner() == "postgres"


def test_root_in_a_private_folder_with_a_private_virtualenv(tmp_path: Path) -> None:
    """Every fresh container: root, the project cloned under /root (mode 700), pgserver's
    binaries inside that private virtualenv. The cluster goes where its owner can reach it,
    named in `.lakehouse/`, and `db status` says where; nothing of the user's folders is
    opened to others."""
    if os.geteuid() != 0:  # the situation exists only for root
        assert EmbeddedPostgres(Settings(home=tmp_path))._owner() is None
        return
    private = tmp_path / "root-home"
    private.mkdir(mode=0o700)
    wheel = pgserver_bin_dir()
    assert wheel is not None, "pgserver is a dependency: its binaries must be installed"
    site = private / "venv-site"  # a private copy of the wheel, as in /root/project/.venv
    shutil.copytree(wheel.parents[1], site / "pgserver")
    shutil.copytree(wheel.parents[2] / "pgserver.libs", site / "pgserver.libs")
    home = private / "project" / ".lakehouse"
    extra = {
        "PYTHONPATH": str(site),
        "LAKEHOUSE_PG_BIN": str(site / "pgserver" / "pginstall" / "bin"),
    }
    pg = EmbeddedPostgres(Settings(home=home))
    try:
        started = cli(str(home), "db", "start", extra=extra)
        assert started.returncode == 0, started.stderr
        place = Path((home / "postgres" / "location").read_text().strip())
        assert place.parent == Path("/var/lib/lakehouse/clusters")
        assert place.stat().st_mode & 0o077 == 0 and place.owner() == "postgres"
        assert f"(data in {place / 'data'})" in started.stdout
        status = cli(str(home), "db", "status", extra=extra)
        assert status.returncode == 0, status.stderr
        assert (
            "wal_level=logical" in status.stdout and f"(data in {place / 'data'})" in status.stdout
        )
        with psycopg.connect(pg.dsn()) as conn:
            assert conn.execute("SHOW server_version_num").fetchone()[0].startswith("16")  # type: ignore[index]
        assert private.stat().st_mode & 0o777 == 0o700  # the user's folder stays private
        for secret in ("password", "location"):
            assert (home / "postgres" / secret).stat().st_mode & 0o077 == 0
        # The home deleted, its cluster left running: a new home at the same path starts
        # a new cluster there (the old one's password is gone with the home).
        shutil.rmtree(home)
        again = cli(str(home), "db", "start", extra=extra)
        assert again.returncode == 0, again.stderr
        with psycopg.connect(pg.dsn()) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        pg.destroy()
    assert not place.exists()
