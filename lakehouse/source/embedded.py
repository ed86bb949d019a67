"""A private Postgres cluster in the data folder, with `wal_level=logical`, for zero set-up runs."""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

import psycopg

from lakehouse.errors import SourceError
from lakehouse.settings import Settings

USER = "lakehouse"
DATABASE = "lakehouse"
# Unprivileged OS users that may own the cluster when we run as root (initdb refuses root).
_ROOT_OWNERS = ("postgres", "nobody")


def find_bin_dir(configured: str = "") -> Path:
    """Find Postgres server binaries: the setting, the system's, or the `pgserver` wheel's.

    A configured folder is the only one tried: binaries found elsewhere instead would
    hide the mistake (issue 14: `LAKEHOUSE_PG_BIN=/nonexistent` was silently ignored).
    """
    if configured:
        path = Path(configured)
        if (path / "initdb").is_file() and (path / "pg_ctl").is_file():
            return path
        msg = f"LAKEHOUSE_PG_BIN is `{configured}` but holds no initdb/pg_ctl; fix the folder"
        raise SourceError(msg)
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if out.returncode == 0:
            candidates.append(Path(out.stdout.strip()))
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True
    )
    candidates += [Path(p) for p in versions]
    candidates += [Path(p) for p in ("/usr/local/pgsql/bin", "/opt/homebrew/bin", "/usr/local/bin")]
    for path in candidates:
        if (path / "initdb").is_file() and (path / "pg_ctl").is_file():
            return path
    wheel = pgserver_bin_dir()
    if wheel is not None:
        return wheel
    msg = (
        "no Postgres server binaries found; install PostgreSQL (or `pip install pgserver`), "
        "set LAKEHOUSE_PG_BIN, or point LAKEHOUSE_PG_DSN at a server"
    )
    raise SourceError(msg)


def pgserver_bin_dir() -> Path | None:
    """Return the binaries shipped in the `pgserver` wheel, if it is installed."""
    import importlib.util

    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return path if (path / "initdb").is_file() else None


