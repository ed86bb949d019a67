"""How a rehearsal looks at a running service: its CLI, its HTTP API, its log, Postgres.

Every probe is bounded by the rehearsal's deadline, and a probe that meets a service
still starting (a refused connection, a half-written answer) is tried again by `until`
rather than ending the rehearsal.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from lakehouse.deploy.supervisor import RehearsalFailed, Supervisor


def role(sup: Supervisor, command: str) -> str:
    """Return the service that runs `lakehouse <command>`."""
    for name in sup.project.services:
        argv = sup.project.argv(name)
        if sup.image(name) == "build" and argv[:2] == ["lakehouse", command]:
            return name
    msg = f"no service runs `lakehouse {command}`; the rehearsal checks need one"
    raise RehearsalFailed(msg)


def lakehouse(
    sup: Supervisor, service: str, *argv: str, deadline: float
) -> subprocess.CompletedProcess[str]:
    """Run `lakehouse ARGV` with the environment of `service`, within the deadline."""
    left = deadline - time.monotonic()
    shown = f"`lakehouse {' '.join(argv)}` ({service})"
    if left <= 0:
        msg = f"{shown}: no time left before the rehearsal's --timeout"
        raise RehearsalFailed(msg)
    try:
        return subprocess.run(
            [str(sup.bin / "lakehouse"), *argv],
            env=sup.environment(service),
            capture_output=True,
            text=True,
            timeout=left,
            check=False,
            cwd=sup.workdir,
        )
    except subprocess.TimeoutExpired:
        msg = f"{shown}: still running at the rehearsal's --timeout"
        raise RehearsalFailed(msg) from None


def status(sup: Supervisor, service: str, deadline: float) -> dict[str, Any] | None:
    """Return `lakehouse status --format json` as the service sees it; None on failure."""
    done = lakehouse(sup, service, "status", "--format", "json", deadline=deadline)
    if done.returncode != 0:
        return None
    try:
        return dict(json.loads(done.stdout))
    except ValueError:
        return None


def http(url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """GET (or POST `body` as JSON); return the status (0: no answer) and the JSON body."""
    data = None if body is None else json.dumps(body).encode()
    method = "GET" if data is None else "POST"
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - loopback
    request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310 - loopback
            return answer.status, _json(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, _json(exc.read())
    except OSError as exc:
        return 0, {"error": str(exc)}


def _json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body or b"{}")
    except ValueError:
        return {"body": body[:200].decode(errors="replace")}
    return value if isinstance(value, dict) else {"body": value}


def superuser(sup: Supervisor) -> tuple[str, str]:
    """Return the DSN of the Postgres service's superuser (the image's POSTGRES_*), and who."""
    ((name, pg),) = sup.postgres.items()
    env = sup.project.environment(name)
    user = env.get("POSTGRES_USER") or "postgres"
    dsn = make_conninfo(
        host="127.0.0.1",
        port=str(pg.port),
        user=user,
        dbname=env.get("POSTGRES_DB") or user,
        password=env["POSTGRES_PASSWORD"],
        sslmode="disable",
        connect_timeout="10",
    )
    return dsn, user


def query(sup: Supervisor, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one query as the superuser."""
    with psycopg.connect(superuser(sup)[0], autocommit=True) as conn:
        return conn.execute(sql.encode(), params).fetchall()


def logged(sup: Supervisor, service: str, event: str) -> list[dict[str, Any]]:
    """Return the JSON log records of `service` with this event (cheap: no command run)."""
    out = []
    for line in sup.processes[service].log.read_text(errors="replace").splitlines():
        if f'"event": "{event}"' in line:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def message(line: str) -> str:
    """Return the message of a JSON log line, or the line."""
    try:
        return str(json.loads(line)["message"])
    except (ValueError, KeyError, TypeError):
        return line


def until(what: str, deadline: float, sup: Supervisor, probe: Callable[[], Any]) -> Any:
    """Call `probe` every 2 s until it returns something true; fail at `deadline`.

    A probe that raises because a service is still starting is tried again.
    """
    last: Any = None
    while time.monotonic() < deadline:
        sup.check_running()
        try:
            last = probe()
        except (OSError, ValueError, psycopg.Error) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(2)
    msg = f"{what}: not in time (last seen: {last})"
    raise RehearsalFailed(msg)
