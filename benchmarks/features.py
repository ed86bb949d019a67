"""Feature store and serving benchmark: the lakehouse online store against its floors.

Run by hand (about 10 minutes at 45k rows; 1M adds seeding, the pipeline and bigger loads)::

    .venv/bin/python benchmarks/features.py                  # 45k and 1M rows
    .venv/bin/python benchmarks/features.py --rows 45000 --requests 1000 --demo
    .venv/bin/python benchmarks/features.py --rows 1000000 --skip feast,freshness,latency

For each source size N, under a temporary home with an embedded Postgres (fsync off):
`lakehouse seed --rows N`, `lakehouse run --no-ml`, `lakehouse features apply`. Then:

1. **Historical retrieval**: Feast `get_historical_features` for every decided
   application at its `applied_at` (N entity rows), through the feature service
   `loan_approval_v1`, to pandas. Baseline: the same point-in-time join by hand, one
   DuckDB `ASOF JOIN` over the gold Delta table. Both are checked to have the same rows.
2. **Materialization**, a first full load into an empty online store, SQLite and
   Postgres. Ours: `lakehouse features materialize` in a child process (wall time, and
   the child's own peak RSS), after deleting the SQLite file (or dropping the Postgres
   `_online` schema) and `materialized.json`. Floor: every row ours wrote, read back into
   memory (not timed) and bulk-loaded into an empty table of the same shape in the same
   database (SQLite `executemany` in one transaction; Postgres `COPY ... FROM STDIN`).
   Feast's own SQLite store and `FeatureStore.materialize`, in a child too, at the
   smallest size only (at 1M it takes many minutes).
3. **Online latency** (smallest size): `lakehouse train`, then `lakehouse serve`;
   `POST /predict {"application_id": ...}` for random decided applications over
   keep-alive HTTP (the standard library's client), 1 then 32 client threads, then 32
   against `serve --workers 2`.
   Baseline: Feast `get_online_features` in process (the target is a ratio to its p99).
   Floors: a plain ASGI app and a bare FastAPI app in uvicorn giving the same answer with
   no work, timed by the same client; a bare SQLite `SELECT "values"` of the entity's row.
   One request is broken down into the API's read (`ServiceReader`), the model
   (`predict_one`, what `/predict` calls) and the rest (HTTP, parsing, JSON).
4. **Freshness** (smallest size): `lakehouse stream --promote` and `lakehouse simulate
   --rate 200` in child processes; this process inserts one new application every 0.5 s
   and polls Feast every 20 ms until it serves the application's amount. Floor: the time
   until the stream has landed the same change in bronze.
5. With `--demo`: `lakehouse demo` in an empty folder (embedded defaults), cold.

Ratios are computed within one run (the machine is noisy). The Markdown report is printed
and written to `benchmarks/results/features-<timestamp>.md`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent
RESULTS = HERE.parent / "results"
DEFAULT_ROWS = (45_000, 1_000_000)
FAST_PG = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
CLIENTS = (1, 32)
ROUNDS = 10
"""The one-client `/predict` and Feast's in-process read are timed in this many turns."""
LOG_SECONDS = 30.0
"""Traffic per side when timing the inference log on against off."""
TURN_WARM_UP = 5
"""Untimed requests at the start of each turn: the caches the other side's turn took."""
PARTS = ("historical", "materialize", "feast", "latency", "freshness")
SMALLEST_ONLY = ("feast", "latency", "freshness")
"""Parts measured at the smallest size only (Feast's own writer takes many minutes at 1M)."""

PROBES = 60
PROBE_EVERY = 0.5
POLL_EVERY = 0.02
PROBE_TIMEOUT = 60.0
SIMULATE_RATE = 200

# A child that runs one `lakehouse` command and prints its own peak RSS at exit: the
# benchmark's memory (Feast, DuckDB, the rows read back) is not mixed in.
PEAK_RSS = """
import resource, sys
from lakehouse.entry import main
code = main()
print(f"peak_rss_kib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
sys.exit(code)
"""

# Feast's own SQLite store and materialization, as tests/ml/test_ml.py runs them; argv[1]
# is the feature_store.yaml that selects `type: sqlite`. `apply` creates its tables.
FEAST_OWN = """
import resource, sys, time
from datetime import UTC, datetime
from lakehouse.ml import features
from lakehouse.ml.online import VIEWS
from lakehouse.settings import Settings
from lakehouse.storage import Storage

settings = Settings.from_env()
features.feature_store(settings, Storage.from_settings(settings))  # DuckDB's extensions
from feast import FeatureStore

store = FeatureStore(fs_yaml_file=sys.argv[1])
assert store.config.online_store.type == "sqlite"
features.apply(store)
start = time.perf_counter()
store.materialize(
    start_date=datetime(1970, 1, 2, tzinfo=UTC),
    end_date=datetime.now(UTC),
    feature_views=list(VIEWS),
)
print(f"materialize_seconds={time.perf_counter() - start}", file=sys.stderr)
print(f"peak_rss_kib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
"""


# What any `lakehouse` ML command pays before its work: the interpreter, the lakehouse and
# Feast imports (shown beside ours, whose wall clock includes it).
STARTUP = """
import resource, sys
from lakehouse.cli import main
from lakehouse.ml import features
features.import_feast()
import lakehouse.ml.materialize, lakehouse.ml.online.store, lakehouse.ml.tasks
print(f"peak_rss_kib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", file=sys.stderr)
"""


def log(message: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- children and numbers


@dataclass
class Child:
    """A finished child process: wall time, its own peak RSS, and what it printed."""

    seconds: float
    peak_rss: int
    """Bytes (`ru_maxrss` of the child, read inside it)."""
    values: dict[str, float]
    """`name=number` lines the child printed on stderr."""
    stdout: str


def run_child(
    env: dict[str, str], code: str, *args: str, cwd: Path | None = None, timeout: float = 7200
) -> Child:
    """Run `python -c code args...`; return its wall time and its own peak RSS."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {done.stderr[-3000:]}")
    values = {
        m[1]: float(m[2]) for m in re.finditer(r"^(\w+)=([0-9.]+)$", done.stderr, re.MULTILINE)
    }
    return Child(seconds, int(values.pop("peak_rss_kib")) * 1024, values, done.stdout)


def lakehouse(env: dict[str, str], *args: str) -> float:
    """Run one `lakehouse` command (set-up, not measured); return its wall time."""
    return run_child(env, PEAK_RSS, *args).seconds


def child_env(home: Path | None, **settings: str) -> dict[str, str]:
    """The environment of a child: this one without `LAKEHOUSE_*`, plus the given ones."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKEHOUSE_")}
    if home is not None:
        env["LAKEHOUSE_HOME"] = str(home)
    env |= {f"LAKEHOUSE_{k.upper()}": v for k, v in settings.items()}
    return env


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


