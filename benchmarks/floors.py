"""Transform floors: silver and gold as plain in-memory queries, no Delta, no bookkeeping.

Ours promotes bronze to silver and builds gold through Delta: it reads and writes tables,
keeps progress marks, orders changes by WAL position, dates versions, drops repeats,
cuts big inputs into key partitions and commits each target. A floor computes the same
tables from the same inputs, already in memory (loaded before the clock starts), as
plain queries of one engine, and writes nothing:

- silver, Polars: the same cleaning and rules (`lakehouse.transforms.quality`), the
  applicant context the loan rules read, one sort per table in WAL order, current rows,
  history versions (`valid_to` = the key's next event) and rejects with their rules.
  There is no DuckDB silver floor: the rules exist in Polars (and in the Spark port).
- gold, DuckDB: the gold SQL of `lakehouse.transforms.gold` (the reference our Polars
  builds are held to), with the market rate as a RANGE window, over in-memory tables.
- gold, Polars: our own pure frames (`applicant_features_frame`, `submitted_frame`,
  `intent_rate_30d`) and `application_features`' joins as Polars as-of joins.

Each floor's row counts are compared with ours: a floor that did less work would not
be a floor. Ours minus the floor is what Delta and our bookkeeping cost.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

KEYS = {"applicants": "applicant_id", "loan_applications": "application_id"}
_WINDOW_US = 30 * 86_400 * 1_000_000

MARKET_SQL = f"""
SELECT application_id, applicant_id,
       avg(loan_int_rate) OVER (
           PARTITION BY loan_intent ORDER BY epoch_us(applied_at)
           RANGE BETWEEN {_WINDOW_US} PRECEDING AND 1 PRECEDING
       ) AS intent_rate_30d
