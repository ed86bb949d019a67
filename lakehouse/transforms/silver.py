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
    """Sort changes per key in source order.

    WAL position first (`_lsn`, `_seq`: a batch's extraction snapshot, or a change's
    commit); within one batch, timestamp, then upsert before delete, then batch.
    """
    by = [key, "_source_ts", "_rank", "_batch_id"]
    if "_lsn" in changes.columns:
        by[1:1] = ["_lsn", "_seq"]
    return changes.with_columns(_rank=_OP_RANK).sort(by, nulls_last=False).drop("_rank")


def _last_of_key(key: str) -> pl.Expr:
    """On rows sorted by key: true for each key's last row."""
    return pl.col(key) != pl.col(key).shift(-1).fill_null(pl.col(key) + 1)


def latest(changes: pl.DataFrame, key: str, *, is_ordered: bool = False) -> pl.DataFrame:
    """Keep each key's last change (an upsert or a delete): latest change wins."""
    rows = changes if is_ordered else ordered(changes, key)
    return rows.filter(_last_of_key(key))


def scd2(
    changes: pl.DataFrame, key: str, *, is_ordered: bool = False
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Turn changes into SCD2 rows: (new versions, closings of the versions they supersede).

    A version is valid from its `updated_at` until the key's next change (an update or a
    delete). `closings` has one row per key: `valid_to` for the key's open version in
    the existing history, which is the time of the key's first change here.
    """
    # Sorted by key, so "the key's next change" is the next row when it has the same key
    # (cheaper than a window over millions of one-row groups).
    rows = (changes if is_ordered else ordered(changes, key)).with_columns(
        valid_from=pl.col("_source_ts"),
        valid_to=pl.when(_last_of_key(key)).then(None).otherwise(pl.col("_source_ts").shift(-1)),
    )
    versions = (
        rows.filter(pl.col("_op") == "upsert")
        .with_columns(is_current=pl.col("valid_to").is_null())
        .drop("_op", "_source_ts")
    )
    first = pl.col(key) != pl.col(key).shift(1).fill_null(pl.col(key) - 1)
    closings = rows.filter(first).select(key, _close_at=pl.col("_source_ts"))
    return versions, closings