@dataclass
class Latency:
    """Samples in seconds of one path."""

    name: str
    samples: list[float] = field(default_factory=list)

    def ms(self, q: float) -> float:
        return percentile(self.samples, q) * 1000

    def cells(self, *quantiles: float) -> str:
        return " | ".join(f"{self.ms(q):.2f} ms" for q in quantiles)


@dataclass
class SizeResult:
    rows: int
    setup: dict[str, float] = field(default_factory=dict)
    historical: dict[str, Any] = field(default_factory=dict)
    materialize: dict[str, dict[str, Any]] = field(default_factory=dict)
    feasts_own: dict[str, Any] = field(default_factory=dict)
    startup: float = 0.0
    load: dict[str, float] = field(default_factory=dict)
    """The machine's 1-minute load average after each part (it is shared)."""
    latency: list[Latency] = field(default_factory=list)
    breakdown: dict[str, float] = field(default_factory=dict)
    freshness: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- historical retrieval


def measure_historical(settings: Any, storage: Any) -> dict[str, Any]:
    """Feast's point-in-time join against the same join by hand in DuckDB."""
    from lakehouse import duck
    from lakehouse.ml import features, models

    store = features.feature_store(settings, storage)
    entities = models.entity_frame(storage)
    service = store.get_feature_service(features.SERVICE)
    refs = models.feature_refs(store)
    start = time.perf_counter()
    feast_frame = store.get_historical_features(entity_df=entities, features=service).to_df()
    feast_seconds = time.perf_counter() - start

    columns = ", ".join(f"f.{duck.quote(r.split(':', 1)[1])}" for r in refs)
    con = duck.connect(settings, storage)
    try:
        con.register("entities", entities)
        start = time.perf_counter()
        direct = con.execute(
            f"""
            SELECT e.*, {columns}
            FROM entities e
            ASOF LEFT JOIN {duck.scan(storage.uri("gold", "application_features"))} f
              ON e.application_id = f.application_id AND e.event_timestamp >= f.event_timestamp
            """
        ).df()
        direct_seconds = time.perf_counter() - start
    finally:
        con.close()
    same = (
        len(feast_frame) == len(direct)
        and sorted(feast_frame["application_id"]) == sorted(direct["application_id"])
        and int(feast_frame["loan_amnt"].isna().sum()) == int(direct["loan_amnt"].isna().sum())
    )
    return {
        "entity_rows": len(entities),
        "features": len(refs),
        "feast_seconds": feast_seconds,
        "direct_seconds": direct_seconds,
        "same_rows": same,
    }


# ---------------------------------------------------------------- materialization


def online_schema(settings: Any) -> str:
    return f"{settings.pg_schema}_online"


def online_table(view: str) -> str:
    """The online table of a view, quoted (`lakehouse.ml.online.tables.table_name`)."""
    from lakehouse.ml.online import PROJECT

    return f'"{PROJECT}__{view}"'


def floor_table(view: str) -> str:
    return f'"bench_floor_{view}"'


