"""CDC change rows (`bronze.<table>_changes`) turned into silver's input, in WAL order.

Silver's input is one row per key change: the source columns, `_op` (upsert or
delete), `_source_ts`, `_batch_id`, and the WAL position `_lsn`, `_seq`. Batch rows
carry the position of their extraction snapshot (`_seq` -1), change rows their commit
LSN and position in the transaction, so both sort into one order.
"""

from __future__ import annotations

import polars as pl

from lakehouse.source.schema import TABLES

SILVER_POSITION = {"_lsn": pl.Int64(), "_seq": pl.Int64(), "_stream": pl.Boolean()}


def from_batches(rows: pl.DataFrame) -> pl.DataFrame:
    """Give bronze batch rows their WAL position (before every change at the same LSN)."""
    return rows.rename({"_source_lsn": "_lsn"}).with_columns(
        _seq=pl.lit(-1, pl.Int64),
        _stream=pl.lit(False),
    )


def from_changes(changes: pl.DataFrame, table: str) -> pl.DataFrame:
    """Turn change rows into silver input rows (truncates stay as `_op` = truncate).

    An update that changes the key becomes a delete of the old key and an upsert of the
    new one, at the same position. Unchanged-TOAST columns stay listed in `_unchanged`
    until `carry_unchanged` fills them.
    """
    source = TABLES[table]
    key = source.key
    columns = [c for c in source.column_names if c in changes.columns]
    base = changes.select(
        *columns,
        pl.col("_op"),
        pl.col("_commit_lsn").alias("_lsn"),
        pl.col("_seq"),
        pl.col("_commit_lsn").alias("_batch_id"),
        pl.col("_commit_ts"),
        pl.col("_old_key"),
        pl.col("_unchanged"),
    )
    moved = base.filter(
        (pl.col("_op") == "update")
        & pl.col("_old_key").is_not_null()
        & (pl.col("_old_key") != pl.col(key))
    )
    deletes_of_moved = moved.with_columns(
        pl.col("_old_key").alias(key),
        *[pl.lit(None, changes.schema[c]).alias(c) for c in columns if c != key],
        _op=pl.lit("delete"),
        _unchanged=pl.lit(None, pl.List(pl.Utf8)),
    )
    rows = pl.concat([deletes_of_moved, base], how="vertical")
    is_delete = pl.col("_op") == "delete"
    ts = pl.col("updated_at") if "updated_at" in columns else pl.col("_commit_ts")
    return rows.with_columns(
        pl.when(is_delete).then(pl.coalesce(key, "_old_key")).otherwise(pl.col(key)).alias(key),
        _op=pl.when(pl.col("_op").is_in(["insert", "update"]))
        .then(pl.lit("upsert"))
        .otherwise(pl.col("_op")),
        # A delete happens at its commit; an upsert at the row's own `updated_at`.
        _source_ts=pl.when(is_delete | ts.is_null()).then(pl.col("_commit_ts")).otherwise(ts),
        _stream=pl.lit(True),
    ).drop("_commit_ts", "_old_key")


def expand_truncates(rows: pl.DataFrame, key: str, known: pl.Series) -> pl.DataFrame:
    """Replace each truncate by deletes of every key alive before it.

    `known` holds the keys of the current silver state; keys upserted earlier in `rows`
    are added. A delete of a key that is already gone changes nothing downstream.
    """
    truncates = rows.filter(pl.col("_op") == "truncate")
    rows = rows.filter(pl.col("_op") != "truncate")
    if truncates.height == 0:
        return rows
    deletes = []
    for lsn, seq, ts, batch in truncates.select(
        "_lsn", "_seq", "_source_ts", "_batch_id"
    ).iter_rows():
        earlier = rows.filter(
            (pl.col("_lsn") < lsn) | ((pl.col("_lsn") == lsn) & (pl.col("_seq") < seq))
        )[key]
        keys = pl.concat([known.cast(pl.Int64), earlier.cast(pl.Int64)]).unique()
        deletes.append(
            pl.DataFrame({key: keys}).with_columns(
                _op=pl.lit("delete"),
                _lsn=pl.lit(lsn, pl.Int64),
                _seq=pl.lit(seq, pl.Int64),
                _source_ts=pl.lit(ts, rows.schema["_source_ts"]),
                _batch_id=pl.lit(batch, pl.Int64),
                _stream=pl.lit(True),
            )
        )
    return pl.concat([rows, *deletes], how="diagonal_relaxed")


def carry_unchanged(rows: pl.DataFrame, key: str, previous: pl.DataFrame) -> pl.DataFrame:
    """Fill unchanged-TOAST values from the key's previous version.

    The previous version is the key's last earlier row here (in WAL order), or else its
    row in `previous` (the current silver state). `rows` must be sorted by key, then
    position.
    """
    if "_unchanged" not in rows.columns:
        return rows
    flagged = rows["_unchanged"].drop_nulls()
    if flagged.len() == 0:
        return rows.drop("_unchanged")
    names = sorted({name for names in flagged.to_list() for name in names})
    index = pl.int_range(pl.len(), dtype=pl.Int64)
    fills = []
    for name in names:
        missing = pl.col("_unchanged").list.contains(name).fill_null(False)
        source_row = pl.when(~missing).then(index).forward_fill().over(key)
        fills.append(source_row.alias(f"_from_{name}"))
    rows = rows.with_columns(fills)
    if key not in previous.columns:
        previous = rows.clear().select(key, *names)
    carried = previous.select(key, *[pl.col(n).alias(f"_prev_{n}") for n in names])
    rows = rows.join(carried, on=key, how="left", maintain_order="left")
    return rows.with_columns(
        [
            pl.when(pl.col("_unchanged").list.contains(name).fill_null(False))
            .then(
                pl.when(pl.col(f"_from_{name}").is_null())
                .then(pl.col(f"_prev_{name}"))
                .otherwise(pl.col(name).gather(pl.col(f"_from_{name}").fill_null(0)))
            )
            .otherwise(pl.col(name))
            .alias(name)
            for name in names
        ]
    ).drop("_unchanged", *[f"_from_{n}" for n in names], *[f"_prev_{n}" for n in names])
