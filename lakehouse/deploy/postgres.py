"""The postgres image's part in a rehearsal: its entrypoint, run with the system's binaries.

On an empty data folder the image's `docker-entrypoint.sh` runs initdb as
`POSTGRES_USER` with `POSTGRES_PASSWORD`, starts a temporary server on the Unix socket
only, creates `POSTGRES_DB`, runs `/docker-entrypoint-initdb.d` in name order (executable
`*.sh` run, others sourced, `*.sql` through psql) as the superuser with the container's
environment, stops that server, and then runs the service's command. This does the same.

One difference, by design: every client of a rehearsal connects from 127.0.0.1, which
initdb's defaults (and so the image's) trust without a password. In a container only the
container itself is 127.0.0.1 and every other service comes through the image's
`host all all all scram-sha-256` line; here TCP always asks for the password, so a
service with a wrong password fails here as it would in compose.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lakehouse.errors import SourceError
from lakehouse.source.embedded import find_bin_dir

STOP_SIGNAL = "SIGINT"
"""The image's STOPSIGNAL: a fast shutdown (SIGTERM would wait for every client to leave)."""


class PostgresImage:
    """A data folder run as the postgres image runs it, listening on 127.0.0.1:`port`."""

    def __init__(self, data: Path, sockets: Path, port: int, *, log: Path) -> None:
        self.data = data
        self.sockets = sockets
        self.port = port
        self.log = log
        self.bin = find_bin_dir()
        self.owner = _owner()

    def as_owner(self) -> dict[str, Any]:
        """Popen arguments that run a command as the cluster's OS user (root: `postgres`)."""
        if self.owner is None:
            return {}
        return {"user": self.owner, "group": self.owner}

    def _run(self, argv: Sequence[str], env: dict[str, str]) -> None:
        with self.log.open("a") as out:
            done = subprocess.run(
                list(argv),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
                cwd=str(self.data.parent),
                **self.as_owner(),
            )
        if done.returncode != 0:
            msg = f"postgres entrypoint: `{Path(argv[0]).name}` failed; see {self.log}"
            raise SourceError(msg)

    def initialise(self, env: dict[str, str], scripts: Path | None) -> bool:
        """Do what the entrypoint does on a new volume; return False if it was not new."""
        if (self.data / "PG_VERSION").exists():
            return False
        user = env.get("POSTGRES_USER") or "postgres"
        database = env.get("POSTGRES_DB") or user
        password = env.get("POSTGRES_PASSWORD", "")
        if not password:
            msg = "postgres: POSTGRES_PASSWORD is empty; the image refuses to start without one"
            raise SourceError(msg)
        for folder in (self.data, self.sockets):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        pwfile = self.data.parent / ".pwfile"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
        if self.owner is not None:
            for path in (self.data, self.sockets, pwfile, self.log):
                path.touch() if not path.exists() else None
                shutil.chown(path, user=self.owner, group=self.owner)
        base = {"PATH": f"{self.bin}{os.pathsep}/usr/bin:/bin", "LANG": "C.UTF-8"}
        try:
            self._run(
                [
                    str(self.bin / "initdb"),
                    "-D",
                    str(self.data),
                    "--username",
                    user,
                    "--pwfile",
                    str(pwfile),
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    *env.get("POSTGRES_INITDB_ARGS", "").split(),
                ],
                base,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        socket = (
            f"-c listen_addresses='' -p {self.port} -c unix_socket_directories='{self.sockets}'"
        )
        ctl = [str(self.bin / "pg_ctl"), "-D", str(self.data), "-w"]
        self._run([*ctl, "-o", socket, "start"], base)
        try:
            session = (
                base
                | env
                | {
                    "PGHOST": str(self.sockets),
                    "PGPORT": str(self.port),
                    "PGPASSWORD": password,
                    "PGUSER": user,
                }
            )
            psql = [str(self.bin / "psql"), "-v", "ON_ERROR_STOP=1", "--no-psqlrc"]
            if database != "postgres":
                self._run([*psql, "-d", "postgres", "-c", f'CREATE DATABASE "{database}"'], session)
            for script in sorted(scripts.iterdir()) if scripts else []:
                if script.suffix == ".sh" and os.access(script, os.X_OK):
                    self._run([str(script)], session)
                elif script.suffix == ".sh":
                    self._run(["/bin/sh", str(script)], session)
                elif script.suffix == ".sql":
                    self._run([*psql, "-d", database, "-f", str(script)], session)
        finally:
            self._run([*ctl, "-m", "fast", "stop"], base)
        return True

    def server_argv(self, command: Sequence[str]) -> list[str]:
        """Return the service's command (`postgres -c ...`) on this data folder and port."""
        if not command or command[0] != "postgres":
            msg = f"postgres: the rehearsal runs `postgres ...` commands only, not {command[:1]}"
            raise SourceError(msg)
        return [
            str(self.bin / "postgres"),
            "-D",
            str(self.data),
            *command[1:],
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"port={self.port}",
            "-c",
            f"unix_socket_directories={self.sockets}",
        ]


def _owner() -> str | None:
    """Return the OS user Postgres runs as: `postgres` when we are root (initdb refuses)."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam("postgres")
    except KeyError:
        msg = "running as root with no `postgres` OS user to run the server as; create one"
        raise SourceError(msg) from None
    return "postgres"
