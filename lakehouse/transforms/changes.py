"""Bronze rows (batches and CDC changes) turned into silver's input, in WAL order.

Silver's input is one row per key change: the source columns, `_op` (upsert, delete, or
truncate until expanded), the WAL position `_lsn`, `_seq`, `_source_ts` (when the
version dates from: data, never the order), `_batch_id`, `_stream`, `_repair`, and
`_unrepresentable`. Batch rows carry the position of their extraction snapshot (`_seq`
-1: before every change committed at that LSN), change rows their commit LSN and
position in the transaction, so both sort into one order.
"""

from __future__ import annotations

import polars as pl

from lakehouse.source.schema import TABLES
from lakehouse.transforms.quality import CLOCK_DRIFT, EARLIEST, LATEST

SILVER_POSITION = {"_lsn": pl.Int64(), "_seq": pl.Int64(), "_stream": pl.Boolean()}
_BRONZE_ONLY = ("_extract_mode", "_ingested_at", "_source_xid")


def plausible(ts: pl.Expr, seen: pl.Expr) -> pl.Expr:
    """Date a version by its own timestamp where plausible, else by when it was seen.

    A version is dated by its `updated_at`; one dated 9999, 1677, or later than it was
    seen is rejected by the rules, but its date would still push every later version of
    the key past it (a key's instants strictly increase). So such a row is dated by its
    commit (stream) or extraction (batch) instead.
    """
    ok = (ts >= EARLIEST) & (ts < LATEST) & (ts <= seen + CLOCK_DRIFT)
    return pl.when(ok).then(ts).otherwise(seen)


def from_batches(rows: pl.DataFrame) -> pl.DataFrame:
    """Give bronze batch rows their WAL position (before every change at the same LSN)."""
    ts = pl.col("_source_ts")
    if "_ingested_at" in rows.columns:
        ts = plausible(ts, pl.col("_ingested_at"))
    repair = (
        pl.col("_extract_mode") == "repair" if "_extract_mode" in rows.columns else pl.lit(False)
    )
    return (
        rows.rename({"_source_lsn": "_lsn"})
        .with_columns(
            _source_ts=ts,
            _seen_at=pl.col("_ingested_at")
            if "_ingested_at" in rows.columns
            else pl.lit(None, pl.Datetime("us", "UTC")),
            _seq=pl.lit(-1, pl.Int64),
            _stream=pl.lit(False),
            _repair=repair.fill_null(False),
            _synthetic=pl.lit(False),
            _old_key=pl.lit(None, pl.Int64),
            _unchanged=pl.lit(None, pl.List(pl.Utf8)),
        )
        .drop([c for c in _BRONZE_ONLY if c in rows.columns])
    )


def from_changes(changes: pl.DataFrame, table: str) -> pl.DataFrame:
    """Turn change rows into silver input rows (truncates stay as `_op` = truncate).

    An update that changes the key becomes a delete of the old key and an upsert of the
    new one, at the same position; the upsert keeps `_old_key`, so that unchanged-TOAST
    values are carried from the old key's version. Unchanged-TOAST columns stay listed
    in `_unchanged` until `carry_unchanged` fills them.
    """
    source = TABLES[table]
    key = source.key
    columns = [c for c in source.column_names if c in changes.columns]
    unheld = (
        pl.col("_unrepresentable")
        if "_unrepresentable" in changes.columns
        else pl.lit(None, pl.Utf8)
    )
    base = changes.select(
        *columns,
        pl.col("_op"),
        pl.col("_commit_lsn").alias("_lsn"),
        pl.col("_seq"),
        pl.col("_commit_lsn").alias("_batch_id"),
        pl.col("_commit_ts"),
        pl.col("_old_key"),
        pl.col("_unchanged"),
        unheld.alias("_unrepresentable"),
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
        _old_key=pl.lit(None, pl.Int64),
        _unchanged=pl.lit(None, pl.List(pl.Utf8)),
        _unrepresentable=pl.lit(None, pl.Utf8),
    )
    is_move = (pl.col("_op") == "update") & (pl.col("_old_key") != pl.col(key)).fill_null(False)
    rows = pl.concat([deletes_of_moved, base], how="vertical")
    is_delete = pl.col("_op") == "delete"
    ts = pl.col("updated_at") if "updated_at" in columns else pl.col("_commit_ts")
    return rows.with_columns(
        pl.when(is_delete).then(pl.coalesce(key, "_old_key")).otherwise(pl.col(key)).alias(key),
        _op=pl.when(pl.col("_op").is_in(["insert", "update"]))
        .then(pl.lit("upsert"))
        .otherwise(pl.col("_op")),
        # A delete happens at its commit; an upsert at the row's own `updated_at`.
        _source_ts=pl.when(is_delete)
        .then(pl.col("_commit_ts"))
        .otherwise(plausible(ts, pl.col("_commit_ts"))),
        _old_key=pl.when(is_move).then(pl.col("_old_key")),
        _seen_at=pl.col("_commit_ts"),
        _stream=pl.lit(True),
        _repair=pl.lit(False),
        _synthetic=pl.lit(False),
    ).drop("_commit_ts")


