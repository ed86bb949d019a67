"""Batch pipeline benchmark: our Postgres -> bronze -> silver -> gold against PySpark.

Run by hand (it takes minutes; 10M rows takes tens of minutes)::

    .venv/bin/pip install -e '.[bench]'        # pyspark and psutil
    .venv/bin/python benchmarks/batch.py --rows 45000,1000000
    .venv/bin/python benchmarks/batch.py        # 45k, 1M and 10M rows (the default)
    .venv/bin/python benchmarks/batch.py --rows 1M --skip-spark --compare d2773bc

With `--compare REV[,REV]`, ours also runs at each of those commits (their own worker and
library, from a temporary git worktree), in turns with this checkout on the same seeded
source: a regression shows as a ratio measured in one run, not across days of noise.

For each source size N (N applicants + N loan applications = 2N source rows):

1. A fresh embedded Postgres is started under a temporary home in /tmp (mode 0755, so
   the `postgres` OS user can reach it when we run as root) and seeded with N rows
   (fsync off). Seeding is reported but not measured.
2. **Ours**: bronze ingest of both tables, silver promotion of both, then every gold
   table, timed wall clock in a fresh subprocess; its peak RSS is `ru_maxrss` at the end
   (Postgres itself is a separate process and is not counted).
3. The bronze tables are exported to Parquet (not measured).
4. **Spark baseline**: the same silver and gold transforms in PySpark `local[2]` over
   Parquet, in a fresh subprocess: quality rules with rejects, latest-change-wins current
   state, SCD2 history, then application_features (as-of join of applicant history at
   `applied_at`, 30-day intent rate), applicant_features (cumulative aggregates) and
   approval_rate_daily, all written to Parquet. The session start is reported apart and
   **excluded** from Spark's throughput. Spark's peak memory is the JVM's RSS, sampled.
5. Row counts and a few sums of every output are compared between ours and Spark, to
   show the two did the same work.

Throughput is source rows (2N) per second. Ratios are computed within one run (the
machine is noisy): "ours silver+gold / Spark" compares like with like; "ours end to end /
Spark" also charges ours for the Postgres extraction (bronze), which Spark does not do.
A ratio above 1 means ours is faster.

The Markdown report is printed and written to `benchmarks/results/batch-<timestamp>.md`
(rewritten after each size, so a long run that dies keeps what it measured).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve()
RESULTS = HERE.parent / "results"
DEFAULT_ROWS = (45_000, 1_000_000, 10_000_000)
SOURCE_TABLES = ("applicants", "loan_applications")
KEYS = {"applicants": "applicant_id", "loan_applications": "application_id"}
# Seeding speed only: the benchmark never measures the source's durability.
FAST_PG = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
SPARK_CONF = {
    "spark.master": "local[2]",
    "spark.driver.memory": "4g",
    "spark.sql.shuffle.partitions": "8",
    "spark.sql.session.timeZone": "UTC",
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
}
SILVER_TABLES = (
    "applicants",
    "applicants_history",
    "applicants_rejected",
    "loan_applications",
    "loan_applications_history",
    "loan_applications_rejected",
)
GOLD_TABLES = ("application_features", "applicant_features", "approval_rate_daily")
PERSON_COLUMNS = (
    "person_age",
    "person_gender",
    "person_education",
    "person_income",
    "person_emp_exp",
    "person_home_ownership",
    "cb_person_cred_hist_length",
    "credit_score",
    "previous_loan_defaults_on_file",
)
SAMPLE_SECONDS = 0.1


def log(message: str) -> None:
    """Print a progress line to stderr (the report goes to stdout)."""
    print(f"[{datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


# -- memory sampling ------------------------------------------------------------------------


class RssSampler:
    """Sample the summed RSS of some processes in a thread; keep the peak, per stage too."""

    def __init__(self, pids: Callable[[], list[int]], interval: float = SAMPLE_SECONDS) -> None:
        self._pids = pids
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.stage = "start"
        self.peak = 0
        self.by_stage: dict[str, int] = {}
        self.loads: list[float] = []

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval)

    def sample(self) -> None:
        """Take one sample now (and the machine's 1-minute load average)."""
        self.loads.append(os.getloadavg()[0])
        total = 0
        for pid in self._pids():
            with suppress(psutil.Error):
                total += psutil.Process(pid).memory_info().rss
        if not total:
            return
        self.peak = max(self.peak, total)
        self.by_stage[self.stage] = max(self.by_stage.get(self.stage, 0), total)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def max_rss_bytes() -> int:
    """Return this process's peak RSS (`ru_maxrss` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Stopwatch:
    """Time named steps (`stage.detail`): wall clock and CPU seconds of the measured process.

    CPU seconds (user + system, all threads) are less sensitive than wall clock to other
    load on the machine, so the report shows both.
    """

    def __init__(self, sampler: RssSampler, cpu: Callable[[], float]) -> None:
        self.sampler = sampler
        self.cpu = cpu
        self.wall: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time the block under `name`; the RSS sampler attributes samples to its stage."""
        self.sampler.stage = name.split(".")[0]
        log(f"  {name} ...")
        start, cpu = time.perf_counter(), self.cpu()
        yield
        self.wall[name] = time.perf_counter() - start
        self.cpu_seconds[name] = self.cpu() - cpu
        log(f"  {name} {self.wall[name]:.2f}s (cpu {self.cpu_seconds[name]:.1f}s)")

    def stages(self, seconds: dict[str, float]) -> dict[str, float]:
        """Sum steps per stage."""
        out: dict[str, float] = {}
        for name, value in seconds.items():
            stage = name.split(".")[0]
            out[stage] = out.get(stage, 0.0) + value
        return out

    def result(self) -> dict[str, Any]:
        """Return steps and per-stage sums, wall clock and CPU."""
        return {
            "steps": self.wall,
            "stages": self.stages(self.wall),
            "cpu_steps": self.cpu_seconds,
            "cpu_stages": self.stages(self.cpu_seconds),
        }


def library_digest() -> str:
    """Return a digest of the imported `lakehouse` package's sources.

    Others edit the library while a long run goes on: each size records which sources it
    measured, and the report warns when they differ between sizes.
    """
    import lakehouse

    root = Path(lakehouse.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def git_state() -> str:
    """Describe the checkout: commit, and whether `lakehouse/` has uncommitted changes."""
    repo = HERE.parent.parent
    head = subprocess.run(
        [
            "git",
            "-C",
            str(repo),
            "log",
            "-1",
            "--format=%h %ad %s",
            "--date=format:%Y-%m-%d %H:%M:%S",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "--", "lakehouse"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return (head or "unknown") + ("; `lakehouse/` has uncommitted changes" if dirty else "")


def own_cpu_seconds() -> float:
    """Return this process's user + system CPU seconds (all threads)."""
    times = os.times()
    return times.user + times.system


# -- workers: each runs in a fresh subprocess and writes its result as JSON -----------------


def worker_seed(home: Path, rows: int) -> dict[str, Any]:
    """Seed the (running) embedded Postgres under `home` with `rows` rows."""
    from lakehouse.settings import Settings
    from lakehouse.source.schema import connect
    from lakehouse.source.seed import seed

    settings = Settings(home=home)
    start = time.perf_counter()
    with connect(settings) as conn:
        result = seed(conn, settings.pg_schema, rows=rows, seed=42)
        conn.commit()
    return {
        "seconds": time.perf_counter() - start,
        "applicants": result.applicants,
        "applications": result.applications,
    }


def worker_incremental(home: Path, changes: int) -> dict[str, Any]:
    """Write `changes` changes to the source (`lakehouse simulate`), then run ours again.

    The lakehouse is the one ours built: the run takes in only what changed.
    """
    from lakehouse.settings import Settings
    from lakehouse.source.schema import connect
    from lakehouse.source.simulate import simulate

    settings = Settings(home=home)
    with connect(settings) as conn:
        simulated = simulate(conn, settings.pg_schema, changes=changes, seed=7)
        conn.commit()
    result = worker_ours(home)
    result["details"]["simulated"] = {"changes": simulated.changes, "rows": simulated.total}
    return result


def worker_ours(home: Path) -> dict[str, Any]:
    """Run our pipeline (bronze, silver, gold) against the seeded source; time each step."""
    from lakehouse.settings import Settings
    from lakehouse.storage import Storage
    from lakehouse.transforms.gold import GOLD
    from lakehouse.zones import bronze, gold, silver

    settings = Settings(home=home)
    details: dict[str, Any] = {"library": library_digest()}
    with RssSampler(lambda: [os.getpid()]) as sampler:
        watch = Stopwatch(sampler, own_cpu_seconds)
        start = time.perf_counter()
        with watch.step("bronze.check"):
            storage = Storage.from_settings(settings)
            storage.check()
        for table in SOURCE_TABLES:
            with watch.step(f"bronze.{table}"):
                ingested = bronze.ingest(settings, storage, table)
            details[f"bronze.{table}"] = {"rows": ingested.rows, "deletes": ingested.deletes}
        for table in SOURCE_TABLES:
            with watch.step(f"silver.{table}"):
                promoted = silver.promote(storage, table)
            details[f"silver.{table}"] = {
                "rows": promoted.rows,
                "rejects_by_rule": promoted.rejects_by_rule,
            }
        for name in GOLD:
            with watch.step(f"gold.{name}"):
                built = gold.build(settings, storage, name)
            details[f"gold.{name}"] = {"recomputed": built.recomputed}
        total = time.perf_counter() - start
    return {
        "seconds": total,
        **watch.result(),
        "max_rss": max_rss_bytes(),
        "sampled_rss_by_stage": sampler.by_stage,
        "details": details,
    }


def worker_copy_floor(home: Path) -> dict[str, Any]:
    """Time Postgres' own extraction of the source tables: the floor under bronze ingest.

    Two clients that keep nothing: psycopg reading `COPY ... TO STDOUT (FORMAT binary)`
    block by block, and psql's `\\copy ... TO '/dev/null'` (text). Same tables, same rows,
    same server as ours read; what ours does beyond this (types, Arrow, Parquet, the Delta
    commit, the snapshot fence) is the gap the report shows.
    """
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from lakehouse.settings import Settings
    from lakehouse.source.embedded import EmbeddedPostgres, find_bin_dir
    from lakehouse.source.schema import connect

    settings = Settings(home=home)
    schema = settings.pg_schema
    out: dict[str, Any] = {"binary": {}, "binary_bytes": {}, "psql": {}}
    with connect(settings) as conn:
        for table in SOURCE_TABLES:
            start, size = time.perf_counter(), 0
            with conn.cursor().copy(f'COPY "{schema}"."{table}" TO STDOUT (FORMAT binary)') as copy:
                for block in copy:
                    size += len(block)
            out["binary"][table] = time.perf_counter() - start
            out["binary_bytes"][table] = size
    # The password through the environment: a command line shows in `ps`.
    info = conninfo_to_dict(EmbeddedPostgres(settings).dsn())
    env = {**os.environ, "PGPASSWORD": str(info.pop("password", ""))}
    psql = find_bin_dir() / "psql"
    for table in SOURCE_TABLES:
        start = time.perf_counter()
        subprocess.run(
            [
                str(psql),
                make_conninfo(**info),
                "-q",
                "-c",
                f'\\copy "{schema}"."{table}" TO \'/dev/null\'',
            ],
            check=True,
            capture_output=True,
            env=env,
        )
        out["psql"][table] = time.perf_counter() - start
    out["binary_seconds"] = sum(out["binary"].values())
    out["psql_seconds"] = sum(out["psql"].values())
    return out


def worker_export(home: Path, dest: Path) -> dict[str, Any]:
    """Export the bronze Delta tables to Parquet for Spark (not measured)."""
    import polars as pl

    from lakehouse.settings import Settings
    from lakehouse.storage import Storage

    storage = Storage.from_settings(Settings(home=home))
    start = time.perf_counter()
    for table in SOURCE_TABLES:
        (dest / table).mkdir(parents=True, exist_ok=True)
        pl.scan_delta(storage.uri("bronze", table)).sink_parquet(dest / table / "part-0.parquet")
    return {"seconds": time.perf_counter() - start}


def worker_spark(bronze_dir: Path, out: Path, scratch: Path) -> dict[str, Any]:
    """Run the Spark baseline: session start, silver, gold; sample the JVM's RSS."""
    me = psutil.Process()

    def jvm_pids() -> list[int]:
        return [p.pid for p in me.children(recursive=True) if _is_java(p)]

    def jvm_cpu_seconds() -> float:
        total = 0.0
        for pid in jvm_pids():
            with suppress(psutil.Error):
                times = psutil.Process(pid).cpu_times()
                total += times.user + times.system
        return total

    with RssSampler(jvm_pids) as sampler:
        from pyspark.sql import SparkSession

        watch = Stopwatch(sampler, jvm_cpu_seconds)
        with watch.step("session"):
            builder = SparkSession.builder.appName("lakehouse-batch-benchmark")
            conf = {
                **SPARK_CONF,
                "spark.local.dir": str(scratch / "local"),
                "spark.sql.warehouse.dir": str(scratch / "warehouse"),
            }
            for key, value in conf.items():
                builder = builder.config(key, value)
            spark = builder.getOrCreate()
            spark.sparkContext.setLogLevel("ERROR")
        jvm_args = [" ".join(psutil.Process(pid).cmdline()) for pid in jvm_pids()]
        try:
            for table in SOURCE_TABLES:
                with watch.step(f"silver.{table}"):
                    spark_silver(spark, bronze_dir, out / "silver", table)
            for name, build in SPARK_GOLD.items():
                with watch.step(f"gold.{name}"):
                    build(spark, out / "silver", out / "gold")
        finally:
            spark.stop()
    stages = watch.stages(watch.wall)
    return {
        "session_seconds": stages["session"],
        "silver_seconds": stages["silver"],
        "gold_seconds": stages["gold"],
        **watch.result(),
        "jvm_peak_rss": sampler.peak,
        "jvm_rss_by_stage": sampler.by_stage,
        "driver_max_rss": max_rss_bytes(),
        "jvm_has_4g_heap": any("-Xmx4g" in a for a in jvm_args),
    }


def _is_java(proc: psutil.Process) -> bool:
    try:
        return proc.name() == "java"
    except psutil.Error:
        return False


# -- the Spark baseline: lakehouse/transforms/{quality,silver,gold}.py in PySpark -----------


def spark_rules(table: str) -> list[tuple[str, Any]]:
    """Return the quality rules of `table` as (name, Spark column true for a good row).

    In the order of `lakehouse.transforms.quality`, so `_failed_rules` lists agree.
    """
    from pyspark.sql import functions as F

    from lakehouse.transforms import quality as q

    c = F.col

    def representable(column: str) -> tuple[str, Any]:
        return (
            f"{column}_representable",
            ~F.coalesce(c("_unrepresentable").contains(f'"{column}":'), F.lit(False)),
        )

    def in_years(column: str) -> tuple[str, Any]:
        return (
            f"{column}_range",
            (c(column) >= F.lit(q.EARLIEST)) & (c(column) < F.lit(q.LATEST)),
        )

    def not_future() -> tuple[str, Any]:
        drift = F.expr(f"INTERVAL {q.CLOCK_DRIFT.seconds} SECONDS")
        return ("updated_at_not_future", c("updated_at") <= c("_ingested_at") + drift)

    age = c("person_age").cast("bigint")
    if table == "applicants":
        return [
            representable("created_at"),
            representable("updated_at"),
            ("key_positive", c("applicant_id") >= 1),
            ("age_range", c("person_age").between(18, 100)),
            (
                "experience_vs_age",
                (c("person_emp_exp") >= 0) & (c("person_emp_exp") <= age - 14),
            ),
            ("income_range", c("person_income").between(1_000, 10_000_000)),
            ("credit_history_range", c("cb_person_cred_hist_length").between(0, 80)),
            ("credit_history_vs_age", c("cb_person_cred_hist_length") <= age - 16),
            ("credit_score_range", c("credit_score").between(300, 850)),
            ("gender_known", c("person_gender").isin(*q.GENDERS)),
            ("education_known", c("person_education").isin(*q.EDUCATION)),
            ("home_ownership_known", c("person_home_ownership").isin(*q.HOME_OWNERSHIP)),
            ("previous_defaults_known", c("previous_loan_defaults_on_file").isin(*q.YES_NO)),
            in_years("created_at"),
            in_years("updated_at"),
            not_future(),
            ("created_before_update", c("created_at") <= c("updated_at")),
        ]
    income = c("_income_at")
    return [
        representable("applied_at"),
        representable("updated_at"),
        ("key_positive", c("application_id") >= 1),
        ("amount_range", c("loan_amnt").between(100, 1_000_000)),
        ("interest_rate_range", c("loan_int_rate").between(1, 36)),
        ("percent_income_range", c("loan_percent_income").between(0, 1)),
        ("intent_known", c("loan_intent").isin(*q.INTENTS)),
        ("status_known", c("loan_status").isNull() | c("loan_status").isin(0, 1)),
        in_years("applied_at"),
        in_years("updated_at"),
        not_future(),
        ("applied_before_update", c("applied_at") <= c("updated_at")),
        ("applicant_exists", F.coalesce(c("_known"), F.lit(False))),
        (
            "applied_after_applicant_created",
            c("_created_at").isNull() | (c("applied_at") >= c("_created_at")),
        ),
        (
            "percent_income_consistent",
            income.isNull()
            | (F.abs(c("loan_percent_income") - c("loan_amnt") / income) <= q.PERCENT_TOLERANCE),
        ),
    ]


def _text_columns(frame: Any) -> list[str]:
    """Return the source's text columns (what `clean` normalises)."""
    return [
        f.name
        for f in frame.schema.fields
        if f.dataType.simpleString() == "string" and not f.name.startswith("_")
    ]


def spark_clean(frame: Any, table: str) -> Any:
    """Trim text and give categories their canonical case (quality.clean)."""
    from pyspark.sql import functions as F

    from lakehouse.transforms.quality import EDUCATION, WHITESPACE

    space = "[" + "".join(f"\\x{ord(ch):02x}" for ch in WHITESPACE) + "]+"
    frame = frame.withColumns(
        {name: F.regexp_replace(name, f"^{space}|{space}$", "") for name in _text_columns(frame)}
    )
    if table == "applicants":
        edu = F.create_map(*[F.lit(x) for e in EDUCATION for x in (e.lower(), e)])
        lowered = F.lower("person_education")
        return frame.withColumns(
            {
                "person_gender": F.lower("person_gender"),
                "person_home_ownership": F.upper("person_home_ownership"),
                "person_education": F.coalesce(edu[lowered], lowered),
                "previous_loan_defaults_on_file": F.initcap(
                    F.lower("previous_loan_defaults_on_file")
                ),
            }
        )
    return frame.withColumn("loan_intent", F.upper("loan_intent"))


def spark_silver(spark: Any, bronze_dir: Path, silver_dir: Path, table: str) -> None:
    """Validate, split rejects, write SCD2 history and current state of one source table."""
    from pyspark import StorageLevel
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    is_upsert = F.col("_op") == "upsert"
    rank = F.when(F.col("_op") == "delete", 1).otherwise(0)
    key = KEYS[table]
    bronze = spark.read.parquet(str(bronze_dir / table))
    # Rejected rows keep the values as they arrived (before `clean`), like quality.validate.
    texts = _text_columns(bronze)
    frame = spark_clean(bronze.withColumn("_raw", F.struct(*texts)), table)
    checks = spark_rules(table)
    if table == "loan_applications":
        # What the rules read about the applicant: in silver, created_at, and the income
        # when the applicant's version dates from no later than applied_at.
        known = (
            spark.read.parquet(str(silver_dir / "applicants_history"))
            .filter(F.col("valid_to").isNull())
            .select(
                F.col("applicant_id").alias("_known_id"),
                F.lit(True).alias("_known"),
                F.col("created_at").alias("_created_at"),
                F.col("person_income").alias("_income"),
                F.col("valid_from").alias("_since"),
            )
        )
        frame = (
            frame.join(known, frame["applicant_id"] == known["_known_id"], "left")
            .drop("_known_id")
            .withColumn(
                "_income_at", F.when(F.col("_since") <= F.col("applied_at"), F.col("_income"))
            )
        )
    failed = F.array_compact(
        F.array(
            *[
                F.when(is_upsert & ~F.coalesce(check, F.lit(False)), F.lit(name))
                for name, check in checks
            ]
        )
    )
    marked = (
        frame.withColumn("_failed_rules", failed)
        .drop("_known", "_created_at", "_income", "_since", "_income_at")
        .persist(StorageLevel.MEMORY_AND_DISK)
    )
    bad = F.size("_failed_rules") > 0
    (
        marked.filter(bad)
        .withColumns({name: F.col(f"_raw.{name}") for name in texts})
        .withColumns({"_rule": F.col("_failed_rules")[0], "_rejected_at": F.current_timestamp()})
        .drop("_raw")
        .write.mode("overwrite")
        .parquet(str(silver_dir / f"{table}_rejected"))
    )
    good = marked.filter(~bad).drop(
        "_raw",
        "_failed_rules",
        "_source_xid",
        "_unrepresentable",
        "_extract_mode",
        "_ingested_at",
    )
    if table == "applicants":
        yes_no = F.col("previous_loan_defaults_on_file")
        good = good.withColumn(
            "previous_loan_defaults_on_file",
            F.when(yes_no == "Yes", True).when(yes_no == "No", False).cast("boolean"),
        )
    order = [F.col("_source_ts"), rank, F.col("_batch_id")]
    history = (
        good.withColumns(
            {
                "valid_from": F.col("_source_ts"),
                "valid_to": F.lead("_source_ts").over(Window.partitionBy(key).orderBy(*order)),
            }
        )
        .filter(is_upsert)
        .withColumn("is_current", F.col("valid_to").isNull())
        .drop("_op", "_source_ts")
    )
    history.write.mode("overwrite").parquet(str(silver_dir / f"{table}_history"))
    last = Window.partitionBy(key).orderBy(*[o.desc() for o in order])
    current = (
        good.withColumn("_n", F.row_number().over(last))
        .filter((F.col("_n") == 1) & is_upsert)
        .drop("_n", "_op", "_source_ts")
    )
    current.write.mode("overwrite").parquet(str(silver_dir / table))
    marked.unpersist()


def asof_join(left: Any, right: Any, key: str, left_ts: str, right_ts: str, *, inner: bool) -> Any:
    """As-of join by the window approach: the latest right row with `right_ts <= left_ts`.

    Both sides are unioned, sorted per key by time (right rows first on ties, since the
    match is inclusive) and each left row takes the last right row seen so far.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    right_cols = [c for c in right.columns if c != key]
    tagged_right = right.select(
        key,
        F.col(right_ts).alias("_asof_ts"),
        F.lit(0).alias("_asof_side"),
        F.struct(*right_cols).alias("_asof_right"),
    )
    tagged_left = left.withColumns({"_asof_ts": F.col(left_ts), "_asof_side": F.lit(1)})
    both = tagged_left.unionByName(tagged_right, allowMissingColumns=True)
    window = (
        Window.partitionBy(key)
        .orderBy("_asof_ts", "_asof_side")
        .rowsBetween(Window.unboundedPreceding, Window.currentRow)
    )
    matched = both.withColumn(
        "_asof_match", F.last("_asof_right", ignorenulls=True).over(window)
    ).filter(F.col("_asof_side") == 1)
    if inner:
        matched = matched.filter(F.col("_asof_match").isNotNull())
    return matched.select(*left.columns, *[F.col(f"_asof_match.{c}").alias(c) for c in right_cols])


def intent_rate_30d(submitted: Any) -> Any:
    """Mean `loan_int_rate` per intent over `[applied_at - 30 days, applied_at)`.

    A Spark `rangeBetween(-30 days, -1)` frame re-aggregates the whole frame for every row
    (O(rows x frame)): at 1M rows it took 240 s alone. Instead use prefix sums, which Spark
    computes in one pass: sum(window) = S(before t) - S(up to t - 30 days - 1µs), the
    second found by an as-of lookup on the same per-intent running totals.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    c = F.col
    month_us = 30 * 86_400 * 1_000_000
    upto = Window.partitionBy("loan_intent").orderBy(F.unix_micros("applied_at"))
    before = upto.rangeBetween(Window.unboundedPreceding, -1)
    through = upto.rangeBetween(Window.unboundedPreceding, Window.currentRow)
    totals = submitted.select(
        "application_id",
        "loan_intent",
        "applied_at",
        F.coalesce(F.sum("loan_int_rate").over(before), F.lit(0.0)).alias("sum_before"),
        F.count("loan_int_rate").over(before).alias("n_before"),
        F.coalesce(F.sum("loan_int_rate").over(through), F.lit(0.0)).alias("sum_through"),
        F.count("loan_int_rate").over(through).alias("n_through"),
    )
    lookup = totals.withColumn(
        "_old_ts", F.timestamp_micros(F.unix_micros("applied_at") - month_us - 1)
    )
    old = totals.select(
        "loan_intent",
        c("applied_at").alias("_at"),
        c("sum_through").alias("sum_old"),
        c("n_through").alias("n_old"),
    )
    matched = asof_join(lookup, old, "loan_intent", "_old_ts", "_at", inner=False)
    count = c("n_before") - F.coalesce(c("n_old"), F.lit(0))
    total = c("sum_before") - F.coalesce(c("sum_old"), F.lit(0.0))
    return matched.select(
        "application_id", F.when(count > 0, total / count).alias("intent_rate_30d")
    )


HISTORY_COLUMNS = ("application_count", "approved_count", "rejected_count", "mean_loan_amnt")


def spark_application_features(spark: Any, silver_dir: Path, gold_dir: Path) -> None:
    """gold.application_features: loans with the applicant (and history) as of `applied_at`.

    Reads gold.applicant_features (built first, as ours does).
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    c = F.col
    loans = spark.read.parquet(str(silver_dir / "loan_applications"))
    applicant_history = spark.read.parquet(str(silver_dir / "applicants_history"))
    loan_history = spark.read.parquet(str(silver_dir / "loan_applications_history"))
    by_version = Window.partitionBy("application_id").orderBy("valid_from")
    submitted = loan_history.withColumn("_n", F.row_number().over(by_version)).filter(c("_n") == 1)
    person = applicant_history.select("applicant_id", "valid_from", *PERSON_COLUMNS)
    history = spark.read.parquet(str(gold_dir / "applicant_features")).select(
        "applicant_id",
        c("event_timestamp").alias("_history_at"),
        *HISTORY_COLUMNS,
        c("days_since_last_application").alias("_days_at_history"),
    )
    joined = asof_join(loans, person, "applicant_id", "applied_at", "valid_from", inner=False).join(
        intent_rate_30d(submitted), "application_id", "left"
    )
    joined = asof_join(joined, history, "applicant_id", "applied_at", "_history_at", inner=False)
    score = c("credit_score")
    band = (
        F.when(score.isNull(), None)
        .when(score < 580, "poor")
        .when(score < 670, "fair")
        .when(score < 740, "good")
        .when(score < 800, "very_good")
        .otherwise("exceptional")
    )
    (
        joined.select(
            "application_id",
            "applicant_id",
            c("applied_at").alias("event_timestamp"),
            "applied_at",
            "loan_amnt",
            "loan_intent",
            "loan_int_rate",
            "loan_percent_income",
            *PERSON_COLUMNS,
            F.when(c("person_income") != 0, c("loan_amnt") / c("person_income")).alias(
                "loan_to_income"
            ),
            (c("loan_int_rate") - c("intent_rate_30d")).alias("rate_spread"),
            band.alias("credit_score_band"),
            *[c(n).cast("bigint").alias(n) for n in HISTORY_COLUMNS[:3]],
            "mean_loan_amnt",
            (
                c("_days_at_history")
                + (F.unix_micros("applied_at") - F.unix_micros("_history_at")) / 1e6 / 86_400.0
            ).alias("days_since_last_application"),
            "loan_status",
        )
        .write.mode("overwrite")
        .parquet(str(gold_dir / "application_features"))
    )


def spark_applicant_features(spark: Any, silver_dir: Path, gold_dir: Path) -> None:
    """gold.applicant_features: applicant attributes and cumulative application counts."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    c = F.col
    applicant_history = spark.read.parquet(str(silver_dir / "applicants_history"))
    loan_history = spark.read.parquet(str(silver_dir / "loan_applications_history"))
    by_version = Window.partitionBy("application_id").orderBy("valid_from")

    def is_status(column: str, value: int) -> Any:
        return F.coalesce((c(column) == value).cast("int"), F.lit(0))

    versions = loan_history.select(
        "applicant_id",
        "applied_at",
        "loan_amnt",
        "loan_status",
        "valid_from",
        F.lag("loan_amnt").over(by_version).alias("prev_amnt"),
        F.lag("loan_status").over(by_version).alias("prev_status"),
        F.row_number().over(by_version).alias("n"),
    )
    first = c("n") == 1
    deltas = versions.select(
        "applicant_id",
        F.greatest("valid_from", F.timestamp_micros(F.unix_micros("applied_at") + 1)).alias("ts"),
        F.when(first, 1).otherwise(0).alias("d_count"),
        (c("loan_amnt") - F.coalesce(c("prev_amnt"), F.lit(0.0))).alias("d_amount"),
        (is_status("loan_status", 1) - is_status("prev_status", 1)).alias("d_approved"),
        (is_status("loan_status", 0) - is_status("prev_status", 0)).alias("d_rejected"),
        F.when(first, c("applied_at")).alias("submitted_at"),
    )
    # One stream per applicant (application deltas and applicant versions) and one window
    # pass: running aggregates and the version in force at every instant.
    forever = F.lit("9999-12-31 00:00:00").cast("timestamp")
    versions_in_force = applicant_history.select(
        "applicant_id",
        c("valid_from").alias("ts"),
        *PERSON_COLUMNS,
        F.coalesce(c("valid_to"), forever).alias("version_end"),
    )
    stream = deltas.unionByName(versions_in_force, allowMissingColumns=True)
    upto = (
        Window.partitionBy("applicant_id")
        .orderBy("ts")
        .rangeBetween(Window.unboundedPreceding, Window.currentRow)
    )
    state = stream.select(
        "applicant_id",
        "ts",
        F.sum("d_count").over(upto).alias("application_count"),
        F.sum("d_amount").over(upto).alias("amount_sum"),
        F.sum("d_approved").over(upto).alias("approved_count"),
        F.sum("d_rejected").over(upto).alias("rejected_count"),
        F.max("submitted_at").over(upto).alias("last_applied_at"),
        *[
            F.last(name, ignorenulls=True).over(upto).alias(name)
            for name in (*PERSON_COLUMNS, "version_end")
        ],
    )
    features = state.filter(c("version_end") > c("ts")).dropDuplicates(["applicant_id", "ts"])
    features.select(
        "applicant_id",
        c("ts").alias("event_timestamp"),
        *PERSON_COLUMNS,
        F.coalesce(c("application_count"), F.lit(0)).cast("bigint").alias("application_count"),
        F.coalesce(c("approved_count"), F.lit(0)).cast("bigint").alias("approved_count"),
        F.coalesce(c("rejected_count"), F.lit(0)).cast("bigint").alias("rejected_count"),
        F.when(c("application_count") != 0, c("amount_sum") / c("application_count")).alias(
            "mean_loan_amnt"
        ),
        ((F.unix_micros("ts") - F.unix_micros("last_applied_at")) / 1e6 / 86_400.0).alias(
            "days_since_last_application"
        ),
    ).write.mode("overwrite").parquet(str(gold_dir / "applicant_features"))


def spark_approval_rate_daily(spark: Any, silver_dir: Path, gold_dir: Path) -> None:
    """gold.approval_rate_daily: per UTC day and intent, decided and approved counts."""
    from pyspark.sql import functions as F

    c = F.col
    loans = spark.read.parquet(str(silver_dir / "loan_applications"))
    decided = c("decided")
    (
        loans.groupBy(F.to_date("applied_at").alias("day"), "loan_intent")
        .agg(
            F.count(F.lit(1)).alias("applications"),
            F.count("loan_status").alias("decided"),
            F.count(F.when(c("loan_status") == 1, 1)).alias("approved"),
            F.max("applied_at").alias("event_timestamp"),
        )
        .withColumn("approval_rate", F.when(decided != 0, c("approved") / decided))
        .orderBy("day", "loan_intent")
        .write.mode("overwrite")
        .parquet(str(gold_dir / "approval_rate_daily"))
    )


SPARK_GOLD: dict[str, Callable[[Any, Path, Path], None]] = {
    "applicant_features": spark_applicant_features,  # application_features reads it
    "application_features": spark_application_features,
    "approval_rate_daily": spark_approval_rate_daily,
}


WORKERS = ("_seed", "_ours", "_incremental", "_floor", "_tfloor", "_export", "_spark")


def run_worker_cli(argv: list[str]) -> int:
    """Entry point of a worker subprocess: `batch.py _<name> --result FILE ...`."""
    parser = argparse.ArgumentParser(prog=f"batch.py {argv[0]}")
    parser.add_argument("--result", type=Path, required=True)
    parser.add_argument("--home", type=Path)
    parser.add_argument("--rows", type=int)
    parser.add_argument("--changes", type=int)
    parser.add_argument("--bronze", type=Path)
    parser.add_argument("--dest", type=Path)
    parser.add_argument("--scratch", type=Path)
    args = parser.parse_args(argv[1:])
    name = argv[0]
    if name == "_seed":
        result = worker_seed(args.home, args.rows)
    elif name == "_ours":
        result = worker_ours(args.home)
    elif name == "_incremental":
        result = worker_incremental(args.home, args.changes)
    elif name == "_floor":
        result = worker_copy_floor(args.home)
    elif name == "_tfloor":
        from floors import worker_transform_floor

        result = worker_transform_floor(args.home)
    elif name == "_export":
        result = worker_export(args.home, args.dest)
    else:
        result = worker_spark(args.bronze, args.dest, args.scratch)
    args.result.write_text(json.dumps(result, indent=2))
    return 0


# -- the driver: one size at a time, workers in subprocesses --------------------------------


@dataclass
class WorkerRun:
    """How a worker subprocess went."""

    ok: bool
    seconds: float
    tree_peak_rss: int
    load_avg: float
    result: dict[str, Any]
    error: str = ""


def run_worker(
    name: str, workdir: Path, *, checkout: Path | None = None, **options: Path | int
) -> WorkerRun:
    """Run `batch.py <name>` in a fresh interpreter; sample its process tree's RSS.

    With `checkout` (a worktree of another commit), that commit's own `batch.py` runs
    with that commit's `lakehouse` first on the import path.
    """
    result_file = workdir / f"{name.strip('_')}.json"
    log_file = workdir / f"{name.strip('_')}.log"
    script = HERE if checkout is None else checkout / "benchmarks" / HERE.name
    argv = [sys.executable, str(script), name, "--result", str(result_file)]
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    env = dict(os.environ)
    if checkout is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(checkout), env.get("PYTHONPATH", "")])
    result_file.unlink(missing_ok=True)
    start = time.perf_counter()
    with log_file.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=workdir, env=env)
        root = psutil.Process(proc.pid)

        def tree() -> list[int]:
            with suppress(psutil.Error):
                return [proc.pid, *(p.pid for p in root.children(recursive=True))]
            return []

        try:
            with RssSampler(tree) as sampler:
                code = proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    seconds = time.perf_counter() - start
    load = sum(sampler.loads) / max(1, len(sampler.loads))
    text = log_file.read_text(errors="replace")
    sys.stderr.write(text)
    if code != 0 or not result_file.exists():
        how = f"exit code {code}"
        if code < 0:
            how = f"killed by signal {-code}" + (" (out of memory?)" if code == -9 else "")
        tail = "\n".join(text.strip().splitlines()[-40:])
        return WorkerRun(False, seconds, sampler.peak, load, {}, f"{name} failed: {how}\n{tail}")
    return WorkerRun(True, seconds, sampler.peak, load, json.loads(result_file.read_text()))


@dataclass
class SizeResult:
    """Everything measured for one source size."""

    rows: int
    seed: WorkerRun | None = None
    ours: WorkerRun | None = None
    export: WorkerRun | None = None
    spark: WorkerRun | None = None
    checks: list[tuple[str, Any, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    floor: WorkerRun | None = None
    """Postgres' own extraction of the same rows (`worker_copy_floor`)."""
    transform_floor: WorkerRun | None = None
    """Silver and gold as plain in-memory queries (`floors.worker_transform_floor`)."""
    incremental: WorkerRun | None = None
    """Ours again after `--changes` changes to the source (`worker_incremental`)."""
    compared: list[tuple[str, int, WorkerRun]] = field(default_factory=list)
    """(commit, turn, run) of `--compare`: ours at each commit, in turns, same source."""


def output_checks(home: Path, spark_out: Path) -> list[tuple[str, Any, Any]]:
    """Compare row counts and a few sums of every output table, ours against Spark's."""
    import polars as pl

    from lakehouse.settings import Settings
    from lakehouse.storage import Storage

    storage = Storage.from_settings(Settings(home=home))
    sums = {
        "application_features": (
            "rate_spread",
            "loan_to_income",
            "person_age",
            "application_count",
            "days_since_last_application",
        ),
        "applicant_features": ("application_count", "approved_count", "mean_loan_amnt"),
        "approval_rate_daily": ("applications", "approved", "decided"),
    }
    checks: list[tuple[str, Any, Any]] = []
    for zone, tables in (("silver", SILVER_TABLES), ("gold", GOLD_TABLES)):
        for table in tables:
            ours = pl.scan_delta(storage.uri(zone, table))
            theirs = pl.scan_parquet(spark_out / zone / table / "*.parquet")
            exprs = [pl.len().alias("rows")] + [pl.col(c).sum() for c in sums.get(table, ())]
            a = ours.select(exprs).collect().row(0, named=True)
            b = theirs.select(exprs).collect().row(0, named=True)
            for name in a:
                checks.append(
                    (
                        f"{zone}.{table} {name if name == 'rows' else 'sum ' + name}",
                        a[name],
                        b[name],
                    )
                )
    return checks


def matches(a: Any, b: Any) -> bool:
    """Tell whether two check values agree (floats to a relative 1e-6)."""
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))
    return bool(a == b)


@contextmanager
def checkouts(revisions: list[str]) -> Iterator[dict[str, Path]]:
    """Check out each revision in a temporary git worktree; remove them afterwards."""
    repo = HERE.parent.parent
    made: dict[str, Path] = {}
    try:
        for rev in revisions:
            place = Path(tempfile.mkdtemp(prefix="lakehouse-bench-rev-", dir="/tmp"))
            place.rmdir()
            subprocess.run(
                ["git", "-C", str(repo), "worktree", "add", "--detach", str(place), rev],
                check=True,
                capture_output=True,
            )
            made[rev] = place
        yield made
    finally:
        for place in made.values():
            subprocess.run(
                ["git", "-C", str(repo), "worktree", "remove", "--force", str(place)],
                check=False,
                capture_output=True,
            )


def ours_in_turns(
    result: SizeResult, scratch: Path, home: Path, revisions: dict[str, Path], turns: int
) -> None:
    """Run ours at each compared commit and at this checkout, in turns, on one source.

    Each run starts from an empty warehouse; this checkout runs last in each turn, so
    the warehouse left for Spark's checks is its own. `result.ours` is its last run.
    """
    order = [*revisions.items(), ("this checkout", None)]
    for turn in range(1, turns + 1):
        for label, checkout in order:
            for leftover in ("warehouse", "duckdb_tmp"):
                shutil.rmtree(home / leftover, ignore_errors=True)
            log(f"{result.rows:,} rows: ours at {label}, turn {turn} of {turns}")
            run = run_worker("_ours", scratch, checkout=checkout, home=home)
            result.compared.append((label, turn, run))
            if not run.ok:
                result.errors.append(f"{label}, turn {turn}: {run.error}")
            if checkout is None:
                result.ours = run


def run_size(
    rows: int,
    *,
    skip_spark: bool,
    revisions: dict[str, Path] | None = None,
    turns: int = 2,
    changes: int = 0,
    skip_floors: bool = False,
) -> SizeResult:
    """Seed, run ours, the floors, Spark and the incremental run; stop Postgres, clean up."""
    from lakehouse.settings import Settings
    from lakehouse.source.embedded import EmbeddedPostgres

    result = SizeResult(rows)
    scratch = Path(tempfile.mkdtemp(prefix=f"lakehouse-bench-{rows}-", dir="/tmp"))
    scratch.chmod(0o755)  # as root, the `postgres` OS user must traverse it
    home = scratch / "home"
    home.mkdir(mode=0o755)
    pg = EmbeddedPostgres(Settings(home=home), extra_options=FAST_PG)
    try:
        log(f"{rows:,} rows: starting Postgres under {home}")
        pg.start()
        log(f"{rows:,} rows: seeding")
        result.seed = run_worker("_seed", scratch, home=home, rows=rows)
        if not result.seed.ok:
            result.errors.append(result.seed.error)
            return result
        log(f"{rows:,} rows: seeded in {result.seed.result['seconds']:.1f}s; running ours")
        if revisions:
            ours_in_turns(result, scratch, home, revisions, turns)
        else:
            result.ours = run_worker("_ours", scratch, home=home)
        assert result.ours is not None
        if not result.ours.ok and not revisions:
            result.errors.append(result.ours.error)
        log(f"{rows:,} rows: the extraction floor (binary COPY, psql \\copy)")
        result.floor = run_worker("_floor", scratch, home=home)
        if not result.floor.ok:
            result.errors.append(result.floor.error)
        pg.stop()
        if result.ours.ok and not skip_floors:
            log(f"{rows:,} rows: the transform floors (silver and gold in memory)")
            result.transform_floor = run_worker("_tfloor", scratch, home=home)
            if not result.transform_floor.ok:
                result.errors.append(result.transform_floor.error)
        if not skip_spark:
            run_spark(result, scratch, home)
        if changes and result.ours.ok:
            # Last: Spark's checks compare its silver with ours before these changes.
            pg.start()
            log(f"{rows:,} rows: {changes:,} changes to the source, then ours again")
            result.incremental = run_worker("_incremental", scratch, home=home, changes=changes)
            if not result.incremental.ok:
                result.errors.append(result.incremental.error)
        return result
    except Exception:
        result.errors.append(f"{rows:,} rows failed:\n{traceback.format_exc()}")
        return result
    finally:
        try:
            pg.stop()
        except Exception as exc:
            result.errors.append(f"stopping Postgres failed: {exc}")
        shutil.rmtree(scratch, ignore_errors=True)


def run_spark(result: SizeResult, scratch: Path, home: Path) -> None:
    """Export bronze, run Spark over it, compare its outputs with ours."""
    rows = result.rows
    bronze_dir = scratch / "bronze-parquet"
    log(f"{rows:,} rows: exporting bronze to Parquet")
    result.export = run_worker("_export", scratch, home=home, dest=bronze_dir)
    if not result.export.ok:
        result.errors.append(result.export.error)
        return
    log(f"{rows:,} rows: running Spark")
    spark_out = scratch / "spark-out"
    result.spark = run_worker(
        "_spark", scratch, bronze=bronze_dir, dest=spark_out, scratch=scratch / "spark-scratch"
    )
    if not result.spark.ok:
        result.errors.append(result.spark.error)
    elif result.ours and result.ours.ok:
        try:
            result.checks = output_checks(home, spark_out)
        except Exception:
            result.errors.append("output checks failed:\n" + traceback.format_exc())
    shutil.rmtree(bronze_dir, ignore_errors=True)
    shutil.rmtree(spark_out, ignore_errors=True)


# -- the report -----------------------------------------------------------------------------


def rate(rows: float, seconds: float | None) -> str:
    """Format a throughput."""
    if not seconds:
        return "n/a"
    per_s = rows / seconds
    return f"{per_s / 1e6:.2f} M/s" if per_s >= 1e6 else f"{per_s / 1e3:.0f} k/s"


def size(n_bytes: float | None) -> str:
    """Format a memory size."""
    if not n_bytes:
        return "n/a"
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"


def ratio(ours: float | None, spark: float | None) -> str:
    """Format a throughput ratio (Spark seconds / our seconds)."""
    return f"{spark / ours:.2f}x" if ours and spark else "n/a"


def machine_info() -> list[str]:
    """Describe the machine and the library versions."""
    cpu = "unknown"
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    java = subprocess.run(["java", "-version"], capture_output=True, text=True, check=False)
    versions = []
    for package in ("duckdb", "polars", "deltalake", "pyarrow", "pyspark", "psycopg"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} (not installed)")
    return [
        f"- CPU: {cpu}; {os.cpu_count()} cores "
        f"({len(os.sched_getaffinity(0))} usable); RAM {size(psutil.virtual_memory().total)}",
        f"- OS: {platform.platform()}",
        f"- Python {platform.python_version()}; {', '.join(versions)}",
        f"- Java: {(java.stderr.strip().splitlines() or ['unknown'])[0]}",
        f"- Spark: {', '.join(f'{k}={v}' for k, v in SPARK_CONF.items())}",
    ]


def report(results: list[SizeResult], command: str, started: datetime, library: str) -> str:
    """Render the Markdown report."""
    digests = {r.ours.result["details"]["library"] for r in results if r.ours and r.ours.ok}
    out = [
        f"# Batch pipeline benchmark ({started:%Y-%m-%d %H:%M} UTC)",
        "",
        f"Command: `{command}`",
        "",
        f"Library: {library} (at the start of the run); sources measured:"
        f" {', '.join(sorted(digests)) or 'n/a'}"
        + (
            " — **the library changed during the run: sizes are not comparable**"
            if len(digests) > 1
            else ""
        ),
        "",
        *machine_info(),
        "",
        "Rows = N applicants + N loan applications; throughput is 2N source rows per second"
        " of wall clock. Ratios are Spark seconds / our seconds for the same work (above 1:"
        " ours faster). *Silver+gold* is like with like (both start from bronze); *end to"
        " end* also charges ours for extracting Postgres into bronze. Spark's session start"
        " is excluded from its throughput and shown apart. Peak RSS: ours is `ru_maxrss` of"
        " the pipeline process (Postgres server not counted); Spark's is the sampled RSS of"
        " its JVM (local[2] driver).",
        "",
        "| rows (N) | ours end to end | ours silver+gold | Spark silver+gold"
        " | ratio silver+gold | ratio end to end | ours peak RSS | Spark JVM peak RSS"
        " | ours bronze / silver / gold | Spark silver / gold (+ session) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in results:
        source = 2 * r.rows
        ours = r.ours.result if r.ours and r.ours.ok else {}
        spark = r.spark.result if r.spark and r.spark.ok else {}
        stages = ours.get("stages", {})
        e2e = ours.get("seconds")
        ours_sg = (stages["silver"] + stages["gold"]) if stages else None
        spark_sg = (spark["silver_seconds"] + spark["gold_seconds"]) if spark else None
        split = (
            f"{stages['bronze']:.1f} / {stages['silver']:.1f} / {stages['gold']:.1f} s"
            if stages
            else "failed"
        )
        spark_split = (
            f"{spark['silver_seconds']:.1f} / {spark['gold_seconds']:.1f} s"
            f" (+{spark['session_seconds']:.1f} s)"
            if spark
            else "n/a"
        )
        out.append(
            f"| {r.rows:,} | {rate(source, e2e)} | {rate(source, ours_sg)}"
            f" | {rate(source, spark_sg)} | {ratio(ours_sg, spark_sg)} | {ratio(e2e, spark_sg)}"
            f" | {size(ours.get('max_rss'))} | {size(spark.get('jvm_peak_rss'))}"
            f" | {split} | {spark_split} |"
        )
    out += [
        "",
        "CPU seconds (user + system, all threads) of the same runs: less sensitive to other"
        " load on the machine than wall clock. Ours is the pipeline process (not the Postgres"
        " server); Spark's is its JVM. Load average is the machine's 1-minute load, averaged"
        " over the run (2 cores: above ~2 means the measurement shared the CPU).",
        "",
        "| rows (N) | ours CPU bronze / silver / gold | Spark CPU silver / gold"
        " | CPU ratio silver+gold | load avg during ours / Spark |",
        "|---:|---|---|---:|---|",
    ]
    for r in results:
        ours = r.ours.result if r.ours and r.ours.ok else {}
        spark = r.spark.result if r.spark and r.spark.ok else {}
        cpu = ours.get("cpu_stages", {})
        spark_cpu = spark.get("cpu_stages", {})
        ours_sg = cpu["silver"] + cpu["gold"] if cpu else None
        spark_sg = spark_cpu["silver"] + spark_cpu["gold"] if spark_cpu else None
        out.append(
            f"| {r.rows:,} | "
            + (f"{cpu['bronze']:.1f} / {cpu['silver']:.1f} / {cpu['gold']:.1f} s" if cpu else "n/a")
            + " | "
            + (f"{spark_cpu['silver']:.1f} / {spark_cpu['gold']:.1f} s" if spark_cpu else "n/a")
            + f" | {ratio(ours_sg, spark_sg)} | "
            + (f"{r.ours.load_avg:.1f}" if r.ours else "n/a")
            + " / "
            + (f"{r.spark.load_avg:.1f}" if r.spark else "n/a")
            + " |"
        )
    out += floor_section(results)
    out += transform_floor_section(results)
    out += incremental_section(results)
    if any(r.compared for r in results):
        out += compared_section(results)
    out += ["", "## Details", ""]
    for r in results:
        out += [f"### {r.rows:,} rows", ""]
        if r.seed and r.seed.ok:
            out.append(f"- Seeding Postgres (not measured): {r.seed.result['seconds']:.1f} s")
        if r.ours and r.ours.ok:
            ours = r.ours.result
            steps = ", ".join(
                f"{k} {v:.2f}s (cpu {ours['cpu_steps'][k]:.1f}s)" for k, v in ours["steps"].items()
            )
            peaks = ", ".join(f"{k} {size(v)}" for k, v in ours["sampled_rss_by_stage"].items())
            out += [
                f"- Ours, per step: {steps}",
                f"- Ours, sampled RSS peak per stage: {peaks}; ru_maxrss {size(ours['max_rss'])}",
                f"- Ours, subprocess wall clock incl. imports: {r.ours.seconds:.1f} s",
            ]
            for step, detail in ours["details"].items():
                out.append(f"- Ours, {step}: {json.dumps(detail)}")
        if r.incremental and r.incremental.ok:
            for step, detail in r.incremental.result["details"].items():
                out.append(f"- Incremental run, {step}: {json.dumps(detail)}")
        if r.export and r.export.ok:
            out.append(
                f"- Bronze export to Parquet (not measured): {r.export.result['seconds']:.1f} s"
            )
        if r.spark and r.spark.ok:
            spark = r.spark.result
            peaks = ", ".join(f"{k} {size(v)}" for k, v in spark["jvm_rss_by_stage"].items())
            out += [
                f"- Spark: session start {spark['session_seconds']:.1f} s (excluded), silver"
                f" {spark['silver_seconds']:.1f} s, gold {spark['gold_seconds']:.1f} s;"
                f" JVM RSS peak per stage: {peaks}; Python driver ru_maxrss"
                f" {size(spark['driver_max_rss'])}; JVM has -Xmx4g: {spark['jvm_has_4g_heap']}",
                "- Spark, per step: "
                + ", ".join(
                    f"{k} {v:.2f}s (cpu {spark['cpu_steps'][k]:.1f}s)"
                    for k, v in spark["steps"].items()
                ),
                f"- Spark process tree (Python + JVM) sampled peak: {size(r.spark.tree_peak_rss)}",
            ]
        if r.checks:
            bad = [c for c in r.checks if not matches(c[1], c[2])]
            out += [
                "",
                f"Output checks, ours vs Spark: {len(r.checks) - len(bad)} of"
                f" {len(r.checks)} agree.",
                "",
                "| check | ours | Spark | agree |",
                "|---|---:|---:|---|",
            ]
            out += [
                f"| {name} | {a} | {b} | {'yes' if matches(a, b) else '**NO**'} |"
                for name, a, b in r.checks
            ]
        for error in r.errors:
            out += ["", "Failure:", "", "```", error.strip(), "```"]
        out.append("")
    return "\n".join(out)


def floor_section(results: list[SizeResult]) -> list[str]:
    """Render bronze ingest against Postgres' own extraction of the same rows."""
    out = [
        "",
        "## Extraction against its floor",
        "",
        "Bronze ingest (ours, both tables) against Postgres' own extraction of the same rows"
        " on the same server, measured after ours: `COPY ... TO STDOUT (FORMAT binary)` read"
        " by psycopg and thrown away, and psql's `\\copy ... TO '/dev/null'`. *Of floor* is"
        " floor seconds / our seconds: 100% would be extraction at the speed Postgres sends.",
        "",
        "| rows (N) | ours bronze | binary COPY floor | of floor | psql \\copy (text)"
        " | binary bytes |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ours = r.ours.result if r.ours and r.ours.ok else {}
        floor = r.floor.result if r.floor and r.floor.ok else {}
        bronze = ours.get("stages", {}).get("bronze")
        if not floor or bronze is None:
            out.append(f"| {r.rows:,} | n/a | n/a | n/a | n/a | n/a |")
            continue
        share = floor["binary_seconds"] / bronze
        out.append(
            f"| {r.rows:,} | {bronze:.1f} s | {floor['binary_seconds']:.1f} s | {share:.0%}"
            f" | {floor['psql_seconds']:.1f} s | {size(sum(floor['binary_bytes'].values()))} |"
        )
    return out


FLOOR_STEPS = (
    "silver.applicants",
    "silver.loan_applications",
    "gold.applicant_features",
    "gold.application_features",
    "gold.approval_rate_daily",
)


def transform_floor_section(results: list[SizeResult]) -> list[str]:
    """Render silver and gold against the same work as plain in-memory queries."""
    out = [
        "",
        "## Transforms against their floor",
        "",
        "Each step of ours (wall clock) against the same tables computed from the same"
        " inputs already in memory, as plain queries: no Delta reads or writes, no progress"
        " marks, no partitions, nothing written (`benchmarks/floors.py` says what each"
        " floor does). Silver's floor is Polars only (the rules exist in Polars); gold has"
        " one in DuckDB (the gold SQL) and one in Polars. *Ours / floor* divides by the"
        " faster floor; what is above 1 is the cost of Delta and of our bookkeeping.",
        "",
        "| rows (N) | step | ours | Polars floor | DuckDB floor | ours / floor |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in results:
        ours = r.ours.result if r.ours and r.ours.ok else {}
        floor = r.transform_floor.result if r.transform_floor and r.transform_floor.ok else {}
        if not ours or not floor:
            out.append(f"| {r.rows:,} | all | n/a | n/a | n/a | n/a |")
            continue
        totals = {"silver": [0.0, 0.0, 0.0], "gold": [0.0, 0.0, 0.0]}
        for step in FLOOR_STEPS:
            zone, name = step.split(".")
            mine = ours["steps"].get(step)
            if zone == "silver":
                polars, duck = floor["silver"]["seconds"][name], None
            else:
                polars = floor["gold_polars"]["seconds"][name]
                duck = floor["gold_duckdb"]["seconds"][name]
            best = min(x for x in (polars, duck) if x is not None)
            for i, value in enumerate((mine, polars, duck if duck is not None else polars)):
                totals[zone][i] += value or 0.0
            out.append(
                f"| {r.rows:,} | {step} | {mine:.2f} s | {polars:.2f} s"
                f" | {f'{duck:.2f} s' if duck is not None else '-'}"
                f" | {mine / best:.1f}x |"
            )
        for zone, (mine, polars, duck) in totals.items():
            best = min(polars, duck) if zone == "gold" else polars
            duck_text = f"{duck:.2f} s" if zone == "gold" else "-"
            out.append(
                f"| {r.rows:,} | **{zone}** | **{mine:.2f} s** | {polars:.2f} s | {duck_text}"
                f" | **{mine / best:.1f}x** |"
            )
        agree = [k for k in floor["counts"] if floor["counts"][k] == floor["ours"].get(k)]
        differ = [k for k in floor["counts"] if k not in agree]
        out += [
            "",
            f"Row counts, floor vs ours, at {r.rows:,}: {len(agree)} of {len(floor['counts'])}"
            " agree" + (f"; **differ: {', '.join(differ)}**" if differ else "") + ".",
            "",
        ]
    return out


def incremental_section(results: list[SizeResult]) -> list[str]:
    """Render the run after a few source changes beside the full run."""
    if not any(r.incremental for r in results):
        return []
    out = [
        "",
        "## An incremental run beside the full one",
        "",
        "After the full run, `lakehouse simulate --changes N` writes N changes (inserts,"
        " updates, deletes of both tables) and ours runs again on the same lakehouse: each"
        " step takes in only what changed where it can. Per step, seconds of the full run"
        " and of the incremental one.",
        "",
        "| rows (N) | changes (rows written) | step | full run | incremental | incremental /"
        " full |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for r in results:
        if not r.incremental or not r.ours or not r.ours.ok:
            continue
        if not r.incremental.ok:
            out.append(f"| {r.rows:,} | | failed | | | |")
            continue
        full, inc = r.ours.result, r.incremental.result
        simulated = inc["details"]["simulated"]
        for step, seconds in inc["steps"].items():
            before = full["steps"].get(step)
            share = f"{seconds / before:.1%}" if before else "n/a"
            before_text = f"{before:.2f} s" if before is not None else "n/a"
            out.append(
                f"| {r.rows:,} | {simulated['changes']:,} ({simulated['rows']:,}) | {step}"
                f" | {before_text} | {seconds:.2f} s | {share} |"
            )
        out.append(
            f"| {r.rows:,} | | **total** | **{full['seconds']:.1f} s** |"
            f" **{inc['seconds']:.1f} s** | {inc['seconds'] / full['seconds']:.1%} |"
        )
    return out


def compared_section(results: list[SizeResult]) -> list[str]:
    """Render `--compare`: ours at each commit, turn by turn, on the same seeded source."""
    out = [
        "",
        "## Commits compared in one run",
        "",
        "Ours at each commit on the same seeded source, in turns (each run from an empty"
        " warehouse; this checkout last in each turn). Wall clock and CPU seconds per stage;"
        " *vs this checkout* divides the commit's total by this checkout's in the same turn.",
        "",
        "| rows (N) | commit | turn | bronze | silver | gold | total | CPU total | ru_maxrss"
        " | load avg | vs this checkout |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        mine = {t: run for label, t, run in r.compared if label == "this checkout" and run.ok}
        for label, turn, run in r.compared:
            if not run.ok:
                out.append(f"| {r.rows:,} | {label} | {turn} | failed | | | | | | | |")
                continue
            ours = run.result
            stages, cpu = ours["stages"], ours["cpu_stages"]
            base = mine.get(turn)
            versus = (
                f"{ours['seconds'] / base.result['seconds']:.2f}x" if base is not None else "n/a"
            )
            out.append(
                f"| {r.rows:,} | {label} | {turn} | {stages['bronze']:.1f} s"
                f" | {stages['silver']:.1f} s | {stages['gold']:.1f} s | {ours['seconds']:.1f} s"
                f" | {sum(cpu.values()):.1f} s | {size(ours['max_rss'])} | {run.load_avg:.1f}"
                f" | {versus} |"
            )
    return out


def parse_rows(text: str) -> list[int]:
    """Parse `45000,1M,10_000_000` (k and M suffixes allowed)."""
    sizes = []
    for part in text.split(","):
        part = part.strip().replace("_", "").lower()
        scale = {"k": 1_000, "m": 1_000_000}.get(part[-1:], 1)
        number = part[:-1] if scale > 1 else part
        try:
            value = int(float(number) * scale)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad row count `{part}`") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"row count must be positive, not `{part}`")
        sizes.append(value)
    return sizes


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with a `_worker` first argument, one worker)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in WORKERS:
        return run_worker_cli(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows",
        type=parse_rows,
        default=list(DEFAULT_ROWS),
        help="comma-separated source sizes (default 45000,1000000,10000000)",
    )
    parser.add_argument("--skip-spark", action="store_true", help="measure only ours")
    parser.add_argument(
        "--skip-floors",
        action="store_true",
        help="no transform floors (they hold bronze and silver in memory: large at 30M)",
    )
    parser.add_argument(
        "--compare",
        default="",
        metavar="REV[,REV]",
        help="also run ours at these commits, in turns with this checkout, on the same source",
    )
    parser.add_argument("--turns", type=int, default=2, help="turns of --compare (default 2)")
    parser.add_argument(
        "--changes",
        type=int,
        default=2000,
        help="after the full run, this many source changes and an incremental run (0: none)",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS,
        help="folder for the Markdown report (default benchmarks/results)",
    )
    args = parser.parse_args(argv)
    # `kill <pid>` must still stop Postgres and remove the temporary folders (finally blocks).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = datetime.now(UTC)
    command = " ".join(["python", "benchmarks/batch.py", *argv])
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"batch-{started:%Y%m%d-%H%M%S}.md"
    library = git_state()
    results: list[SizeResult] = []
    wanted = [rev for rev in args.compare.split(",") if rev]
    with checkouts(wanted) as revisions:
        for rows in args.rows:
            results.append(
                run_size(
                    rows,
                    skip_spark=args.skip_spark,
                    revisions=revisions,
                    turns=args.turns,
                    changes=args.changes,
                    skip_floors=args.skip_floors,
                )
            )
            path.write_text(report(results, command, started, library))
            log(f"{rows:,} rows done; report so far in {path}")
    text = report(results, command, started, library)
    print(text)
    log(f"report written to {path}")
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
