"""What a rehearsed system must show once it is up: the checks, in the order they can pass.

Each check reads the system the way its operator would: `lakehouse status`, `verify` and
`stream alive` with the environment of the service whose role they need (as
`docker compose exec pipeline lakehouse status` in compose/README.md), the API over
HTTP, and Postgres' own views as its superuser.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict

from lakehouse.deploy.supervisor import RehearsalFailed, Supervisor
from lakehouse.source.schema import TABLES

Say = Callable[[str], None]


def role(sup: Supervisor, command: str) -> str:
    """Return the service that runs `lakehouse <command>`."""
    for name in sup.project.services:
        argv = sup.project.argv(name)
        if sup.image(name) == "build" and argv[:2] == ["lakehouse", command]:
            return name
    msg = f"no service runs `lakehouse {command}`; the rehearsal checks need one"
    raise RehearsalFailed(msg)


def lakehouse(sup: Supervisor, service: str, *argv: str, timeout: float = 300) -> tuple[int, str]:
    """Run `lakehouse ARGV` with the environment of `service`; return (exit code, output)."""
    env = sup.environment(service)
    done = subprocess.run(
        [str(sup.bin / "lakehouse"), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=sup.workdir,
    )
    return done.returncode, done.stdout + done.stderr


def http(url: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """GET (or POST `body` as JSON); return the status and the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")  # noqa: S310
    request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310 - loopback
            return answer.status, json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")
    except OSError as exc:
        return 0, {"error": str(exc)}


def superuser_dsn(sup: Supervisor) -> str:
    """Return the DSN of the Postgres service's superuser (the image's POSTGRES_*)."""
    ((name, pg),) = sup.postgres.items()
    env = sup.project.environment(name)
    user = env.get("POSTGRES_USER") or "postgres"
    return (
        f"host=127.0.0.1 port={pg.port} user={user} dbname={env.get('POSTGRES_DB') or user} "
        f"password={env['POSTGRES_PASSWORD']} sslmode=disable"
    )


def until(what: str, deadline: float, sup: Supervisor, probe: Callable[[], Any]) -> Any:
    """Call `probe` every 2 s until it returns something true; fail at `deadline`."""
    last: Any = None
    while time.monotonic() < deadline:
        sup.check_running()
        last = probe()
        if last and not isinstance(last, Exception):
            return last
        time.sleep(2)
    msg = f"{what}: not in time (last seen: {last})"
    raise RehearsalFailed(msg)


def status(sup: Supervisor, service: str) -> dict[str, Any] | None:
    """Return `lakehouse status --format json` as the service sees it; None on failure."""
    code, out = lakehouse(sup, service, "status", "--format", "json")
    if code != 0:
        return None
    return dict(json.loads(out[out.index("{") :]))


def unhealthy(state: dict[str, Any]) -> list[str]:
    """Return what keeps a status from healthy: a section's error, or an empty section."""
    problems = [
        f"{key}: {value}" for key, value in state.items() if key.endswith("_error") and value
    ]
    for section in ("source", "tables", "stream", "runs", "features"):
        if not state.get(section):
            problems.append(f"{section}: empty")
    for slot in state.get("stream", []):
        if not slot.get("active"):
            problems.append(f"stream: slot of {slot.get('table')} not active")
    latest = state.get("runs", [{}])[0] if state.get("runs") else {}
    if latest and latest.get("outcome") == "failed":
        problems.append(f"runs: the latest failed: {latest.get('error')}")
    return problems


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


def converge(sup: Supervisor, deadline: float, say: Say) -> dict[str, Any]:
    """Check that the system converges; return what was seen.

    In the order the checks can pass: the stream first (while the pipeline's first run
    is still going), then the API once a model is trained, then silver against the
    source, then the whole status once.
    """
    seen: dict[str, Any] = {}
    pipeline, stream, api = role(sup, "run"), role(sup, "stream"), role(sup, "serve")
    seen["bucket_only"] = _bucket_only(sup, pipeline, say)
    seen["stream"] = _stream(sup, stream, deadline, say)

    until("the pipeline's first run", deadline, sup, lambda: logged(sup, pipeline, "pipeline.done"))
    seen["predict"] = _api(sup, api, pipeline, deadline, say)

    code, out = lakehouse(sup, pipeline, "verify", "--timeout", "120")
    if code != 0:
        msg = f"silver differs from the source (`lakehouse verify`):\n{out}"
        raise RehearsalFailed(msg)
    seen["verify"] = [_message(line) for line in out.splitlines() if "matches the source" in line]
    for line in seen["verify"]:
        say(f"verify: {line}")

    def healthy() -> dict[str, Any] | None:
        state = status(sup, pipeline)
        return state if state is not None and not unhealthy(state) else None

    try:
        state = until("`lakehouse status` healthy in every section", deadline, sup, healthy)
    except RehearsalFailed:
        last = status(sup, pipeline)
        msg = f"status not healthy: {unhealthy(last) if last else 'failed'}"
        raise RehearsalFailed(msg) from None
    run = state["runs"][0]
    seen["pipeline_run"] = {k: run.get(k) for k in ("outcome", "seconds", "tasks")}
    tasks, took = len(run["tasks"]), run["seconds"]
    say(f"status: a run recorded ({run['outcome']}, {tasks} tasks, {took:.0f}s)")
    sections = [
        k
        for k in ("source", "tables", "stream", "runs", "verifications", "features")
        if state.get(k)
    ]
    seen["status_sections"] = sections
    say(f"status: healthy in every section ({', '.join(sections)})")
    return seen


