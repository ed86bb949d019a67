"""Feature store and serving benchmark: Feast over gold, and the prediction API.

Run by hand (a few minutes; 1M rows takes longer)::

    .venv/bin/python benchmarks/features.py                  # 45k and 1M rows
    .venv/bin/python benchmarks/features.py --rows 45000 --requests 1000

For each source size N, under a temporary home with an embedded Postgres (fsync off):
`lakehouse seed --rows N`, `lakehouse run --no-ml`, `lakehouse features apply`. Then:

1. **Historical retrieval**: Feast `get_historical_features` for every decided
   application at its `applied_at` (N entity rows), through the feature service
   `loan_approval_v1`, to a pandas frame. Baseline in the same run: the same point-in-time
   join written by hand as one DuckDB `ASOF JOIN` over the gold Delta table, to pandas.
   Both results are checked to have the same rows.
2. **Materialization**: Feast `materialize` of every feature view into SQLite (first,
   full load), with the lakehouse's online store (Feast's SQLite store, batched writes)
   and with Feast's own SQLite writer, each into an empty file. Floor in the same run:
   the same latest rows read from gold with DuckDB and inserted into plain SQLite tables
   shaped like Feast's (one row per entity and feature) with `executemany`.
3. **Online latency** (the smallest size only): `lakehouse train`, then `lakehouse serve`
   in its own process; `POST /predict {"application_id": ...}` for random decided
   applications over keep-alive HTTP, with 1 client, then 32 concurrent clients (threads
   of this process: on 2 cores they share the CPU with the server), then 32 clients
   against `lakehouse serve --workers 2`. Floors: Feast
   `get_online_features` in process for the same service and entity, and a bare SQLite
   `SELECT` of the entity's rows in Feast's online table (no decoding).

Ratios are computed within one run (the machine is noisy). The Markdown report is printed
and written to `benchmarks/results/features-<timestamp>.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results"
DEFAULT_ROWS = (45_000, 1_000_000)
FAST_PG = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
CLIENTS = (1, 32)


def log(message: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def lakehouse(env: dict[str, str], *args: str) -> float:
    """Run one `lakehouse` command; return its wall time."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "lakehouse.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"lakehouse {' '.join(args)} failed: {done.stderr[-2000:]}")
    return time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


@dataclass
class Latency:
    name: str
    samples: list[float] = field(default_factory=list)

    def summary(self) -> str:
        ms = [s * 1000 for s in self.samples]
        return (
            f"{percentile(ms, 50):.2f} / {percentile(ms, 99):.2f} ms "
            f"(mean {statistics.fmean(ms):.2f}, n={len(ms)})"
        )


@dataclass
class SizeResult:
    rows: int
    setup: dict[str, float] = field(default_factory=dict)
    historical: dict[str, Any] = field(default_factory=dict)
    materialize: dict[str, Any] = field(default_factory=dict)
    latency: list[Latency] = field(default_factory=list)


# ---------------------------------------------------------------- measurements


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


def _materialize_with_feasts_writer(store: Any, scratch: Path) -> float:
    """Feast's stock SQLite online store, into an empty file of its own: seconds."""
    from feast import FeatureStore

    from lakehouse.ml import features

    yaml = (features.repo_path() / "feature_store.yaml").read_text()
    stock_yaml = scratch / "stock.yaml"
    stock_yaml.write_text(
        yaml.replace(
            "type: lakehouse.ml.feast_online.BatchSqliteOnlineStore", "type: sqlite"
        ).replace("${LAKEHOUSE_HOME}/feast/online_store.db", str(scratch / "stock.db"))
    )
    stock = FeatureStore(fs_yaml_file=stock_yaml)
    assert stock.config.online_store.type == "sqlite"
    features.apply(stock)  # creates its tables (not timed)
    start = time.perf_counter()
    features.materialize(stock)
    seconds = time.perf_counter() - start
    features.apply(store)  # the registry's infrastructure back to the lakehouse's store
    return seconds