def expand_truncates(rows: pl.DataFrame, key: str, known: pl.Series) -> pl.DataFrame:
    """Replace each truncate by deletes of every key alive before it.

    `known` holds the keys alive before these rows (in silver or among its current
    rejects); keys upserted earlier in `rows` are added. A delete of a key that is
    already gone changes nothing downstream.
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
                _repair=pl.lit(False),
                _synthetic=pl.lit(False),
            )
        )
    return pl.concat([rows, *deletes], how="diagonal_relaxed")


def carry_unchanged(rows: pl.DataFrame, key: str, prior: pl.DataFrame) -> pl.DataFrame:
    """Fill unchanged-TOAST values from the version each change superseded.

    A change's predecessor is the previous row of its key here (in WAL order), or the
    key's version in `prior` (the raw values silver held before these rows); for the
    upsert of a key change, it is the old key's last version instead. Chains of
    unchanged values are followed to the last version that carried the value. `rows`
    must be sorted by key, then position.
    """
    if "_unchanged" not in rows.columns:
        return rows
    flagged = rows["_unchanged"].drop_nulls()
    names = sorted({name for names in flagged.to_list() for name in names})
    if not names:
        return rows.drop("_unchanged", "_old_key", strict=False)
    prior = prior.select([c for c in (key, *names) if c in prior.columns])
    # Prior versions sort first (position -1, -2): every change comes after them.
    base = prior.with_columns(
        _lsn=pl.lit(-1, pl.Int64),
        _seq=pl.lit(-2, pl.Int64),
        _op=pl.lit("upsert"),
        _old_key=pl.lit(None, pl.Int64),
        _unchanged=pl.lit(None, pl.List(pl.Utf8)),
        _prior=pl.lit(True),
    )
    tagged = rows.with_columns(_prior=pl.lit(False))
    both = (
        pl.concat([base, tagged], how="diagonal_relaxed")
        .sort(key, "_lsn", "_seq", maintain_order=True)
        .with_columns(_i=pl.int_range(pl.len(), dtype=pl.Int64))
    )
    # Predecessor: the previous row of the key (none after a delete), or for a key
    # change the old key's last row before this position.
    same_key_prev = pl.when(
        (pl.col(key) == pl.col(key).shift(1)) & (pl.col("_op").shift(1) == "upsert")
    ).then(pl.col("_i") - 1)
    both = both.with_columns(_pred=same_key_prev)
    moved = both.filter(pl.col("_old_key").is_not_null())
    if moved.height:
        rank = both.select(
            "_i", key, "_op", _pos=pl.struct("_lsn", "_seq").rank("dense").cast(pl.Int64)
        )
        left = (
            moved.select("_i", pl.col("_old_key").alias("_k"))
            .join(rank.select("_i", "_pos"), on="_i")
            .with_columns(_pos=pl.col("_pos") - 1)
            .sort("_pos")
        )
        right = rank.rename({key: "_k", "_i": "_from", "_op": "_from_op"}).sort("_pos")
        # Both sides are sorted by `_pos` as a whole, so within every `_k` too (Polars
        # cannot check that with `by`, and warns).
        found = left.join_asof(
            right, on="_pos", by="_k", strategy="backward", check_sortedness=False
        ).select("_i", _moved_from=pl.when(pl.col("_from_op") == "upsert").then(pl.col("_from")))
        both = (
            both.join(found, on="_i", how="left")
            .with_columns(
                _pred=pl.when(pl.col("_old_key").is_not_null())
                .then(pl.col("_moved_from"))
                .otherwise(pl.col("_pred"))
            )
            .drop("_moved_from")
            .sort("_i")
        )
    fills = []
    for name in names:
        missing = pl.col("_unchanged").list.contains(name).fill_null(False)
        source = pl.when(missing).then(pl.col("_pred")).otherwise(pl.col("_i"))
        fills.append(source.alias(f"_from_{name}"))
    both = both.with_columns(fills)
    for name in names:
        column = f"_from_{name}"
        # Pointer jumping: follow predecessors until a row that carries the value (a row
        # that carries it points at itself); a chain that ends without one gives null.
        jump = (
            pl.when(pl.col(column).is_null())
            .then(None)
            .otherwise(pl.col(column).gather(pl.col(column).fill_null(0)))
            .alias(column)
        )
        while True:
            jumped = both.select(jump)[column]
            if jumped.equals(both[column]):
                break
            both = both.with_columns(jumped)
        both = both.with_columns(
            pl.when(pl.col(column).is_null())
            .then(None)
            .otherwise(pl.col(name).gather(pl.col(column).fill_null(0)))
            .alias(name)
        )
    return (
        both.filter(~pl.col("_prior"))
        .drop("_prior", "_i", "_pred", "_unchanged", "_old_key", *[f"_from_{n}" for n in names])
        .select(rows.drop("_unchanged", "_old_key").columns)
    )