def _bucket_only(sup: Supervisor, service: str, say: Say) -> str:
    """Check that the services' S3 keys reach their bucket and nothing else (MinIO's policy)."""
    from minio import Minio
    from minio.error import S3Error

    env = sup.environment(service)
    endpoint = urlsplit(env["LAKEHOUSE_S3_ENDPOINT"])
    bucket = urlsplit(env["LAKEHOUSE_STORAGE_URI"]).netloc
    client = Minio(
        endpoint.netloc,
        access_key=env["LAKEHOUSE_S3_ACCESS_KEY_ID"],
        secret_key=env["LAKEHOUSE_S3_SECRET_ACCESS_KEY"],
        secure=endpoint.scheme == "https",
        region="us-east-1",
    )
    if not client.bucket_exists(bucket):
        msg = f"{service}: its key cannot see the bucket `{bucket}`"
        raise RehearsalFailed(msg)
    try:
        client.make_bucket(f"{bucket}-other")
    except S3Error as exc:
        if exc.code != "AccessDenied":
            raise
    else:
        msg = f"{service}: its key made a bucket beside `{bucket}`"
        raise RehearsalFailed(msg)
    say(f"{service}: its S3 key reaches bucket `{bucket}` and is denied another")
    return bucket


def _stream(sup: Supervisor, stream: str, deadline: float, say: Say) -> dict[str, Any]:
    """Check that the stream replicates as the CDC role alone, is alive and lands changes."""
    cdc_role = conninfo_to_dict(sup.environment(stream)["LAKEHOUSE_PG_DSN"])["user"]

    def replicating() -> list[tuple[str, str]]:
        with psycopg.connect(superuser_dsn(sup), autocommit=True) as conn:
            rows = conn.execute(
                "SELECT usename, application_name FROM pg_stat_replication"
            ).fetchall()
        return rows if len(rows) >= len(TABLES) else []

    rows = until("the stream replicating every table", deadline, sup, replicating)
    users = sorted({user for user, _ in rows})
    if users != [cdc_role]:
        msg = f"{stream}: replicates as {users}, not as {cdc_role} alone"
        raise RehearsalFailed(msg)

    def landed() -> int:
        return sum(int(r.get("changes") or 0) for r in logged(sup, stream, "stream.progress"))

    changes = until("changes landing from the stream", deadline, sup, landed)
    code, out = lakehouse(sup, stream, "stream", "alive")
    if code != 0:
        msg = f"{stream}: `lakehouse stream alive` exited {code}: {out.strip()}"
        raise RehearsalFailed(msg)
    say(
        f"{stream}: {len(rows)} walsenders as {cdc_role}; {changes:,} changes landed; {out.strip()}"
    )
    return {"role": cdc_role, "walsenders": len(rows), "changes": changes}


def _api(sup: Supervisor, api: str, pipeline: str, deadline: float, say: Say) -> dict[str, Any]:
    """Check that the API is live at once, ready once a model is trained, and predicts."""
    base = f"http://127.0.0.1:{sup.port(api, min(sup.ports[api]))}"
    code, _ = http(base + "/healthz")
    if code != 200:
        msg = f"{api}: /healthz answered {code}"
        raise RehearsalFailed(msg)
    until("/readyz answering 200", deadline, sup, lambda: http(base + "/readyz")[0] == 200)
    with psycopg.connect(superuser_dsn(sup), autocommit=True) as conn:
        schema = sup.environment(pipeline)["LAKEHOUSE_PG_SCHEMA"]
        row = conn.execute(
            f'SELECT min(application_id) FROM "{schema}".loan_applications'
        ).fetchone()
    assert row is not None
    code, answer = http(base + "/predict", {"application_id": row[0]})
    if code != 200:
        msg = f"{api}: /predict answered {code}: {answer}"
        raise RehearsalFailed(msg)
    say(
        f"{api}: /healthz 200, /readyz 200, /predict application {row[0]}: {answer['decision']} "
        f"(p={answer['probability']:.3f}, model {answer['model_version']})"
    )
    return {k: answer[k] for k in ("decision", "probability", "model_version")}


def _message(line: str) -> str:
    """Return the message of a JSON log line, or the line."""
    try:
        return str(json.loads(line)["message"])
    except (ValueError, KeyError, TypeError):
        return line