def measure_materialize(
    settings: Any, storage: Any, scratch: Path, *, stock: bool
) -> dict[str, Any]:
    """Full materialization into SQLite: ours (Feast with batched writes), Feast's own
    SQLite writer (when `stock`), and a bare SQLite load of the same rows as the floor."""
    from lakehouse import duck
    from lakehouse.ml import features

    store = features.feature_store(settings, storage)
    start = time.perf_counter()
    features.materialize(store)
    ours_seconds = time.perf_counter() - start
    stock_seconds = _materialize_with_feasts_writer(store, scratch) if stock else None

    # The floor: the latest row per entity of each view's table, one SQLite row per
    # (entity, feature) in a table shaped like Feast's (primary key and entity index),
    # with executemany; values as JSON instead of protobuf.
    con = duck.connect(settings, storage)
    target = sqlite3.connect(scratch / "floor.db")
    written = 0
    start = time.perf_counter()
    try:
        for view in features.FEATURE_VIEWS:
            definition = store.get_feature_view(view)
            key = definition.join_keys[0]
            table = definition.batch_source.path.rstrip("/").rsplit("/", 1)[-1]
            target.execute(
                f"CREATE TABLE {view} (entity_key BLOB, feature_name TEXT, value BLOB, "
                "event_ts INTEGER, PRIMARY KEY (entity_key, feature_name))"
            )
            target.execute(f"CREATE INDEX {view}_ek ON {view} (entity_key)")
            fields = [f.name for f in definition.features]
            latest = con.execute(
                f"SELECT {duck.quote(key)}, epoch(event_timestamp)::BIGINT, "
                + ", ".join(duck.quote(f) for f in fields)
                + f" FROM {duck.scan(storage.uri('gold', table))} "
                + f"QUALIFY row_number() OVER (PARTITION BY {duck.quote(key)} "
                + "ORDER BY event_timestamp DESC) = 1"
            ).fetchall()
            rows = [
                (str(r[0]).encode(), name, json.dumps(r[i + 2], default=str).encode(), r[1])
                for r in latest
                for i, name in enumerate(fields)
            ]
            target.executemany(f"INSERT OR REPLACE INTO {view} VALUES (?, ?, ?, ?)", rows)
            written += len(latest)
        target.commit()
    finally:
        con.close()
        target.close()
    floor_seconds = time.perf_counter() - start
    return {
        "ours_seconds": ours_seconds,
        "stock_seconds": stock_seconds,
        "floor_seconds": floor_seconds,
        "entities": written,
    }


