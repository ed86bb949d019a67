"""What a rehearsed system must show once it is up: the checks, in the order they can pass.

Each check reads the system the way its operator would: `lakehouse status`, `verify` and
`stream alive` with the environment of the service whose role they need (as
`docker compose exec pipeline lakehouse status` in compose/README.md), the API over
HTTP, and Postgres' own views as its superuser.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from psycopg.conninfo import conninfo_to_dict

from lakehouse.deploy.probes import (
    http,
    lakehouse,
    logged,
    message,
    query,
    role,
    status,
    superuser,
    until,
)
from lakehouse.deploy.supervisor import RehearsalFailed, Supervisor
from lakehouse.source.schema import TABLES

Say = Callable[[str], None]


def unhealthy(state: dict[str, Any]) -> list[str]:
    """Return what keeps a status from healthy.

    A section's error or an empty section, an inactive slot, a failed last run, a
    verification with differences, no model, an online store never loaded, monitoring
    that cannot be read.
    """
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
    for check in state.get("verifications", []):
        if check.get("differences"):
            problems.append(f"verifications: {check.get('table')} differs from the source")
    features = state.get("features") or {}
    if not features.get("model_version"):
        problems.append("features: no model")
    if not features.get("materialized_up_to"):
        problems.append("features: the online store was never loaded")
    monitoring = features.get("monitoring")
    if isinstance(monitoring, dict) and monitoring.get("error"):
        problems.append(f"features: monitoring: {monitoring['error']}")
    return problems


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

    done = lakehouse(sup, pipeline, "verify", "--timeout", "120", deadline=deadline)
    out = done.stdout + done.stderr
    if done.returncode != 0:
        msg = f"silver differs from the source (`lakehouse verify`):\n{out}"
        raise RehearsalFailed(msg)
    seen["verify"] = [message(line) for line in out.splitlines() if "matches the source" in line]
    for line in seen["verify"]:
        say(f"verify: {line}")

    def healthy() -> dict[str, Any] | None:
        state = status(sup, pipeline, deadline)
        return state if state is not None and not unhealthy(state) else None

    try:
        state = until("`lakehouse status` healthy in every section", deadline, sup, healthy)
    except RehearsalFailed:
        last = status(sup, pipeline, time.monotonic() + 120)
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

    def replicating() -> list[tuple[Any, ...]]:
        rows = query(sup, "SELECT usename, application_name FROM pg_stat_replication")
        return rows if len(rows) >= len(TABLES) else []

    rows = until("the stream replicating every table", deadline, sup, replicating)
    users = sorted({user for user, _ in rows})
    if users != [cdc_role]:
        msg = f"{stream}: replicates as {users}, not as {cdc_role} alone"
        raise RehearsalFailed(msg)
    # Least privilege: a role that may replicate, and none of a superuser's powers.
    ((*powers,),) = query(
        sup,
        "SELECT rolsuper, rolcreaterole, rolcreatedb, rolbypassrls, rolreplication "
        "FROM pg_roles WHERE rolname = %s",
        (cdc_role,),
    )
    if cdc_role == superuser(sup)[1] or powers != [False, False, False, False, True]:
        msg = (
            f"{stream}: replicates as {cdc_role}, which is not least-privilege (superuser, "
            f"createrole, createdb, bypassrls, replication: {powers})"
        )
        raise RehearsalFailed(msg)

    def landed() -> int:
        return sum(int(r.get("changes") or 0) for r in logged(sup, stream, "stream.progress"))

    changes = until("changes landing from the stream", deadline, sup, landed)
    done = lakehouse(sup, stream, "stream", "alive", deadline=deadline)
    out = done.stdout + done.stderr
    if done.returncode != 0:
        msg = f"{stream}: `lakehouse stream alive` exited {done.returncode}: {out.strip()}"
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
    schema = sup.environment(pipeline)["LAKEHOUSE_PG_SCHEMA"].replace('"', '""')
    (row,) = query(sup, f'SELECT min(application_id) FROM "{schema}".loan_applications')
    code, answer = http(base + "/predict", {"application_id": row[0]})
    if code != 200:
        msg = f"{api}: /predict answered {code}: {answer}"
        raise RehearsalFailed(msg)
    say(
        f"{api}: /healthz 200, /readyz 200, /predict application {row[0]}: {answer['decision']} "
        f"(p={answer['probability']:.3f}, model {answer['model_version']})"
    )
    return {k: answer[k] for k in ("decision", "probability", "model_version")}
