"""CDC benchmark: our Bytewax stream into Delta against `pg_recvlogical` on the same WAL.

Run by hand (a few minutes)::

    .venv/bin/python benchmarks/cdc.py
    .venv/bin/python benchmarks/cdc.py --inserts 200000 --updates 40000 --deletes 10000

(a) **Backlog throughput.** A fresh embedded Postgres is seeded with 1,000 rows and the
stream is set up (`lakehouse stream setup`); a second pgoutput slot on the same
publication is created for `pg_recvlogical`. Then, with nothing consuming, the backlog
is committed: 1M inserts, 200k updates, 50k deletes of `applicants` (transactions of
10k rows). Then, in this one run: `pg_recvlogical` reads its slot to `/dev/null` up to
the end of the backlog (the ceiling: no decoding, no storage), and our flow lands its
slot in `bronze.applicants_changes` (decode, type, Delta commits). Ratio = our
changes/s / pg_recvlogical's changes/s.

(b) **Freshness.** Under steady `lakehouse simulate` load at 1k and 10k changes/s, each
change's latency is the time from its source commit (`_commit_ts`) to the end of the
Delta commit that made it visible in bronze (and, with `--promote`, to the end of the
silver merge that followed). Reported as p50/p99.

Results are printed and written to `benchmarks/results/cdc-<timestamp>.md`.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import polars as pl
import psycopg
from psycopg.conninfo import conninfo_to_dict

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lakehouse.settings import Secret, Settings  # noqa: E402
from lakehouse.source import schema  # noqa: E402
from lakehouse.source.embedded import EmbeddedPostgres  # noqa: E402
from lakehouse.source.seed import seed  # noqa: E402
from lakehouse.source.simulate import simulate  # noqa: E402
from lakehouse.storage import Storage  # noqa: E402
from stream import cdc, changes, setup, speed  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TABLES = ("applicants", "loan_applications")


def say(text: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {text}", flush=True)


def lsn_now(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint").fetchone()
    assert row is not None
    return int(row[0])


def fresh(root: Path, name: str) -> tuple[EmbeddedPostgres, Settings]:
    home = root / name
    home.mkdir(parents=True)
    home.chmod(0o755)
    pg = EmbeddedPostgres(
        Settings(home=home),
        extra_options={"fsync": "off", "synchronous_commit": "off", "max_wal_size": "4GB"},
    )
    pg.start()
    settings = Settings(
        home=home, storage_uri=str(home / "warehouse"), pg_dsn=Secret(pg.dsn()), seed=3
    )
    with schema.connect(settings) as conn:
        seed(conn, settings.pg_schema, rows=1000, seed=3)
        conn.commit()
    Storage.from_settings(settings).check()
    return pg, settings


def run_flow_until(settings: Settings, storage: Storage, end: int, *, promote: bool) -> float:
    """Run the flow in this process until every table has landed `end`; return seconds."""
    cdc.STOP.clear()
    started = time.perf_counter()
    took: list[float] = []

    def watch() -> None:
        while not cdc.STOP.is_set():
            if all(changes.progress(storage, t).flushed >= end for t in ("applicants",)):
                took.append(time.perf_counter() - started)
                cdc.STOP.set()
                return
            time.sleep(0.05)

    thread = threading.Thread(target=watch)
    thread.start()
    from bytewax.testing import run_main

    run_main(cdc.build_flow(settings, ["applicants"], promote=promote))
    thread.join()
    return took[0]


def backlog(root: Path, inserts: int, updates: int, deletes: int) -> list[str]:
    pg, settings = fresh(root, "backlog")
    settings = replace(settings, stream_batch_rows=100_000, stream_batch_seconds=1.0)
    storage = Storage.from_settings(settings)
    s = settings.pg_schema
    try:
        setup.setup(settings, storage)
        pub = changes.slot_name(s, "applicants")
        with schema.connect(settings, autocommit=True) as conn:
            conn.execute("SELECT pg_create_logical_replication_slot('bench_recv', 'pgoutput')")
            say(
                f"writing the backlog: {inserts:,} inserts, {updates:,} updates, "
                f"{deletes:,} deletes"
            )
            cols = (
                "person_age, person_gender, person_education, person_income, person_emp_exp, "
                "person_home_ownership, cb_person_cred_hist_length, credit_score, "
                "previous_loan_defaults_on_file"
            )
            first = 10_000_000
            step = 10_000
            for lo in range(0, inserts, step):
                conn.execute(
                    f'INSERT INTO "{s}".applicants (applicant_id, {cols}) '
                    "SELECT g, 30, 'female', 'Master', 50000 + g %% 1000, 5, 'RENT', 4, 650, 'No' "
                    "FROM generate_series(%s::bigint, %s::bigint) g",
                    (first + lo, first + min(lo + step, inserts) - 1),
                )
            for lo in range(0, updates, step):
                conn.execute(
                    f'UPDATE "{s}".applicants SET credit_score = credit_score + 1 '
                    "WHERE applicant_id BETWEEN %s AND %s",
                    (first + lo, first + min(lo + step, updates) - 1),
                )
            for lo in range(0, deletes, step):
                conn.execute(
                    f'DELETE FROM "{s}".applicants WHERE applicant_id BETWEEN %s AND %s',
                    (
                        first + inserts - deletes + lo,
                        first + inserts - deletes + min(lo + step, deletes) - 1,
                    ),
                )
            end = lsn_now(conn)
        total = inserts + updates + deletes
        info = conninfo_to_dict(settings.pg_dsn.get())
        password = str(info.pop("password", ""))
        conn_str = " ".join(f"{k}={v}" for k, v in info.items() if k != "sslmode")
        recv = Path(settings.pg_bin or "/usr/lib/postgresql/15/bin") / "pg_recvlogical"
        end_text = f"{end >> 32:X}/{end & 0xFFFFFFFF:X}"
        say("pg_recvlogical to /dev/null ...")
        started = time.perf_counter()
        subprocess.run(
            [
                str(recv),
                "-d",
                conn_str,
                "--slot",
                "bench_recv",
                "--start",
                "--no-loop",
                "-o",
                "proto_version=1",
                "-o",
                f"publication_names={pub}",
                "-E",
                end_text,
                "-f",
                "/dev/null",
            ],
            env={**os.environ, "PGPASSWORD": password},
            check=True,
        )
        recv_s = time.perf_counter() - started
        say(f"pg_recvlogical: {recv_s:.1f}s")
        say("ours into bronze ...")
        ours_s = run_flow_until(settings, storage, end, promote=False)
        landed = (
            pl.scan_delta(storage.uri("bronze", "applicants_changes"))
            .select(pl.len())
            .collect()
            .item()
        )
        say(f"ours: {ours_s:.1f}s, {landed:,} changes landed")
        commits = storage.table("bronze", "applicants_changes").version()
        ratio = (total / ours_s) / (total / recv_s)
        return [
            "## (a) Backlog throughput",
            "",
            f"Backlog: {inserts:,} inserts + {updates:,} updates + {deletes:,} deletes of "
            f"`applicants` = {total:,} changes, committed in transactions of 10k rows "
            "before either reader started. Both read their own pgoutput slot on the same "
            "publication from the same starting point.",
            "",
            "| reader | seconds | changes/s | vs pg_recvlogical |",
            "|---|---:|---:|---:|",
            f"| `pg_recvlogical` to /dev/null (ceiling) | {recv_s:.1f} "
            f"| {total / recv_s:,.0f} | 1.00 |",
            f"| ours: Bytewax -> `bronze.applicants_changes` (Delta) | {ours_s:.1f} "
            f"| {total / ours_s:,.0f} | **{ratio:.2f}** |",
            "",
            f"Ours landed {landed:,} change rows (expected {total:,}) in {commits} Delta "
            f"commits (micro-batches of up to {settings.stream_batch_rows:,} changes).",
            "",
        ]
    finally:
        pg.destroy()


def freshness(root: Path, rates: list[int], seconds: float) -> list[str]:
    pg, settings = fresh(root, "freshness")
    storage = Storage.from_settings(settings)
    lines = [
        "## (b) Freshness under steady load",
        "",
        f"`lakehouse simulate` at a fixed rate for {seconds:.0f} s per row (default "
        f"micro-batch settings: close after {settings.stream_quiet_seconds:g} s while the"
        f" stream keeps up, {settings.stream_batch_seconds:g} s under a backlog, or"
        f" {settings.stream_batch_rows:,} changes). Latency = end of the Delta commit "
        "(or of the silver merge) minus the change's source commit time. *Commits/s*: Delta"
        " commits of both change tables per second of the bronze-only run (each is a"
        " small file until `lakehouse maintain`).",
        "",
        "| load (changes/s asked) | achieved | landed | bronze p50 | bronze p99 "
        "| commits/s | silver p50 | silver p99 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    try:
        setup.setup(settings, storage)
        for rate in rates:
            for promote in (False, True):
                before = _commits(storage)
                bronze_lat, silver_lat, achieved, landed = _freshness_run(
                    settings, storage, rate, seconds, promote=promote
                )
                if not promote:
                    per_s = (_commits(storage) - before) / seconds
                    row = [f"{rate:,}", f"{achieved:,.0f}", f"{landed:,}", *_pcts(bronze_lat)]
                    row.append(f"{per_s:.1f}")
                else:
                    row += _pcts(silver_lat)
                    lines.append("| " + " | ".join(row) + " |")
                say(
                    f"rate {rate}, promote={promote}: achieved {achieved:,.0f}/s, "
                    f"bronze {_pcts(bronze_lat)}, silver {_pcts(silver_lat)}"
                )
        lines.append("")
        return lines
    finally:
        pg.destroy()


def _commits(storage: Storage) -> int:
    """Return the Delta commits of both change tables so far."""
    tables = [storage.table_or_none("bronze", changes.changes_table(t)) for t in TABLES]
    return sum(dt.version() + 1 for dt in tables if dt is not None)


def freshness_floor(root: Path, n: int) -> list[str]:
    """One row from a Postgres commit to a Delta commit on an idle system: floor and ours.

    Floor: a row is updated and committed; `pg_recvlogical` (test_decoding, to a pipe)
    prints its COMMIT; a one-row `write_deltalake` append to a local table follows. The
    latency is the end of that append minus the moment the source commit returned. Ours:
    the flow running (no `--promote`), the same one-row transactions 0.3 s apart; the
    latency is the end of the Delta commit that made each visible minus its commit time.
    """
    from deltalake import write_deltalake

    pg, settings = fresh(root, "floor")
    storage = Storage.from_settings(settings)
    s = settings.pg_schema
    latencies: list[float] = []
    try:
        with schema.connect(settings, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_create_logical_replication_slot('bench_floor', 'test_decoding')"
            )
        info = conninfo_to_dict(settings.pg_dsn.get())
        password = str(info.pop("password", ""))
        conn_str = " ".join(f"{k}={v}" for k, v in info.items() if k != "sslmode")
        recv = Path(settings.pg_bin or "/usr/lib/postgresql/15/bin") / "pg_recvlogical"
        reader = subprocess.Popen(
            [str(recv), "-d", conn_str, "--slot", "bench_floor", "--start", "-f", "-"],
            env={**os.environ, "PGPASSWORD": password},
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        target = str(root / "floor-delta")
        one = pl.DataFrame({"applicant_id": [0], "credit_score": [0]}).to_arrow()
        write_deltalake(target, one, mode="append")  # the table exists before timing
        try:
            assert reader.stdout is not None
            with schema.connect(settings, autocommit=True) as conn:
                for i in range(n):
                    conn.execute(
                        f'UPDATE "{s}".applicants SET credit_score = credit_score'
                        " WHERE applicant_id = %s",
                        (i % 900 + 1,),
                    )
                    committed = time.time()
                    for line in reader.stdout:
                        if line.startswith("COMMIT"):
                            break
                    write_deltalake(target, one, mode="append")
                    latencies.append(time.time() - committed)
                    time.sleep(0.3)
        finally:
            reader.terminate()
            reader.wait()
        setup.setup(settings, storage)
        ours, _, _, landed = _freshness_run(settings, storage, 0, 0.0, promote=False, single=n)
    finally:
        pg.destroy()
    floor_p, ours_p = _pcts(latencies), _pcts(ours)
    return [
        "## (c) Freshness floor: one row on an idle system",
        "",
        f"{n} one-row transactions 0.3 s apart. Floor: `pg_recvlogical` (test_decoding) to a"
        " pipe, then a one-row `write_deltalake` append; ours: the flow (bronze, no"
        " `--promote`). Latency from the source commit to the end of the Delta commit.",
        "",
        "| reader | changes | p50 | p99 |",
        "|---|---:|---:|---:|",
        f"| floor: pg_recvlogical + one-row Delta append | {len(latencies)} | {floor_p[0]}"
        f" | {floor_p[1]} |",
        f"| ours: Bytewax -> bronze | {landed} | {ours_p[0]} | {ours_p[1]} |",
        "",
    ]


def _pcts(values: list[float]) -> list[str]:
    if not values:
        return ["-", "-"]
    s = pl.Series(values)
    return [f"{s.quantile(0.5):.2f} s", f"{s.quantile(0.99):.2f} s"]


def _freshness_run(
    settings: Settings,
    storage: Storage,
    rate: int,
    seconds: float,
    *,
    promote: bool,
    single: int = 0,
) -> tuple[list[float], list[float], float, int]:
    """Run the flow under load; return bronze and silver latencies, rate, changes landed.

    With `single`, the load is that many one-row transactions 0.3 s apart (an idle
    system's freshness, beside the floor) instead of `simulate` at `rate`.
    """
    bronze_lat: list[float] = []
    silver_lat: list[float] = []
    pending: list[list[float]] = []
    real_write = changes.write
    real_promote = speed._promote

    def timed_write(
        storage_: Storage,
        batch: changes.ChangeBatch,
        previous: changes.Progress,
        kept: changes.KeptTables | None = None,
    ) -> changes.Progress:
        done = real_write(storage_, batch, previous, kept)
        now = time.time()
        ts = [now - t / 1e6 for t in batch.commit_ts]
        bronze_lat.extend(ts)
        pending.append([t / 1e6 for t in batch.commit_ts])
        return done

    def timed_promote(storage_: Storage) -> None:
        # Only batches landed before this promotion started are promoted by it (it runs
        # in the stream's speed-layer thread while the sinks go on landing).
        ready = len(pending)
        real_promote(storage_)
        now = time.time()
        for _ in range(ready):
            silver_lat.extend(now - t for t in pending.pop(0))

    changes.write = timed_write  # type: ignore[assignment]
    speed._promote = timed_promote  # type: ignore[assignment]
    result: dict[str, float] = {}

    def load() -> None:
        with schema.connect(settings, autocommit=True) as conn:
            time.sleep(2)  # let the flow connect first
            if single:
                started = time.perf_counter()
                for i in range(single):
                    conn.execute(
                        f'UPDATE "{settings.pg_schema}".applicants'
                        " SET credit_score = credit_score WHERE applicant_id = %s",
                        (i % 900 + 1,),
                    )
                    time.sleep(0.3)
                result["achieved"] = single / (time.perf_counter() - started)
                result["end"] = lsn_now(conn)
                return
            batch = max(1, rate // 100)  # ~100 transactions a second
            sim = simulate(
                conn,
                settings.pg_schema,
                rate=rate,
                duration=seconds,
                batch_size=batch,
                seed=int(rate),
            )
            result["achieved"] = sim.total / sim.seconds
            result["end"] = lsn_now(conn)

    try:
        thread = threading.Thread(target=load)
        thread.start()
        cdc.STOP.clear()
        from bytewax.testing import run_main

        def stopper() -> None:
            thread.join()
            end = int(result.get("end", 0))
            while not all(
                changes.progress(storage, t).flushed >= end
                for t in ("applicants", "loan_applications")
            ):
                time.sleep(0.05)
            time.sleep(0.5)
            cdc.STOP.set()

        stop_thread = threading.Thread(target=stopper)
        stop_thread.start()
        run_main(cdc.build_flow(settings, promote=promote))
        stop_thread.join()
    finally:
        changes.write = real_write  # type: ignore[assignment]
        speed._promote = real_promote  # type: ignore[assignment]
    return bronze_lat, silver_lat, result.get("achieved", 0.0), len(bronze_lat)


def machine() -> list[str]:
    versions = ", ".join(
        f"{p} {metadata.version(p)}" for p in ("bytewax", "deltalake", "polars", "psycopg")
    )
    return [
        f"- CPU: {platform.processor() or platform.machine()}; {os.cpu_count()} cores",
        f"- OS: {platform.platform()}; Python {platform.python_version()}; {versions}",
        "- PostgreSQL 15 (embedded, fsync off), tables on local disk",
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inserts", type=int, default=1_000_000)
    parser.add_argument("--updates", type=int, default=200_000)
    parser.add_argument("--deletes", type=int, default=50_000)
    parser.add_argument("--rates", default="1000,10000")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--skip-freshness", action="store_true")
    parser.add_argument("--skip-backlog", action="store_true")
    parser.add_argument("--floor-rows", type=int, default=50, help="one-row commits, (c)")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lakehouse-cdc-bench-"))
    root.chmod(0o755)
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"], capture_output=True, text=True
    ).stdout.strip()
    report = [
        f"# CDC benchmark ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"Command: `python benchmarks/cdc.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"Library: {commit}",
        "",
        *machine(),
        "",
    ]
    try:
        if not args.skip_backlog:
            report += backlog(root, args.inserts, args.updates, args.deletes)
        if not args.skip_freshness:
            report += freshness(root, [int(r) for r in args.rates.split(",")], args.seconds)
            report += freshness_floor(root, args.floor_rows)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    text = "\n".join(report) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"cdc-{datetime.now(UTC):%Y%m%d-%H%M%S}.md"
    out.write_text(text)
    print(text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