def _serve_and_measure(
    env: dict[str, str],
    ids: list[int],
    rng: random.Random,
    requests: int,
    workers: int,
    client_counts: tuple[int, ...],
) -> list[Latency]:
    """Start `lakehouse serve --workers N` and time `/predict` for each client count."""
    import httpx

    from lakehouse.source.embedded import free_port

    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lakehouse.cli",
            "serve",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    results = []
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("the API did not start")
            time.sleep(0.2)

        def client_run(n: int, out: list[float]) -> None:
            with httpx.Client(base_url=url, timeout=30) as client:
                for _ in range(n):
                    body = {"application_id": rng.choice(ids)}
                    start = time.perf_counter()
                    answer = client.post("/predict", json=body)
                    out.append(time.perf_counter() - start)
                    if answer.status_code != 200:
                        raise RuntimeError(f"/predict answered {answer.status_code}")

        # Each worker process loads its model on first use: warm them all, concurrently
        # (connections are spread over the workers by the kernel).
        warm: list[float] = []
        warmers = [
            threading.Thread(target=client_run, args=(100, warm)) for _ in range(2 * workers)
        ]
        for t in warmers:
            t.start()
        for t in warmers:
            t.join()
        for clients in client_counts:
            samples: list[float] = []
            per_client = max(1, requests // clients) if clients > 1 else requests
            threads = [
                threading.Thread(target=client_run, args=(per_client, samples))
                for _ in range(clients)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            name = f"POST /predict, {clients} client(s), HTTP"
            if workers > 1:
                name += f", serve --workers {workers}"
            results.append(Latency(name, samples))
    finally:
        server.terminate()
        server.wait(timeout=30)
    return results


def measure_latency(
    settings: Any, storage: Any, env: dict[str, str], requests: int
) -> list[Latency]:
    """`/predict` over HTTP with 1 and 32 clients; Feast and SQLite reads as floors."""
    import polars as pl
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    from lakehouse.ml import features

    ids = (
        pl.read_delta(storage.uri("silver", "loan_applications"), storage_options=storage.options)
        .filter(pl.col("loan_status").is_not_null())["application_id"]
        .to_list()
    )
    rng = random.Random(7)
    results = []
    # One server process with 1 and 32 clients, then `--workers 2` with 32 clients.
    for workers, client_counts in ((1, CLIENTS), (2, (max(CLIENTS),))):
        results += _serve_and_measure(env, ids, rng, requests, workers, client_counts)

    store = features.feature_store(settings, storage)
    service = store.get_feature_service(features.SERVICE)
    feast_floor = Latency("Feast get_online_features (in process, same service)")
    for _ in range(requests):
        entity = {"application_id": rng.choice(ids)}
        start = time.perf_counter()
        store.get_online_features(features=service, entity_rows=[entity]).to_dict()
        feast_floor.samples.append(time.perf_counter() - start)

    online = sqlite3.connect(settings.home / "feast" / "online_store.db")
    table = "lakehouse_application_features"
    sqlite_floor = Latency("SQLite SELECT of the entity's rows (no decoding)")
    for _ in range(requests):
        key = serialize_entity_key(
            EntityKey(
                join_keys=["application_id"],
                entity_values=[Value(int64_val=rng.choice(ids))],
            ),
            entity_key_serialization_version=3,
        )
        start = time.perf_counter()
        found = online.execute(
            f"SELECT feature_name, value FROM {table} WHERE entity_key = ?", (key,)
        ).fetchall()
        sqlite_floor.samples.append(time.perf_counter() - start)
        if not found:
            raise RuntimeError("the SQLite floor found no row: wrong table or key")
    online.close()
    return [*results, feast_floor, sqlite_floor]


# ---------------------------------------------------------------- driver


def run_size(rows: int, *, requests: int, latency: bool) -> SizeResult:
    from lakehouse.settings import Settings
    from lakehouse.source.embedded import EmbeddedPostgres
    from lakehouse.storage import Storage

    result = SizeResult(rows)
    scratch = Path(tempfile.mkdtemp(prefix=f"lakehouse-featbench-{rows}-", dir="/tmp"))
    scratch.chmod(0o755)  # as root, the `postgres` OS user must traverse it
    home = scratch / "home"
    home.mkdir(mode=0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKEHOUSE_")}
    env["LAKEHOUSE_HOME"] = str(home)
    pg = EmbeddedPostgres(Settings(home=home), extra_options=FAST_PG)
    previous = {k: os.environ.get(k) for k in ("LAKEHOUSE_HOME",)}
    os.environ["LAKEHOUSE_HOME"] = str(home)
    try:
        pg.start()
        log(f"{rows:,} rows: seeding and building gold")
        result.setup["seed"] = lakehouse(env, "seed", "--rows", str(rows))
        result.setup["pipeline"] = lakehouse(env, "run", "--no-ml")
        result.setup["apply"] = lakehouse(env, "features", "apply")
        settings = Settings.from_env(env)
        storage = Storage.from_settings(settings)
        log(f"{rows:,} rows: historical retrieval")
        result.historical = measure_historical(settings, storage)
        log(f"{rows:,} rows: materialization")
        # Feast's own writer is measured at the smallest size only (at 1M it takes many
        # minutes); ours and the floor at every size.
        result.materialize = measure_materialize(settings, storage, scratch, stock=latency)
        if latency:
            log(f"{rows:,} rows: training, then online latency")
            result.setup["train"] = lakehouse(env, "train")
            result.latency = measure_latency(settings, storage, env, requests)
    finally:
        pg.stop()
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(scratch, ignore_errors=True)
    return result


def report(results: list[SizeResult], command: str) -> str:
    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "?"

    head = subprocess.run(
        ["git", "-C", str(HERE.parent), "log", "-1", "--format=%h %ad"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    lines = [
        f"# Feature store benchmark ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Command: `{command}`; library at {head}",
        "",
        f"- {os.cpu_count()} cores; Python {platform.python_version()}; "
        + ", ".join(
            f"{p} {version(p)}" for p in ("feast", "duckdb", "deltalake", "fastapi", "uvicorn")
        ),
        "",
        "| rows (N) | entity rows | Feast historical | DuckDB ASOF by hand | ratio | same rows "
        "| materialize: ours | Feast's SQLite writer | bare SQLite load | ours / floor |",
        "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        h, m = r.historical, r.materialize
        lines.append(
            f"| {r.rows:,} | {h['entity_rows']:,} | {h['feast_seconds']:.2f} s | "
            f"{h['direct_seconds']:.2f} s | {h['feast_seconds'] / h['direct_seconds']:.1f}x | "
            f"{'yes' if h['same_rows'] else 'NO'} | {m['ours_seconds']:.1f} s | "
            f"{'-' if m['stock_seconds'] is None else format(m['stock_seconds'], '.1f') + ' s'} | "
            f"{m['floor_seconds']:.1f} s | "
            f"{m['ours_seconds'] / m['floor_seconds']:.1f}x |"
        )
    lines += [
        "",
        "Ratios: Feast time / baseline time (above 1: Feast slower). Materialization: every",
        "feature view, first load into an empty store; ours is Feast with the lakehouse's",
        "batched SQLite writer (`lakehouse.ml.feast_online`).",
        "",
    ]
    for r in results:
        if not r.latency:
            continue
        lines += [
            f"Online latency at {r.rows:,} rows (p50 / p99):",
            "",
            "| path | p50 / p99 |",
            "|---|---|",
        ]
        lines += [f"| {lat.name} | {lat.summary()} |" for lat in r.latency]
        lines.append("")
    for r in results:
        setup = ", ".join(f"{k} {v:.1f} s" for k, v in r.setup.items())
        lines.append(f"- {r.rows:,} rows, setup (not measured): {setup}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--rows",
        type=lambda s: [int(x) for x in s.split(",")],
        default=list(DEFAULT_ROWS),
        help="source sizes, comma separated (latency is measured at the first)",
    )
    parser.add_argument("--requests", type=int, default=2000, help="requests per latency run")
    args = parser.parse_args(argv)
    results = []
    for i, rows in enumerate(args.rows):
        results.append(run_size(rows, requests=args.requests, latency=i == 0))
    text = report(results, "python benchmarks/features.py " + " ".join(argv or sys.argv[1:]))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"features-{datetime.now(UTC):%Y%m%d-%H%M%S}.md"
    path.write_text(text)
    print(text)
    log(f"report written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