def empty_online_store(settings: Any) -> None:
    """Remove the store and the record of its last load: the next load is a first one."""
    import psycopg

    from lakehouse.environment import online_dsn
    from lakehouse.ml import online

    (settings.home / "feast" / "materialized.json").unlink(missing_ok=True)
    if settings.feast_online_store == "postgres":
        with psycopg.connect(online_dsn(settings), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{online_schema(settings)}" CASCADE')
        return
    path = online.sqlite_path(settings)
    for suffix in ("", "-wal", "-shm"):  # a stale log must not be replayed into a new file
        path.with_name(path.name + suffix).unlink(missing_ok=True)


def read_back(settings: Any) -> dict[str, list[tuple[Any, ...]]]:
    """Every row ours wrote, per view, in key order: what the floor loads."""
    import psycopg

    from lakehouse.environment import online_dsn
    from lakehouse.ml import online

    query = 'SELECT entity_key, event_ts, "values", version FROM {} ORDER BY entity_key'
    if settings.feast_online_store == "postgres":
        schema = online_schema(settings)
        with psycopg.connect(online_dsn(settings)) as conn:
            return {
                v: conn.execute(query.format(f'"{schema}".{online_table(v)}')).fetchall()
                for v in online.VIEWS
            }
    conn = sqlite3.connect(online.sqlite_path(settings))
    try:
        return {v: conn.execute(query.format(online_table(v))).fetchall() for v in online.VIEWS}
    finally:
        conn.close()


def sqlite_floor(settings: Any, rows: dict[str, list[tuple[Any, ...]]]) -> float:
    """Load the rows into new tables of the same shape in the same SQLite file: seconds.

    Plain INSERTs with `executemany`, one transaction, under the store's own journal
    settings (WAL, synchronous NORMAL): what SQLite itself costs for these bytes.
    """
    from lakehouse.ml import online

    conn = sqlite3.connect(online.sqlite_path(settings), isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        for view in rows:
            (ddl,) = conn.execute(
                "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?",
                (online_table(view).strip('"'),),
            ).fetchone()
            if online_table(view) not in ddl:
                raise RuntimeError(f"unexpected table definition, update the benchmark: {ddl}")
            conn.execute(ddl.replace(online_table(view), floor_table(view), 1))
        start = time.perf_counter()
        conn.execute("BEGIN")
        for view, view_rows in rows.items():
            conn.executemany(f"INSERT INTO {floor_table(view)} VALUES (?, ?, ?, ?)", view_rows)
        conn.execute("COMMIT")
        seconds = time.perf_counter() - start
        for view in rows:
            conn.execute(f"DROP TABLE {floor_table(view)}")
        return seconds
    finally:
        conn.close()


def postgres_floor(settings: Any, rows: dict[str, list[tuple[Any, ...]]]) -> float:
    """Load the rows with `COPY ... FROM STDIN` into new tables like ours (same schema,
    same primary key), one transaction: seconds."""
    import psycopg

    from lakehouse.environment import online_dsn

    schema = f'"{online_schema(settings)}"'
    with psycopg.connect(online_dsn(settings)) as conn:
        for view in rows:
            conn.execute(
                f"CREATE TABLE {schema}.{floor_table(view)} "
                f"(LIKE {schema}.{online_table(view)} INCLUDING ALL)"
            )
        conn.commit()
        start = time.perf_counter()
        with conn.cursor() as cur:
            for view, view_rows in rows.items():
                with cur.copy(
                    f"COPY {schema}.{floor_table(view)} "
                    '(entity_key, event_ts, "values", version) FROM STDIN'
                ) as copy:
                    for row in view_rows:
                        copy.write_row(row)
        conn.commit()
        seconds = time.perf_counter() - start
        for view in rows:
            conn.execute(f"DROP TABLE {schema}.{floor_table(view)}")
        conn.commit()
    return seconds


def measure_ours_and_floor(settings: Any, env: dict[str, str]) -> dict[str, Any]:
    """`lakehouse features materialize` into an empty store, then the floor on its rows."""
    empty_online_store(settings)
    ours = run_child(env, PEAK_RSS, "features", "materialize")
    rows = read_back(settings)
    floor = postgres_floor if settings.feast_online_store == "postgres" else sqlite_floor
    floor_seconds = floor(settings, rows)
    return {
        "ours_seconds": ours.seconds,
        "ours_peak_rss": ours.peak_rss,
        "floor_seconds": floor_seconds,
        "rows": {view: len(view_rows) for view, view_rows in rows.items()},
        "bytes": sum(len(r[2]) for view_rows in rows.values() for r in view_rows),
    }


def measure_feasts_own(env: dict[str, str], scratch: Path) -> dict[str, Any]:
    """Feast's own SQLite store and materialization, in a child, into a file of its own.

    The registry is left pointing at Feast's store; the next `lakehouse features
    materialize` into an empty store applies the lakehouse's again.
    """
    from lakehouse.ml import features

    source = (features.repo_path() / "feature_store.yaml").read_text()
    ours = "type: lakehouse.ml.online.store.LakehouseSqliteOnlineStore"
    if ours not in source:
        raise RuntimeError(f"feature_store.yaml no longer selects `{ours}`: update the benchmark")
    yaml = scratch / "stock.yaml"
    stock_db = scratch / "stock.db"
    yaml.write_text(
        source.replace(ours, "type: sqlite").replace(
            "${LAKEHOUSE_HOME}/feast/online.db", str(stock_db)
        )
    )
    child = run_child(env, FEAST_OWN, str(yaml))
    conn = sqlite3.connect(stock_db)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        rows = sum(conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables)
    finally:
        conn.close()
    stock_db.unlink()
    return {
        "seconds": child.seconds,
        "materialize_seconds": child.values["materialize_seconds"],
        "peak_rss": child.peak_rss,
        "rows": rows,
    }


# ---------------------------------------------------------------- online latency


def decided_application_ids(storage: Any) -> list[int]:
    import polars as pl

    return (
        pl.read_delta(storage.uri("silver", "loan_applications"), storage_options=storage.options)
        .filter(pl.col("loan_status").is_not_null())["application_id"]
        .to_list()
    )


def reading_store(settings: Any, storage: Any) -> Any:
    """Open Feast as the API does: the online store read-only (never created or locked)."""
    from lakehouse.ml import features

    store = features.feature_store(settings, storage)
    store._get_provider().online_store.read_only = True
    return store


def _serve_and_measure(
    env: dict[str, str],
    ids: list[int],
    rng: random.Random,
    requests: int,
    workers: int,
    client_counts: tuple[int, ...],
    floor: str | None = None,
    between: Callable[[int], None] | None = None,
) -> list[Latency]:
    """Start `lakehouse serve --workers N` (or a `floor` app: "fastapi", "asgi") and time
    `/predict` for each client count.

    With `between`, the one-client requests go in `ROUNDS` rounds, and `between(n)` runs
    after each round with the round's count: a baseline measured in turns with ours, so
    that a burst of load elsewhere on the machine falls on both alike, not on one.
    """
    from lakehouse.source.embedded import free_port

    port = free_port()
    if floor:
        command = [sys.executable, "-c", HTTP_FLOOR_APPS[floor], f"{port}"]
    else:
        command = [sys.executable, "-m", "lakehouse.cli", "serve", "--port", f"{port}"]
        command += ["--workers", f"{workers}"]
    server = _started(command, env, port)
    results = []
    try:
        errors: list[BaseException] = []

        def client_run(n: int, out: list[float], timeout: float = 30) -> None:
            try:
                _time_requests(port, ids, rng, n, out, timeout)
            except BaseException as exc:  # a thread's exception is otherwise lost
                errors.append(exc)

        def clients_run(clients: int, per_client: int, out: list[float], timeout: float) -> None:
            threads = [
                threading.Thread(target=client_run, args=(per_client, out, timeout))
                for _ in range(clients)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise RuntimeError(f"a client failed: {errors[0]!r}") from errors[0]

        # Each worker process loads its model on first use: warm them all, concurrently
        # (connections are spread over the workers by the kernel; a loaded machine may
        # take long to start the second one).
        clients_run(2 * workers, 100, [], timeout=300)
        for clients in client_counts:
            samples: list[float] = []
            per_client = max(1, requests // clients) if clients > 1 else requests
            if clients == 1 and between is not None:
                for _ in range(ROUNDS):
                    clients_run(1, TURN_WARM_UP, [], timeout=30)  # back from the other side
                    clients_run(1, per_client // ROUNDS, samples, timeout=30)
                    between(per_client // ROUNDS)
            else:
                clients_run(clients, per_client, samples, timeout=30)
            name = f"`POST /predict`, {clients} client{'s' if clients > 1 else ''}, HTTP"
            if floor:
                name = FLOOR_NAMES[floor]
            elif workers > 1:
                name += f", `serve --workers {workers}`"
            results.append(Latency(name, samples))
    finally:
        server.terminate()
        server.wait(timeout=30)
    return results


class InProcess:
    """The parts of one `/predict` in this process: the read and the model.

    The same calls the API makes for the same request (`lakehouse.ml.serve`): the
    service's features of one application (the API's `ServiceReader`, and Feast's
    `get_online_features` for the ratio), then `predict_one` on them, one thread.
    """

    def __init__(self, settings: Any, storage: Any, ids: list[int], rng: random.Random):
        from threadpoolctl import threadpool_limits

        from lakehouse.ml import features, models
        from lakehouse.ml.online.reader import ServiceReader

        threadpool_limits(limits=1)  # as the API does
        self.store = reading_store(settings, storage)
        self.service = self.store.get_feature_service(features.SERVICE)
        _, self.trained = models.load(storage)
        reader = ServiceReader.of(self.store, self.service)
        assert reader is not None
        self.reader = reader
        self.ids, self.rng = ids, rng
        self.feast = Latency("Feast `get_online_features`, in process, same service")
        self.ours = Latency("the API's read of the same service (`ServiceReader`), in process")
        self.model = Latency("model `predict_one` on that row, in process")

    def run(self, requests: int) -> None:
        """Time `requests` more reads and scorings, after `TURN_WARM_UP` untimed ones."""
        store, service, trained = self.store, self.service, self.trained
        first = len(self.feast.samples)
        for _ in range(TURN_WARM_UP + requests):
            entity = {"application_id": self.rng.choice(self.ids)}
            start = time.perf_counter()
            self.reader.read(entity)
            direct = time.perf_counter()
            self.ours.samples.append(direct - start)
            start = time.perf_counter()
            answer = store.get_online_features(features=service, entity_rows=[entity]).to_dict()
            read = time.perf_counter()
            row = {k: v[0] for k, v in answer.items()}
            used = {
                c: None if isinstance(row.get(c), float) and math.isnan(row[c]) else row.get(c)
                for c in trained.columns
            }
            trained.predict_one(used)
            scored = time.perf_counter()
            self.feast.samples.append(read - start)
            self.model.samples.append(scored - read)
        for latency in (self.feast, self.ours, self.model):  # drop the warm-up's
            del latency.samples[first : first + TURN_WARM_UP]


def measure_sqlite_read(settings: Any, ids: list[int], rng: random.Random, n: int) -> Latency:
    """The floor of a read: one bare `SELECT "values"` by key, no decoding."""
    from lakehouse.ml import online

    path = online.sqlite_path(settings)
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    floor = Latency('SQLite `SELECT "values" ... WHERE entity_key = ?`, no decoding')
    query = f'SELECT "values" FROM {online_table("application_features")} WHERE entity_key = ?'
    try:
        for _ in range(n):
            key = rng.choice(ids)
            start = time.perf_counter()
            found = conn.execute(query, (key,)).fetchone()
            floor.samples.append(time.perf_counter() - start)
            if found is None:
                raise RuntimeError(f"the SQLite floor found no row for application {key}")
    finally:
        conn.close()
    return floor


HTTP_FLOOR_APP = """
import sys
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

class Request(BaseModel):
    application_id: int

class Answer(BaseModel):
    probability: float
    decision: Literal["approve", "reject"]
    threshold: float
    model_version: str
    features: dict[str, Any]

FEATURES = {f"feature_{i}": 1.5 * i for i in range(21)}
app = FastAPI()

@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}

@app.post("/predict", response_model=Answer)
async def predict(request: Request) -> Answer:
    return Answer(probability=0.5, decision="approve", threshold=0.5,
                  model_version="20261130T000000Z", features=FEATURES)

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""
"""A floor of a `/predict` over HTTP: uvicorn and FastAPI with the API's request and
answer shapes (21 features) and no work, timed by the same client."""

HTTP_ASGI_FLOOR_APP = """
import json, sys
import uvicorn

FEATURES = {f"feature_{i}": 1.5 * i for i in range(21)}
ANSWER = {"probability": 0.5, "decision": "approve", "threshold": 0.5,
          "model_version": "20261130T000000Z", "features": FEATURES}

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/predict":
        json.loads(body)["application_id"]
    out = json.dumps(ANSWER if scope["path"] == "/predict" else {"status": "ok"}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(out))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": out})

uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
"""
"""The floor under the API's fast path: a plain ASGI function in uvicorn that parses the
request and writes the same answer, timed by the same client."""

HTTP_FLOOR_APPS = {"fastapi": HTTP_FLOOR_APP, "asgi": HTTP_ASGI_FLOOR_APP}
FLOOR_NAMES = {
    "fastapi": "bare FastAPI: the same request and answer, no work, 1 client, HTTP",
    "asgi": "plain ASGI in uvicorn: the same request and answer, no work, 1 client, HTTP",
}


def _started(command: list[str], env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    """Start a server and wait until its `/health` answers."""
    import httpx

    quiet = subprocess.DEVNULL
    server = subprocess.Popen(command, env=env, stdout=quiet, stderr=quiet)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            server.kill()
            raise RuntimeError("the API did not start")
        time.sleep(0.2)


def _time_requests(
    port: int, ids: list[int], rng: random.Random, n: int, out: list[float], timeout: float = 30
) -> None:
    """Time `n` `/predict` of random applications, one after another, into `out`."""
    # The standard library's client on one keep-alive connection: httpx's own work is
    # about 2 ms a request on this machine, as much as the server's.
    client = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    try:
        for _ in range(n):
            body = json.dumps({"application_id": rng.choice(ids)})
            start = time.perf_counter()
            client.request("POST", "/predict", body, headers)
            answer = client.getresponse()
            answer.read()
            out.append(time.perf_counter() - start)
            if answer.status != 200:
                raise RuntimeError(f"/predict answered {answer.status}")
    finally:
        client.close()


def measure_logging(
    env: dict[str, str], storage: Any, ids: list[int], rng: random.Random, seconds: float
) -> tuple[Latency, Latency, int]:
    """`/predict` with the inference log on and off: two servers, timed in turns.

    Each side gets `seconds` of back-to-back requests in all, in `ROUNDS` turns: long
    enough for the log to land several times at its own pace (a landing every few
    seconds is what costs; a few thousand requests may see none). Returns both
    latencies and the rows the logging server landed in `bronze.predictions` (it is
    stopped with SIGTERM first, so it lands everything it answered).
    """
    from lakehouse.source.embedded import free_port

    on = Latency("`POST /predict`, 1 client, HTTP, prediction log on (the default)")
    off = Latency("`POST /predict`, 1 client, HTTP, `LAKEHOUSE_PREDICTION_LOG=off`")
    before = _logged_rows(storage)
    servers = []
    try:
        for setting in ("on", "off"):
            port = free_port()
            command = [sys.executable, "-m", "lakehouse.cli", "serve", "--port", f"{port}"]
            servers.append(
                (_started(command, {**env, "LAKEHOUSE_PREDICTION_LOG": setting}, port), port)
            )
        for _, port in servers:
            _time_requests(port, ids, rng, 200, [])  # warm: models loaded, caches
        sent = 0
        for turn in range(ROUNDS):
            order = [(servers[0][1], on), (servers[1][1], off)]
            for port, latency in order if turn % 2 == 0 else order[::-1]:
                _time_requests(port, ids, rng, TURN_WARM_UP, [])
                before_turn = len(latency.samples)
                until = time.monotonic() + seconds / ROUNDS
                while time.monotonic() < until:
                    _time_requests(port, ids, rng, 100, latency.samples)
                if latency is on:
                    sent += TURN_WARM_UP + len(latency.samples) - before_turn
    finally:
        for server, _ in servers:
            server.send_signal(signal.SIGTERM)
        for server, _ in servers:
            server.wait(timeout=60)
    landed = _logged_rows(storage) - before
    if landed != 200 + sent:
        raise RuntimeError(f"the logging server answered {200 + sent:,} but landed {landed:,}")
    return on, off, landed


def _logged_rows(storage: Any) -> int:
    if not storage.exists("bronze", "predictions"):
        return 0
    return int(storage.table("bronze", "predictions").count())


def measure_latency(
    settings: Any, storage: Any, env: dict[str, str], requests: int
) -> tuple[list[Latency], dict[str, float]]:
    """`/predict` over HTTP with 1 and 32 clients; the Feast read, model and SQLite floors."""
    ids = decided_application_ids(storage)
    rng = random.Random(7)
    in_process = InProcess(settings, storage, ids, random.Random(11))
    in_process.run(100)  # warm: the first reads open the store
    in_process.feast.samples.clear()
    in_process.ours.samples.clear()
    in_process.model.samples.clear()
    # One server process with 1 client (in turns with the in-process reads: the ratio's
    # two sides under the same load) and 32 clients, then `--workers 2` with 32 clients.
    http = _serve_and_measure(env, ids, rng, requests, 1, CLIENTS, between=in_process.run)
    http += _serve_and_measure(env, ids, rng, requests, 2, (max(CLIENTS),))
    floors = [
        _serve_and_measure(env, ids, rng, requests, 1, (1,), floor=kind)[0]
        for kind in ("asgi", "fastapi")
    ]
    feast, reader, model = in_process.feast, in_process.ours, in_process.model
    log_on, log_off, landed = measure_logging(env, storage, ids, rng, LOG_SECONDS)
    sqlite_read = measure_sqlite_read(settings, ids, rng, requests)
    one_client = http[0]
    breakdown = {
        "http_p50": one_client.ms(50),
        "reader_p50": reader.ms(50),
        "model_p50": model.ms(50),
        "rest_p50": one_client.ms(50) - reader.ms(50) - model.ms(50),
        "floor_p50": floors[0].ms(50),
        "floor_p99": floors[0].ms(99),
        "ratio_p99": one_client.ms(99) / feast.ms(99),
        "floor_ratio_p99": floors[0].ms(99) / feast.ms(99),
        "log_p50": log_on.ms(50) / log_off.ms(50) - 1,
        "log_p99": log_on.ms(99) / log_off.ms(99) - 1,
        "log_landed": landed,
        "log_requests": len(log_on.samples),
    }
    return [*http, log_on, log_off, *floors, feast, reader, model, sqlite_read], breakdown


# ---------------------------------------------------------------- freshness


@dataclass
class Probe:
    """One new application: when it committed, and when it was landed and served."""

    application_id: int
    amount: float
    committed: float
    """`time.monotonic()` right after COMMIT returned."""
    committed_at: float
    """`time.time()` then (compared with the Delta log's commit times)."""
    lsn: int
    """`pg_current_wal_insert_lsn()` right after the commit: at or past its commit record."""
    landed: float | None = None
    """`time.time()` of the bronze commit that landed it."""
    visible: float | None = None


# Decided already (`loan_status` 0): `simulate` decides and withdraws (deletes) pending
# applications, and new ones are most of the pending, so a pending probe is often deleted
# before it is served. Its share of income matches the amount, so it passes the rules.
INSERT_PROBE = """
INSERT INTO {s}.loan_applications
    (applicant_id, loan_amnt, loan_intent, loan_int_rate, loan_percent_income, loan_status)
SELECT applicant_id, %(amount)s, 'EDUCATION', 10.5,
       round((%(amount)s / person_income)::numeric, 2), 0
FROM {s}.applicants WHERE applicant_id = %(applicant)s
RETURNING application_id
"""


def insert_probe(conn: Any, schema: str, applicant: int, amount: float) -> Probe | None:
    """Commit one application (its `applied_at` the default: now); None if no applicant.

    The connection is in autocommit: the INSERT's return is its COMMIT's.
    """
    from psycopg import sql

    query = sql.SQL(INSERT_PROBE).format(s=sql.Identifier(schema))
    row = conn.execute(query, {"amount": amount, "applicant": applicant}).fetchone()
    committed = time.monotonic()
    committed_at = time.time()
    if row is None:
        return None
    (lsn,) = conn.execute("SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint").fetchone()
    return Probe(int(row[0]), amount, committed, committed_at, int(lsn))


def eligible_applicants(storage: Any) -> list[int]:
    """Applicants in silver whose income keeps a small loan within the rules."""
    import polars as pl

    frame = pl.read_delta(storage.uri("silver", "applicants"), storage_options=storage.options)
    return frame.filter(pl.col("person_income") >= 20_000)["applicant_id"].to_list()


def poll_visible(store: Any, pending: list[Probe]) -> None:
    """One Feast read of every pending probe; stamp those that show their amount."""
    answer = store.get_online_features(
        features=["application_features:loan_amnt"],
        entity_rows=[{"application_id": p.application_id} for p in pending],
    ).to_dict()
    now = time.monotonic()
    for probe, amount in zip(pending, answer["loan_amnt"], strict=True):
        if amount == probe.amount:
            probe.visible = now


def stamp_landed(storage: Any, probes: list[Probe]) -> None:
    """Stamp each probe with the time of the first bronze commit that landed it.

    Read from the Delta log once the run is over: each commit of
    `bronze.loan_applications_changes` records the position landed (its progress mark)
    and its time (`commitInfo.timestamp`, milliseconds). Polling the position while the
    stream ran took 20-45 ms a read, half a core of this two-core machine at 50 ms
    intervals, and slowed what it measured.
    """
    from lakehouse.zones.commits import app_id
    from stream.changes import changes_table

    name = changes_table("loan_applications")
    mark = app_id("bronze", name)
    landings: list[tuple[int, float]] = []  # (position landed, commit time), in commit order
    version = 0
    while (raw := storage.commit_log("bronze", name, version)) is not None:
        at = flushed = None
        for line in raw.splitlines():
            action = json.loads(line)
            if "commitInfo" in action:
                at = action["commitInfo"]["timestamp"] / 1000
            txn = action.get("txn")
            if txn and txn.get("appId") == mark:
                flushed = int(txn["version"])
        if at is not None and flushed is not None:
            landings.append((flushed, at))
        version += 1
    for probe in probes:
        probe.landed = next((at for flushed, at in landings if flushed >= probe.lsn), None)


def wait_visible(
    store: Any, probes: list[Probe], lock: threading.Lock, until: Any, polls: list[float]
) -> None:
    """Poll Feast every 20 ms until `until()` and every probe is seen or timed out.

    `polls` keeps how long each poll took, the resolution of the measurement.
    """
    while True:
        now = time.monotonic()
        with lock:
            pending = [p for p in probes if p.visible is None and now - p.committed < PROBE_TIMEOUT]
        if pending:
            poll_visible(store, pending)
            polls.append(time.monotonic() - now)
        elif until():
            return
        time.sleep(POLL_EVERY)


def last_line(output: str, containing: str) -> str:
    return next((ln for ln in reversed(output.splitlines()) if containing in ln), "").strip()


class Service:
    """A `lakehouse` command running in the background, its output in a file."""

    def __init__(self, env: dict[str, str], scratch: Path, *args: str) -> None:
        self.args = args
        self.output = scratch / f"{'-'.join(args).replace('--', '')}.log"
        with self.output.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "lakehouse.cli", *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def check(self) -> None:
        if self.process.poll() is not None:
            tail = self.output.read_text()[-3000:]
            raise RuntimeError(f"lakehouse {' '.join(self.args)} exited early: {tail}")

    def stop(self) -> str:
        """SIGTERM (the stream lands what it holds first); return what it printed."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=120)
        return self.output.read_text()


def measure_freshness(
    settings: Any, storage: Any, env: dict[str, str], scratch: Path
) -> dict[str, Any]:
    """From a commit in Postgres to Feast serving it, under `simulate --rate 200` load."""
    import psycopg

    from lakehouse.source.schema import dsn as source_dsn

    lakehouse(env, "stream", "setup")
    applicants = eligible_applicants(storage)
    rng = random.Random(11)
    probes: list[Probe] = []
    lock = threading.Lock()
    stream = Service(env, scratch, "stream", "--promote")
    simulate = None
    polls: list[float] = []
    conn = psycopg.connect(source_dsn(settings), autocommit=True)
    try:
        store = reading_store(settings, storage)
        # Warm-up, not counted: the stream's first refresh opens Feast and the store.
        started = time.monotonic()
        warm = insert_probe(conn, settings.pg_schema, rng.choice(applicants), 999.25)
        assert warm is not None
        while warm.visible is None:
            stream.check()
            if time.monotonic() - started > 300:
                raise RuntimeError("the stream did not refresh the online store in 300 s")
            poll_visible(store, [warm])
            time.sleep(POLL_EVERY)
        warm_up = warm.visible - warm.committed
        duration = round(PROBES * PROBE_EVERY + 40)
        simulate = Service(
            env, scratch, "simulate", "--rate", str(SIMULATE_RATE), "--duration", str(duration)
        )
        time.sleep(3)  # the load first
        writer_done = threading.Event()

        def write() -> None:
            for i in range(PROBES):
                probe = insert_probe(conn, settings.pg_schema, rng.choice(applicants), 1000.25 + i)
                if probe is not None:
                    with lock:
                        probes.append(probe)
                time.sleep(PROBE_EVERY)
            writer_done.set()

        writer = threading.Thread(target=write)
        writer.start()
        wait_visible(store, probes, lock, writer_done.is_set, polls)
        writer.join()
        stream.check()
    finally:
        simulate_said = last_line(simulate.stop() if simulate else "", "wrote")
        stream_said = last_line(stream.stop(), "refreshed")
        conn.close()
    stamp_landed(storage, probes)
    visible = Latency(
        "served by Feast (ours)", [p.visible - p.committed for p in probes if p.visible]
    )
    landed = Latency(
        "landed in bronze (floor)", [p.landed - p.committed_at for p in probes if p.landed]
    )
    return {
        "probes": len(probes),
        "visible": visible,
        "landed": landed,
        "warm_up": warm_up,
        "poll_ms": percentile(polls, 50) * 1000,
        "simulate": simulate_said,
        "stream": stream_said,
        "duration": duration,
    }


# ---------------------------------------------------------------- `lakehouse demo`


def measure_demo() -> dict[str, Any]:
    """`lakehouse demo` in an empty folder on embedded defaults (a cold start)."""
    from lakehouse.settings import Settings
    from lakehouse.source.embedded import EmbeddedPostgres

    folder = Path(tempfile.mkdtemp(prefix="lakehouse-featbench-demo-", dir="/tmp"))
    try:
        child = run_child(child_env(None), PEAK_RSS, "demo", cwd=folder)
    finally:
        EmbeddedPostgres(Settings(home=folder / ".lakehouse")).destroy()
        shutil.rmtree(folder, ignore_errors=True)
    lines = child.stdout.splitlines()
    said = [ln.strip() for ln in lines if re.search(r"seeded|Postgres started|tasks ran in", ln)]
    tasks = [
        ln.strip().removeprefix("done").strip() for ln in lines if ln.strip().startswith("done ")
    ]
    said.append("tasks: " + ", ".join(tasks))
    return {
        "seconds": child.seconds,
        "peak_rss": child.peak_rss,
        "said": said,
        "load": os.getloadavg()[0],
    }


# ---------------------------------------------------------------- driver


def measure_materializations(
    result: SizeResult, settings: Any, home: Path, scratch: Path, *, feasts_own: bool
) -> None:
    """Feast's own first (its `apply` takes the registry), then ours into Postgres and
    SQLite; SQLite last, so the store the API and the stream use is the one left loaded."""
    result.startup = run_child(child_env(home), STARTUP).seconds
    if feasts_own:
        log(f"{result.rows:,} rows: Feast's own SQLite materialization")
        result.feasts_own = measure_feasts_own(child_env(home), scratch)
    for target in ("postgres", "sqlite"):
        log(f"{result.rows:,} rows: materialization into {target}, ours and the floor")
        result.materialize[target] = measure_ours_and_floor(
            replace(settings, feast_online_store=target),
            child_env(home, feast_online_store=target),
        )


def run_size(rows: int, *, requests: int, parts: set[str]) -> SizeResult:
    from lakehouse.settings import Settings
    from lakehouse.source.embedded import EmbeddedPostgres
    from lakehouse.storage import Storage

    result = SizeResult(rows)
    scratch = Path(tempfile.mkdtemp(prefix=f"lakehouse-featbench-{rows}-", dir="/tmp"))
    scratch.chmod(0o755)  # as root, the `postgres` OS user must traverse it
    home = scratch / "home"
    home.mkdir(mode=0o755)
    env = child_env(home)
    pg = EmbeddedPostgres(Settings(home=home), extra_options=FAST_PG)
    previous = os.environ.get("LAKEHOUSE_HOME")
    os.environ["LAKEHOUSE_HOME"] = str(home)  # Feast's yaml and definitions read it
    try:
        pg.start()
        log(f"{rows:,} rows: seeding and building gold")
        result.setup["seed"] = lakehouse(env, "seed", "--rows", str(rows))
        result.setup["pipeline"] = lakehouse(env, "run", "--no-ml")
        result.setup["apply"] = lakehouse(env, "features", "apply")
        settings = Settings.from_env(env)
        storage = Storage.from_settings(settings)
        if "historical" in parts:
            log(f"{rows:,} rows: historical retrieval")
            result.historical = measure_historical(settings, storage)
            result.load["historical"] = os.getloadavg()[0]
        if "materialize" in parts or {"latency", "freshness"} & parts:
            measure_materializations(result, settings, home, scratch, feasts_own="feast" in parts)
            result.load["materialization"] = os.getloadavg()[0]
        if "latency" in parts:
            log(f"{rows:,} rows: training, then online latency")
            result.setup["train"] = lakehouse(env, "train")
            result.latency, result.breakdown = measure_latency(settings, storage, env, requests)
            result.load["latency"] = os.getloadavg()[0]
        if "freshness" in parts:
            log(f"{rows:,} rows: freshness under `simulate --rate {SIMULATE_RATE}`")
            result.freshness = measure_freshness(settings, storage, env, scratch)
            result.load["freshness"] = os.getloadavg()[0]
    finally:
        pg.destroy()
        if previous is None:
            os.environ.pop("LAKEHOUSE_HOME", None)
        else:
            os.environ["LAKEHOUSE_HOME"] = previous
        shutil.rmtree(scratch, ignore_errors=True)
    return result


# ---------------------------------------------------------------- report


def git_state() -> str:
    """The checkout's commit, and whether `lakehouse/` or the benchmark has changes."""
    head = subprocess.run(
        ["git", "-C", str(ROOT), "log", "-1", "--format=%h %ad %s", "--date=short"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "lakehouse", "benchmarks/*.py"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return f"`{head or 'unknown'}`" + ("; with uncommitted changes: " + dirty if dirty else "")


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "?"


def historical_table(results: list[SizeResult]) -> list[str]:
    lines = [
        "## Historical retrieval",
        "",
        "| source rows | entity rows | Feast | DuckDB ASOF by hand | Feast / DuckDB | same rows |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        h = r.historical
        if h:
            lines.append(
                f"| {r.rows:,} | {h['entity_rows']:,} | {h['feast_seconds']:.2f} s | "
                f"{h['direct_seconds']:.2f} s | {h['feast_seconds'] / h['direct_seconds']:.1f}x | "
                f"{'yes' if h['same_rows'] else 'NO'} |"
            )
    return [*lines, ""]


def materialize_table(results: list[SizeResult]) -> list[str]:
    lines = [
        "## Materialization, first full load into an empty store",
        "",
        "| source rows | store | online rows (3 views) | values (JSON) | ours | of which "
        "start-up | ours peak RSS | floor: bulk load of the same rows | **ours / floor** "
        "| Feast's own SQLite | Feast's peak RSS | Feast / ours |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for target, m in r.materialize.items():
            own = r.feasts_own if target == "sqlite" else {}
            feast_cells = (
                f"{own['seconds']:.1f} s | {size(own['peak_rss'])} | "
                f"{own['seconds'] / m['ours_seconds']:.1f}x"
                if own
                else "- | - | -"
            )
            lines.append(
                f"| {r.rows:,} | {target} | {sum(m['rows'].values()):,} | {size(m['bytes'])} | "
                f"{m['ours_seconds']:.1f} s | {r.startup:.1f} s | {size(m['ours_peak_rss'])} | "
                f"{m['floor_seconds']:.2f} s | **{m['ours_seconds'] / m['floor_seconds']:.1f}x** | "
                f"{feast_cells} |"
            )
    lines += [
        "",
        "Ours: `lakehouse features materialize` in a child process, wall clock from start to "
        "exit (interpreter start, imports, `apply` of the registry, DuckDB over gold, "
        "encoding, the writes); peak RSS is the child's `ru_maxrss`. Floor: the rows ours "
        "wrote, read back first (not timed), inserted into empty tables of the same shape in "
        "the same database (SQLite: plain `executemany`, one transaction; Postgres: `COPY "
        "FROM STDIN` with `write_row`, one transaction). Feast's own: a child that applies "
        "the repository with `type: sqlite` and runs `FeatureStore.materialize`, wall clock "
        "likewise (one SQLite row per entity and feature). Start-up: a child that only "
        "imports the lakehouse's command line and Feast, as every such command does first.",
    ]
    for r in results:
        for target, m in r.materialize.items():
            per_view = ", ".join(f"{v} {n:,}" for v, n in m["rows"].items())
            lines.append(f"- {r.rows:,} rows, {target}: {per_view}")
        if r.feasts_own:
            own = r.feasts_own
            lines.append(
                f"- {r.rows:,} rows, Feast's own: `materialize` alone "
                f"{own['materialize_seconds']:.1f} s of the {own['seconds']:.1f} s; "
                f"{own['rows']:,} rows in its tables"
            )
    return [*lines, ""]


def latency_table(r: SizeResult, requests: int) -> list[str]:
    b = r.breakdown
    lines = [
        f"## Online latency at {r.rows:,} rows ({requests:,} requests per path)",
        "",
        "| path | p50 | p99 |",
        "|---|---:|---:|",
        *(f"| {lat.name} | {lat.cells(50, 99)} |" for lat in r.latency),
        "",
        f"`/predict` 1 client p99 / Feast in-process p99: **{b['ratio_p99']:.1f}x** "
        f"(target: within 3x); the plain ASGI floor's p99 alone is {b['floor_ratio_p99']:.1f}x. "
        f"The two were timed in {ROUNDS} turns of {requests // ROUNDS:,} requests each (after "
        f"{TURN_WARM_UP} untimed ones), so that load elsewhere on the machine falls on both.",
        "",
        f"Inference log (issue 17, target at most +10%): `/predict` with the log on against "
        f"off, two servers timed in turns ({LOG_SECONDS:.0f} s of requests each, "
        f"{b['log_requests']:,} on the logging one): p50 "
        f"**{b['log_p50']:+.1%}**, p99 "
        f"**{b['log_p99']:+.1%}**; the logging server landed all {b['log_landed']:,} "
        "predictions it answered in `bronze.predictions` (counted after its SIGTERM).",
        "",
        "One request at the median (1 client): "
        f"HTTP {b['http_p50']:.2f} ms = the API's read {b['reader_p50']:.2f} ms "
        f"+ model {b['model_p50']:.2f} ms + the rest (HTTP, parsing, validation, JSON) "
        f"{b['rest_p50']:.2f} ms, of which {b['floor_p50']:.2f} ms is the plain ASGI "
        "floor (uvicorn, HTTP, JSON, the client). Medians of separate samples, so the "
        "parts are estimates.",
    ]
    return [*lines, ""]


def freshness_table(r: SizeResult) -> list[str]:
    f = r.freshness
    visible, landed = f["visible"], f["landed"]

    def row(lat: Latency) -> str:
        return f"| {lat.name} | {len(lat.samples)} / {f['probes']} | {_seconds(lat)} |"

    lines = [
        f"## Freshness at {r.rows:,} rows, under `lakehouse simulate --rate {SIMULATE_RATE}`",
        "",
        "| from the commit in Postgres to | seen | p50 | p95 | p99 | max |",
        "|---|---:|---:|---:|---:|---:|",
        row(visible),
        row(landed),
        "",
    ]
    if visible.samples and landed.samples:
        ratios = [percentile(visible.samples, q) / percentile(landed.samples, q) for q in (50, 99)]
        lines.append(f"Online / landed in bronze: p50 {ratios[0]:.1f}x, p99 {ratios[1]:.1f}x.")
    lines += [
        "",
        f"`lakehouse stream setup`, then `lakehouse stream --promote` and `lakehouse simulate "
        f"--rate {SIMULATE_RATE} --duration {f['duration']}` (stopped when the probes were "
        f"done) in child processes. {f['probes']} probes, one every {PROBE_EVERY} s: one new "
        "application for an existing applicant, a unique `loan_amnt`, committed in "
        "autocommit; time taken right after the COMMIT returned. Online: Feast "
        "`get_online_features(['application_features:loan_amnt'])` in this process every "
        f"{POLL_EVERY * 1000:.0f} ms until it shows the amount. Floor: the time of the first "
        "commit of `bronze.loan_applications_changes` whose landed position (its progress "
        "mark) is at or past `pg_current_wal_insert_lsn()` taken right after the commit (at "
        "or past the commit record, so an upper bound by up to the next transaction "
        "landed), read from the Delta log after the run (`commitInfo.timestamp`, "
        "milliseconds). A probe not seen within "
        f"{PROBE_TIMEOUT:.0f} s is not counted. Warm-up (first probe, not counted, the "
        f"stream's first refresh opening Feast): {f['warm_up']:.1f} s. Resolution: a Feast "
        f"poll took {f['poll_ms']:.1f} ms at the median (stamped when it returned).",
        "",
        f"- simulate said: `{f['simulate']}`",
        f"- stream said, last: `{f['stream']}`",
    ]
    return [*lines, ""]


def _seconds(lat: Latency) -> str:
    if not lat.samples:
        return "- | - | - | -"
    return " | ".join(f"{percentile(lat.samples, q):.2f} s" for q in (50, 95, 99, 100))


def demo_table(demo: dict[str, Any]) -> list[str]:
    return [
        "## `lakehouse demo`, cold",
        "",
        "| wall clock | peak RSS |",
        "|---:|---:|",
        f"| {demo['seconds']:.1f} s | {size(demo['peak_rss'])} |",
        "",
        f"Machine load (1-minute average) after it: {demo['load']:.1f}.",
        "",
        "In an empty temporary folder, no `LAKEHOUSE_*` variable (embedded defaults: a new "
        "Postgres cluster, 45,000 rows, the pipeline with Feast, training and one "
        "prediction through the API). Peak RSS: the `lakehouse` process's `ru_maxrss` "
        "(Postgres not counted).",
        "",
        *(f"- {line}" for line in demo["said"]),
        "",
    ]


def report(
    results: list[SizeResult], demo: dict[str, Any] | None, command: str, requests: int
) -> str:
    lines = [
        f"# Feature store benchmark ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Command: `{command}`",
        "",
        f"Library at commit {git_state()}",
        "",
        f"- {os.cpu_count()} cores; Python {platform.python_version()}; "
        + ", ".join(
            f"{p} {_version(p)}"
            for p in ("feast", "duckdb", "deltalake", "polars", "psycopg", "fastapi", "uvicorn")
        ),
        "- Embedded PostgreSQL with fsync off; tables on local disk.",
        "",
    ]
    if any(r.historical for r in results):
        lines += historical_table(results)
    if any(r.materialize for r in results):
        lines += materialize_table(results)
    for r in results:
        if r.latency:
            lines += latency_table(r, requests)
        if r.freshness:
            lines += freshness_table(r)
    if demo:
        lines += demo_table(demo)
    for r in results:
        setup = ", ".join(f"{k} {v:.1f} s" for k, v in r.setup.items())
        load = ", ".join(f"{k} {v:.1f}" for k, v in r.load.items())
        lines.append(f"- {r.rows:,} rows, set-up (not measured): {setup}")
        lines.append(f"- {r.rows:,} rows, machine load (1-minute average) after each part: {load}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows",
        type=lambda s: [int(x) for x in s.split(",")],
        default=list(DEFAULT_ROWS),
        help="source sizes, comma separated (feast, latency, freshness: the smallest only)",
    )
    parser.add_argument("--requests", type=int, default=2000, help="requests per latency run")
    parser.add_argument(
        "--skip",
        type=lambda s: set(s.split(",")),
        default=set(),
        help=f"parts to leave out, comma separated, of: {', '.join(PARTS)}",
    )
    parser.add_argument("--demo", action="store_true", help="also time `lakehouse demo`, cold")
    args = parser.parse_args(argv)
    if args.skip - set(PARTS):
        parser.error(f"--skip takes {', '.join(PARTS)}")
    results = []
    for rows in args.rows:
        parts = set(PARTS) - args.skip
        if rows != min(args.rows):
            parts -= set(SMALLEST_ONLY)
        results.append(run_size(rows, requests=args.requests, parts=parts))
    demo = None
    if args.demo:
        log("`lakehouse demo` in an empty folder")
        demo = measure_demo()
    command = "python benchmarks/features.py " + " ".join(argv or sys.argv[1:])
    text = report(results, demo, command.strip(), args.requests)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"features-{datetime.now(UTC):%Y%m%d-%H%M%S}.md"
    path.write_text(text)
    print(text)
    log(f"report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
