"""Silver transforms: typing, latest-change-wins state and SCD type 2 versions."""

from __future__ import annotations

import polars as pl

# A delete sorts after an upsert stamped in the same microsecond.
_OP_RANK = pl.when(pl.col("_op") == "delete").then(1).otherwise(0)


def to_silver_types(frame: pl.DataFrame, table: str) -> pl.DataFrame:
    """Give validated rows their silver types (only after the rules have passed)."""
    if table == "applicants":
        return frame.with_columns(
            pl.col("previous_loan_defaults_on_file").replace_strict(
                {"Yes": True, "No": False}, default=None, return_dtype=pl.Boolean
            )
        )
    return frame


def ordered(changes: pl.DataFrame, key: str) -> pl.DataFrame:
    """Sort changes per key in source order: timestamp, then upsert before delete, then batch."""
    return (
        changes.with_columns(_rank=_OP_RANK)
        .sort([key, "_source_ts", "_rank", "_batch_id"])
        .drop("_rank")
    )


def latest(changes: pl.DataFrame, key: str) -> pl.DataFrame:
    """Keep each key's last change (an upsert or a delete): latest change wins."""
    return ordered(changes, key).unique(subset=[key], keep="last", maintain_order=True)


def scd2(changes: pl.DataFrame, key: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Turn changes into SCD2 rows: (new versions, closings of the versions they supersede).

    A version is valid from its `updated_at` until the key's next change (an update or a
    delete). `closings` has one row per key: `valid_to` for the key's open version in
    the existing history, which is the time of the key's first change here.
    """
    rows = ordered(changes, key).with_columns(
        valid_from=pl.col("_source_ts"),
        valid_to=pl.col("_source_ts").shift(-1).over(key),
    )
    versions = (
        rows.filter(pl.col("_op") == "upsert")
        .with_columns(is_current=pl.col("valid_to").is_null())
        .drop("_op", "_source_ts")
    )
    closings = rows.group_by(key, maintain_order=True).agg(_close_at=pl.col("_source_ts").first())
    return versions, closings