def free_port() -> int:
    """Return a TCP port that is free on the loopback interface now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedPostgres:
    """A cluster under `<home>/postgres`: data, port, password file and log."""

    def __init__(self, settings: Settings, *, extra_options: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.root = settings.home / "postgres"
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.extra_options = extra_options or {}

    # -- state on disk -------------------------------------------------------------------
    @property
    def _port_file(self) -> Path:
        return self.root / "port"

    @property
    def _secret_file(self) -> Path:
        return self.root / "password"

    def port(self) -> int:
        """Return the cluster's port, as recorded at start."""
        try:
            return int(self._port_file.read_text().strip())
        except FileNotFoundError:
            msg = "the embedded Postgres has never been started; run `lakehouse db start`"
            raise SourceError(msg) from None

    def dsn(self) -> str:
        """Return the DSN of the running cluster (holds the password: never print it)."""
        password = self._secret_file.read_text().strip() if self._secret_file.exists() else ""
        return f"postgresql://{USER}:{password}@127.0.0.1:{self.port()}/{DATABASE}?sslmode=disable"

    def public_url(self) -> str:
        """Return the DSN without its password, for display."""
        return f"postgresql://{USER}@127.0.0.1:{self.port()}/{DATABASE}"

    # -- lifecycle ----------------------------------------------------------------------
    def is_running(self) -> bool:
        """Tell whether the cluster is up (pg_ctl status)."""
        if not (self.data / "PG_VERSION").exists():
            return False
        result = self._run(["pg_ctl", "status", "-D", str(self.data)], check=False)
        return result.returncode == 0

    def start(self) -> bool:
        """Start the cluster, creating it first if needed; return False if it was running."""
        if self.is_running():
            return False
        self.root.mkdir(parents=True, exist_ok=True)
        owner = self._owner()
        if not (self.data / "PG_VERSION").exists():
            self._initdb(owner)
        port = free_port()
        self._port_file.write_text(f"{port}\n")
        options = {
            "listen_addresses": "127.0.0.1",
            "port": str(port),
            "unix_socket_directories": "",
            "wal_level": "logical",
            "max_wal_senders": "10",
            "max_replication_slots": "10",
            "max_slot_wal_keep_size": "4GB",
            **self.extra_options,
        }
        opts = " ".join(f"-c {k}='{v}'" for k, v in options.items())
        if owner is not None:
            self.log.touch()
            shutil.chown(self.log, user=owner)
        result = self._run(
            [
                "pg_ctl",
                "start",
                "-w",
                "-t",
                "60",
                "-D",
                str(self.data),
                "-l",
                str(self.log),
                "-o",
                opts,
            ],
            check=False,
        )
        if result.returncode != 0:
            tail = self.log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
            msg = f"the embedded Postgres did not start: {tail[0]}; see {self.log}"
            raise SourceError(msg)
        self._ensure_database()
        return True

    def stop(self) -> bool:
        """Stop the cluster; return False if it was not running."""
        if not self.is_running():
            return False
        self._run(["pg_ctl", "stop", "-w", "-m", "fast", "-D", str(self.data)])
        return True

    def destroy(self) -> None:
        """Stop the cluster and delete its files."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    # -- helpers --------------------------------------------------------------------------
    def _owner(self) -> str | None:
        """Return the OS user to run Postgres as when we are root, else None."""
        if os.geteuid() != 0:
            return None
        for name in _ROOT_OWNERS:
            try:
                pwd.getpwnam(name)
            except KeyError:
                continue
            return name
        msg = (
            "running as root, and no unprivileged OS user (postgres or nobody) exists to own "
            "the embedded cluster; create one, run as a normal user, or set LAKEHOUSE_PG_DSN"
        )
        raise SourceError(msg)

    def _initdb(self, owner: str | None) -> None:
        password = secrets.token_urlsafe(24)
        self._secret_file.write_text(password + "\n")
        self._secret_file.chmod(0o600)
        pwfile = self.root / ".initdb-pw"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
        self.data.mkdir(mode=0o700, exist_ok=True)
        if owner is not None:
            for path in (self.data, pwfile, self.root):
                shutil.chown(path, user=owner)
            self._check_traversable(owner)
        (self.root / "bin_dir").write_text(f"{find_bin_dir(self.settings.pg_bin)}\n")
        try:
            self._run(
                [
                    "initdb",
                    "-D",
                    str(self.data),
                    "-U",
                    USER,
                    "--pwfile",
                    str(pwfile),
                    "--auth=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--no-sync",
                ]
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def _bin_dir(self) -> Path:
        """Use the binaries that created the cluster (a cluster is tied to its major version)."""
        recorded = self.root / "bin_dir"
        if recorded.exists() and not self.settings.pg_bin:
            path = Path(recorded.read_text().strip())
            if (path / "pg_ctl").is_file():
                return path
        path = find_bin_dir(self.settings.pg_bin)
        if (self.data / "PG_VERSION").exists() and not recorded.exists():
            recorded.write_text(f"{path}\n")
        return path

    def _check_traversable(self, owner: str) -> None:
        result = self._run(["test", "-x", str(self.root)], check=False, bare=True)
        if result.returncode != 0:
            msg = (
                f"OS user `{owner}` cannot reach {self.root} (a parent folder is private); "
                "set LAKEHOUSE_HOME to a folder others can traverse"
            )
            raise SourceError(msg)
        initdb = self._bin_dir() / "initdb"
        result = self._run(["test", "-x", str(initdb)], check=False, bare=True)
        if result.returncode != 0:
            msg = (
                f"OS user `{owner}` cannot run {initdb} (a parent folder is private, e.g. a "
                "virtualenv under /root); install the system's PostgreSQL or set "
                "LAKEHOUSE_PG_BIN to binaries others can run"
            )
            raise SourceError(msg)

    def _ensure_database(self) -> None:
        base = self.dsn().rsplit("/", 1)[0] + "/postgres?sslmode=disable"
        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(base, autocommit=True, connect_timeout=5) as conn:
                    exists = conn.execute(
                        "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,)
                    ).fetchone()
                    if not exists:
                        conn.execute(f'CREATE DATABASE "{DATABASE}"')
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _run(
        self, argv: list[str], *, check: bool = True, bare: bool = False
    ) -> subprocess.CompletedProcess[str]:
        owner = self._owner()
        cmd = list(argv)
        if not bare:
            cmd[0] = str(self._bin_dir() / argv[0])
        if owner is not None:
            cmd = ["runuser", "-u", owner, "--", *cmd]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd="/")
        if check and result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or [""]
            msg = f"`{argv[0]}` failed for the embedded Postgres: {detail[0]}"
            raise SourceError(msg)
        return result


def server_info(conn: psycopg.Connection) -> dict[str, str]:
    """Return what `lakehouse db status` shows of a server."""
    row = conn.execute(
        "SELECT current_setting('server_version'), current_setting('wal_level'), current_user"
    ).fetchone()
    assert row is not None
    return {"version": row[0], "wal_level": row[1], "user": row[2]}
