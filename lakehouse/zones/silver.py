"""Silver: validated current state (MERGE), SCD2 history and rejects, promoted incrementally."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import polars as pl
import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, write_deltalake

from lakehouse.errors import TableNotFoundError
from lakehouse.failpoints import failpoint
from lakehouse.source.schema import TABLES
from lakehouse.storage import Storage
from lakehouse.transforms import quality
from lakehouse.transforms import silver as transform
from lakehouse.zones.bronze import watermark
from lakehouse.zones.commits import app_id, commit_properties, recorded

# Order matters only for speed of recovery; each target records its own progress.
TARGETS = ("rejected", "history", "current")
_BATCH_ROWS = 100_000


def target_name(table: str, target: str) -> str:
    """Return the silver table name of one target: `applicants`, `applicants_history`, ..."""
    return table if target == "current" else f"{table}_{target}"


@dataclass
class PromoteResult:
    """What one promotion wrote, per target table."""

    table: str
    upto_batch: int | None
    rows: dict[str, int] = field(default_factory=dict)
    rejects_by_rule: dict[str, int] = field(default_factory=dict)


def progress(storage: Storage, table: str) -> dict[str, int | None]:
    """Return the last bronze batch each silver target of `table` has taken in."""
    return {
        target: recorded(
            storage.table_or_none("silver", target_name(table, target)),
            app_id("silver", target_name(table, target), f"bronze.{table}"),
        )
        for target in TARGETS
    }


def is_current(storage: Storage, table: str) -> bool:
    """Tell whether every silver target of `table` has taken in the last bronze batch (cheap)."""
    last = watermark(storage, table)
    return last is not None and all(v == last for v in progress(storage, table).values())


def promote(storage: Storage, table: str) -> PromoteResult:
    """Promote the bronze batches after each target's last one; a rerun is a no-op."""
    last = watermark(storage, table)
    result = PromoteResult(table, last)
    if last is None:
        return result
    done = progress(storage, table)
    if all(v == last for v in done.values()):
        return result
    key = TABLES[table].key
    start = min(v if v is not None else -1 for v in done.values())
    raw = _read_bronze(storage, table, after=start, upto=last)
    known = None
    if table == "loan_applications":
        known = ("applicant_id", _current_keys(storage, "applicants", "applicant_id"))
    good, rejected = quality.validate(
        quality.clean(raw, table), quality.RULES[table], known_keys=known, raw=raw
    )
    good = transform.to_silver_types(good, table)
    lineage_drop = ["_source_watermark", "_extract_mode", "_ingested_at"]
    good = good.drop(lineage_drop)

    def since(frame: pl.DataFrame, target: str) -> pl.DataFrame:
        after = done[target]
        return frame if after is None else frame.filter(pl.col("_batch_id") > after)

    for target in TARGETS:
        if done[target] == last:
            continue
        name = target_name(table, target)
        props = commit_properties(
            {app_id("silver", name, f"bronze.{table}"): last},
            operation=f"promote-{target}",
            metadata={
                "lakehouse.bronze_batch_from": str(done[target]),
                "lakehouse.bronze_batch_to": str(last),
            },
        )
        if target == "rejected":
            frame = since(rejected, target).with_columns(
                _rejected_at=pl.lit(datetime.now(UTC)).cast(pl.Datetime("us", "UTC"))
            )
            result.rejects_by_rule = dict(frame.group_by("_rule").len().sort("_rule").iter_rows())
            _append(storage, name, frame, props)
        elif target == "history":
            versions, closings = transform.scd2(since(good, target), key)
            _merge_history(storage, name, key, versions, closings, props)
            frame = versions
        else:
            frame = transform.latest(since(good, target), key)
            _merge_current(storage, name, key, frame, props)
        result.rows[name] = frame.height
    return result


def _read_bronze(storage: Storage, table: str, *, after: int, upto: int) -> pl.DataFrame:
    dt = storage.table("bronze", table)
    return (
        pl.scan_delta(dt)
        .filter((pl.col("_batch_id") > after) & (pl.col("_batch_id") <= upto))
        .collect()
    )


def _current_keys(storage: Storage, table: str, key: str) -> pl.Series:
    dt = storage.table_or_none("silver", table)
    if dt is None:
        return pl.Series(key, [], dtype=pl.Int64)
    return pl.scan_delta(dt).select(key).collect()[key]


def _stream(frame: pl.DataFrame, name: str) -> pa.RecordBatchReader:
    """Hand a frame to delta-rs as a stream, with a failpoint after its first batch."""
    table = frame.to_arrow()

    def batches() -> Iterator[pa.RecordBatch]:
        chunks = table.to_batches(max_chunksize=_BATCH_ROWS)
        for i, batch in enumerate(chunks):
            yield batch
            if i == 0:
                failpoint(f"silver.{name}.mid-write")
        if not chunks:
            failpoint(f"silver.{name}.mid-write")

    return pa.RecordBatchReader.from_batches(table.schema, batches())


def _append(storage: Storage, name: str, frame: pl.DataFrame, props: CommitProperties) -> None:
    write_deltalake(
        storage.uri("silver", name),
        _stream(frame, name),
        mode="append",
        storage_options=storage.options,
        commit_properties=props,
    )


def _merge_current(
    storage: Storage, name: str, key: str, latest: pl.DataFrame, props: CommitProperties
) -> None:
    dt = storage.table_or_none("silver", name)
    if dt is None:
        rows = latest.filter(pl.col("_op") == "upsert").drop("_op", "_source_ts")
        _append(storage, name, rows, props)
        return
    source = latest.drop("_source_ts")
    (
        dt.merge(
            _stream(source, name),
            predicate=f's."{key}" = t."{key}"',
            source_alias="s",
            target_alias="t",
            commit_properties=props,
        )
        .when_matched_delete(predicate="s._op = 'delete'")
        .when_matched_update_all(
            predicate="s._op = 'upsert' AND s.updated_at >= t.updated_at", except_cols=["_op"]
        )
        .when_not_matched_insert_all(predicate="s._op = 'upsert'", except_cols=["_op"])
        .execute()
    )


def _merge_history(
    storage: Storage,
    name: str,
    key: str,
    versions: pl.DataFrame,
    closings: pl.DataFrame,
    props: CommitProperties,
) -> None:
    dt = storage.table_or_none("silver", name)
    if dt is None:
        _append(storage, name, versions, props)
        return
    # One MERGE closes the open versions (rows with `_close_key`) and inserts the new ones
    # (rows without), so history never shows two open versions of a key.
    close_rows = closings.select(pl.col(key).alias("_close_key"), pl.col("_close_at"))
    new_rows = versions.with_columns(
        _close_key=pl.lit(None, pl.Int64), _close_at=pl.lit(None, pl.Datetime("us", "UTC"))
    )
    source = pl.concat([new_rows, close_rows], how="diagonal_relaxed")
    (
        dt.merge(
            _stream(source, name),
            predicate=f't."{key}" = s._close_key AND t.valid_to IS NULL',
            source_alias="s",
            target_alias="t",
            commit_properties=props,
        )
        .when_matched_update({"valid_to": "s._close_at", "is_current": "false"})
        .when_not_matched_insert_all(
            predicate="s._close_key IS NULL", except_cols=["_close_key", "_close_at"]
        )
        .execute()
    )


def table_or_raise(storage: Storage, name: str) -> DeltaTable:
    """Open `silver.<name>`, raising a clear error if it was never built."""
    dt = storage.table_or_none("silver", name)
    if dt is None:
        msg = f"table `silver.{name}` does not exist yet; run `lakehouse run`"
        raise TableNotFoundError(msg)
    return dt