FROM submitted
"""


def _cpu() -> float:
    times = os.times()
    return times.user + times.system


def _timed(out: dict[str, Any], name: str, work: Callable[[], Any]) -> Any:
    start, cpu = time.perf_counter(), _cpu()
    value = work()
    out["seconds"][name] = time.perf_counter() - start
    out["cpu"][name] = _cpu() - cpu
    return value


def silver_polars(bronze: Any, table: str, applicants: Any | None) -> dict[str, Any]:
    """Silver of one table from its bronze rows: current, history and rejects (Polars).

    `applicants` (the floor's own `applicants` current rows with `valid_from`) gives the
    loan rules their context, as `lakehouse.zones.silver_context.with_context` does.
    """
    import polars as pl

    from lakehouse.transforms import quality
    from lakehouse.transforms.changes import from_batches
    from lakehouse.transforms.silver import to_silver_types
    from lakehouse.zones.silver_context import join_context

    key = KEYS[table]
    bronze = from_batches(bronze)  # WAL position and plausible instants, as ours
    rows = quality.clean(bronze, table)
    if applicants is not None:
        rows = join_context(rows, applicants)
    rules = quality.RULES[table]
    flags = quality.failed_flags(rows, rules)
    bad = flags.select(pl.any_horizontal(pl.all())).to_series()
    rejects = bronze.filter(bad).hstack(quality.failed_rules(flags.filter(bad), rules))
    good = rows.filter(~bad).drop(quality.CONTEXT, strict=False)
    # WAL order per key; a key's next event closes its version.
    rank = pl.when(pl.col("_op") == "delete").then(0).otherwise(1)
    events = good.sort(key, "_lsn", "_seq", rank, "_source_ts")
    same_key = pl.col(key) == pl.col(key).shift(-1)
    events = events.with_columns(
        valid_from=pl.col("_source_ts"),
        valid_to=pl.when(same_key).then(pl.col("_source_ts").shift(-1)),
    ).with_columns(is_current=pl.col("valid_to").is_null())
    upserts = events.filter(pl.col("_op") == "upsert")
    history = to_silver_types(upserts, table)
    current = history.filter(pl.col("is_current"))
    return {"current": current, "history": history, "rejected": rejects}


def gold_duckdb(silver: dict[str, Any]) -> tuple[dict[str, int], dict[str, Any]]:
    """Build the three gold tables with their SQL in an in-memory DuckDB (empties `silver`)."""
    import duckdb

    from lakehouse.transforms.gold import (
        APPLICANT_FEATURES,
        APPLICATION_FEATURES,
        APPROVAL_RATE_DAILY,
        SUBMITTED,
    )

    out: dict[str, Any] = {"seconds": {}, "cpu": {}}
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    con.execute("SET preserve_insertion_order = false")
    # The inputs move into DuckDB's own tables (queries over registered Arrow tables ran
    # for minutes); each frame is dropped once copied, so the worker holds one copy.
    for name in list(silver):
        con.register(f"_{name}", silver.pop(name).to_arrow())
        con.execute(f"CREATE TABLE {name} AS SELECT * FROM _{name}")
        con.unregister(f"_{name}")
    steps = {
        "applicant_features": APPLICANT_FEATURES,
        "submitted": SUBMITTED,
        "market": MARKET_SQL,
        "application_features": APPLICATION_FEATURES,
        "approval_rate_daily": APPROVAL_RATE_DAILY,
    }
    for name, query in steps.items():
        _timed(out, name, lambda q=query, n=name: con.execute(f"CREATE TABLE {n} AS {q}"))
    counts = {
        n: int(con.execute(f"SELECT count(*) FROM {n}").fetchone()[0])  # type: ignore[index]
        for n in ("applicant_features", "application_features", "approval_rate_daily")
    }
    con.close()
    seconds, cpu = out["seconds"], out["cpu"]
    for part in ("submitted", "market"):  # application_features' derived relations
        seconds["application_features"] += seconds.pop(part)
        cpu["application_features"] += cpu.pop(part)
    return counts, out


def gold_polars(silver: dict[str, Any]) -> tuple[dict[str, int], dict[str, Any]]:
    """Build the three gold tables with Polars over in-memory frames; time each."""
    import polars as pl

    from lakehouse.transforms.gold import (
        applicant_features_frame,
        intent_rate_30d,
        submitted_frame,
    )

    out: dict[str, Any] = {"seconds": {}, "cpu": {}}
    lazy = {name: frame.lazy() for name, frame in silver.items()}
    people = _timed(out, "applicant_features", lambda: applicant_features_frame(lazy))

    def application_features() -> pl.DataFrame:
        submitted = submitted_frame(lazy)
        market = intent_rate_30d(submitted).select("application_id", "intent_rate_30d")
        versions = silver["applicants_history"].drop(
            "created_at",
            "updated_at",
            "valid_to",
            "is_current",
            "_batch_id",
            "_lsn",
            "_seq",
            "_seen_at",
        )
        history = people.select(
            "applicant_id",
            pl.col("event_timestamp").alias("history_at"),
            "application_count",
            "approved_count",
            "rejected_count",
            "mean_loan_amnt",
            pl.col("days_since_last_application").alias("days_since_last_at_history"),
        )
        joined = (
            silver["loan_applications"]
            .select("application_id", "loan_status")
            .join(submitted, on="application_id")
            .sort("applied_at")
            .join_asof(
                versions.sort("valid_from"),
                left_on="applied_at",
                right_on="valid_from",
                by="applicant_id",
                check_sortedness=False,  # sorted above, by time (Polars cannot check by group)
            )
            .join_asof(
                history.sort("history_at"),
                left_on="applied_at",
                right_on="history_at",
                by="applicant_id",
                check_sortedness=False,
            )
            .join(market, on="application_id", how="left")
        )
        score = pl.col("credit_score")
        band = (
            pl.when(score.is_null())
            .then(None)
            .when(score < 580)
            .then(pl.lit("poor"))
            .when(score < 670)
            .then(pl.lit("fair"))
            .when(score < 740)
            .then(pl.lit("good"))
            .when(score < 800)
            .then(pl.lit("very_good"))
            .otherwise(pl.lit("exceptional"))
        )
        elapsed = (pl.col("applied_at") - pl.col("history_at")).dt.total_microseconds()
        return joined.with_columns(
            event_timestamp=pl.col("applied_at"),
            loan_to_income=pl.col("loan_amnt") / pl.col("person_income"),
            rate_spread=pl.col("loan_int_rate") - pl.col("intent_rate_30d"),
            credit_score_band=band,
            days_since_last_application=pl.col("days_since_last_at_history") + elapsed / 86_400e6,
        ).drop("valid_from", "history_at", "days_since_last_at_history", "intent_rate_30d")

    apps = _timed(out, "application_features", application_features)
    daily = _timed(
        out,
        "approval_rate_daily",
        lambda: (
            silver["loan_applications"]
            .group_by(pl.col("applied_at").dt.date().alias("day"), "loan_intent")
            .agg(
                applications=pl.len(),
                decided=pl.col("loan_status").count(),
                approved=(pl.col("loan_status") == 1).sum(),
                event_timestamp=pl.col("applied_at").max(),
            )
            .with_columns(approval_rate=pl.col("approved") / pl.col("decided"))
        ),
    )
    counts = {
        "applicant_features": people.height,
        "application_features": apps.height,
        "approval_rate_daily": daily.height,
    }
    return counts, out


def worker_transform_floor(home: Path) -> dict[str, Any]:
    """Time the floors over the inputs ours read (bronze for silver, silver for gold)."""
    import polars as pl
    import pyarrow as pa
    import pyarrow.compute as pc

    from lakehouse.settings import Settings
    from lakehouse.storage import Storage

    storage = Storage.from_settings(Settings(home=home))

    def rows_of(zone: str, table: str) -> int:
        adds = pa.table(storage.table(zone, table).get_add_actions(flatten=True))
        return int(pc.sum(adds["num_records"]).as_py() or 0) if adds.num_rows else 0

    def load(zone: str, table: str) -> pl.DataFrame:
        return pl.read_delta(storage.uri(zone, table), storage_options=storage.options)

    result: dict[str, Any] = {"silver": {"seconds": {}, "cpu": {}}, "counts": {}, "ours": {}}
    # Silver: bronze in memory, then each table as one query (applicants first: the loan
    # rules read them).
    context: Any = None
    for table in KEYS:
        rows = load("bronze", table)
        targets = _timed(
            result["silver"], table, lambda r=rows, t=table, c=context: silver_polars(r, t, c)
        )
        if table == "applicants":
            context = targets["current"]
        for target, frame in targets.items():
            name = table if target == "current" else f"{table}_{target}"
            result["counts"][f"silver.{name}"] = frame.height
            result["ours"][f"silver.{name}"] = rows_of("silver", name)
        del rows, targets
    # Gold: our silver in memory (the floor's silver has the same rows: counts above).
    silver = {
        name: load("silver", name)
        for name in ("loan_applications", "applicants_history", "loan_applications_history")
    }
    # Polars first: the DuckDB floor takes the frames over (and drops them).
    for engine, build in (("polars", gold_polars), ("duckdb", gold_duckdb)):
        counts, times = build(silver)
        result[f"gold_{engine}"] = times
        for name, count in counts.items():
            result["counts"][f"gold.{name} ({engine})"] = count
            result["ours"][f"gold.{name} ({engine})"] = rows_of("gold", name)
    return result
