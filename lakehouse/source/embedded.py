"""A private Postgres cluster in the data folder, with `wal_level=logical`, for zero set-up runs."""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
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
#: Where clusters and binaries go when running as root from a private folder.
SYSTEM_DIR = Path("/var/lib/lakehouse")


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
    """A cluster under `<home>/postgres`: data, port, password file and log.

    As root, Postgres runs as an unprivileged OS user (initdb refuses root), which must
    reach the cluster and run the binaries. Every fresh container clones into `/root`,
    private to root: then the cluster lives under `SYSTEM_DIR`, in a folder of its own
    owned by that user (named in `<home>/postgres/location`, shown by `db status`), and
    binaries from the `pgserver` wheel inside a private virtualenv are copied there once.
    The password, port and records stay in the home, private to root.
    """

    def __init__(self, settings: Settings, *, extra_options: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.root = settings.home / "postgres"
        self.extra_options = extra_options or {}

    # -- state on disk -------------------------------------------------------------------
    @property
    def place(self) -> Path:
        """The folder of the cluster's data and log: the home's, or the recorded one."""
        recorded = self.root / "location"
        if recorded.exists():
            return Path(recorded.read_text().strip())
        return self.root

    @property
    def data(self) -> Path:
        """The cluster's data folder."""
        return self.place / "data"

    @property
    def log(self) -> Path:
        """The server's log."""
        return self.place / "postgres.log"

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
        if self.place != self.root:
            shutil.rmtree(self.place, ignore_errors=True)
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
        _write_private(self._secret_file, password + "\n")
        if owner is not None and not self._can(owner, "-x", self.root):
            self._move_to_system_dir(owner)
        pwfile = self.place / ".initdb-pw"
        _write_private(pwfile, password + "\n")
        self.data.mkdir(mode=0o700, exist_ok=True)
        if owner is not None:
            for path in (self.data, pwfile, self.place):
                shutil.chown(path, user=owner)
            self._check_traversable(owner)
        (self.root / "bin_dir").write_text(f"{self._bin_dir()}\n")
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
        owner = self._owner()
        private = owner is not None and not self._can(owner, "-x", path / "initdb")
        if private and path == pgserver_bin_dir():
            path = _system_copy_of_pgserver()
        if (self.data / "PG_VERSION").exists() and not recorded.exists():
            recorded.write_text(f"{path}\n")
        return path

    def _can(self, owner: str, test: str, path: Path) -> bool:
        """Tell whether `owner` passes `test -x`/`-r`... on `path` (as that user)."""
        return self._run(["test", test, str(path)], check=False, bare=True).returncode == 0

    def _move_to_system_dir(self, owner: str) -> None:
        """Put the cluster where `owner` can reach it (the home is private to root)."""
        key = hashlib.sha256(str(self.settings.home.resolve()).encode()).hexdigest()[:16]
        place = SYSTEM_DIR / "clusters" / key
        for folder in (SYSTEM_DIR, SYSTEM_DIR / "clusters"):
            folder.mkdir(mode=0o755, exist_ok=True)
            folder.chmod(0o755)  # traversable by `owner` whatever the umask
        if place.exists():
            # Left by a deleted home at the same path: its password went with the home,
            # so nothing can log in to it any more; stop it and start afresh.
            stale = place / "data"
            self._run(["pg_ctl", "stop", "-m", "immediate", "-D", str(stale)], check=False)
            shutil.rmtree(place)
        place.mkdir(mode=0o700)
        shutil.chown(place, user=owner)
        _write_private(self.root / "location", f"{place}\n")

    def _check_traversable(self, owner: str) -> None:
        if not self._can(owner, "-x", self.place):
            msg = (
                f"OS user `{owner}` cannot reach {self.place} (a parent folder is private); "
                "set LAKEHOUSE_HOME to a folder others can traverse"
            )
            raise SourceError(msg)
        initdb = self._bin_dir() / "initdb"
        if not self._can(owner, "-x", initdb):
            msg = (
                f"OS user `{owner}` cannot run {initdb} (a parent folder is private); "
                "install the system's PostgreSQL or set LAKEHOUSE_PG_BIN to binaries others "
                "can run"
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


def _write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only, from its creation on (no chmod after)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def _system_copy_of_pgserver() -> Path:
    """Copy the `pgserver` wheel's Postgres under SYSTEM_DIR, once, and return its bin.

    Its binaries find their libraries relative to themselves (`$ORIGIN/../../../
    pgserver.libs`), so the copy keeps the wheel's layout.
    """
    source = pgserver_bin_dir()
    assert source is not None
    site = source.parents[2]  # .../site-packages
    version = importlib.metadata.version("pgserver")
    target = SYSTEM_DIR / f"pgserver-{version}"
    bin_dir = target / "pgserver" / "pginstall" / "bin"
    if (bin_dir / "pg_ctl").is_file():
        return bin_dir
    SYSTEM_DIR.mkdir(mode=0o755, exist_ok=True)
    SYSTEM_DIR.chmod(0o755)
    partial = SYSTEM_DIR / f".pgserver-{version}.{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    for part in ("bin", "lib", "share"):
        shutil.copytree(
            site / "pgserver" / "pginstall" / part, partial / "pgserver" / "pginstall" / part
        )
    libs = site / "pgserver.libs"
    if libs.is_dir():
        shutil.copytree(libs, partial / "pgserver.libs")
    for folder, _, _ in os.walk(partial):  # readable and runnable by the cluster's owner
        Path(folder).chmod(0o755)
    try:
        partial.rename(target)  # whole, or not at all: a concurrent copy may have won
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
    return bin_dir


def server_info(conn: psycopg.Connection) -> dict[str, str]:
    """Return what `lakehouse db status` shows of a server."""
    row = conn.execute(
        "SELECT current_setting('server_version'), current_setting('wal_level'), current_user"
    ).fetchone()
    assert row is not None
    return {"version": row[0], "wal_level": row[1], "user": row[2]}
