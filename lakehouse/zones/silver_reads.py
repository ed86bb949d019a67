"""What a silver promotion reads: bronze input, the keys' prior state, the applicant context."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from deltalake import DeltaTable

from lakehouse.source import extract
from lakehouse.source.schema import TABLES
from lakehouse.storage import Storage
from lakehouse.transforms import changes as changes_t
from lakehouse.transforms import quality
from lakehouse.transforms import silver as transform
from lakehouse.transforms.partitions import in_part, key_part
from lakehouse.zones.bronze import bronze_schema, changes_table

# Bronze rows read per key partition of a large backlog (~1 GB per million rows).
PARTITION_ROWS = 1_500_000


@dataclass(frozen=True)
class Range:
    """The bronze input of one promotion.

    Batches in `(batch_from, batch_to]`, changes in `[changes_from, changes_to)`; None
    where that side has nothing to take.
    """

    batches: tuple[int, int] | None
    changes: tuple[int, int] | None


BronzeReader = Callable[[int, int], pl.DataFrame]
"""(partition, partitions) -> bronze batch rows of that key partition."""


def count_input(storage: Storage, table: str, span: Range) -> int:
    """How many bronze rows the promotion reads (sizes the key partitions)."""
    total = 0
    if span.batches is not None:
        after, upto = span.batches
        batch = pl.col("_batch_id")
        dt = storage.table("bronze", table)
        total += int(
            pl.scan_delta(dt)
            .filter((batch > after) & (batch <= upto))
            .select(pl.len())
            .collect()
            .item()
        )
    if span.changes is not None:
        after, upto = span.changes
        lsn = pl.col("_commit_lsn")
        dt = storage.table("bronze", changes_table(table))
        total += int(
            pl.scan_delta(dt)
            .filter((lsn >= after) & (lsn < upto))
            .select(pl.len())
            .collect()
            .item()
        )
    return total


def bronze_reader(
    storage: Storage, table: str, span: Range, parts: int, spool: Path | None
) -> BronzeReader:
    """Return a reader of one key partition's batch rows.

    With several partitions, one streaming pass over bronze splits the rows by key into
    local files (`spool`) instead of one full scan of bronze per partition.
    """
    key = TABLES[table].key
    if span.batches is None:
        empty = pl.from_arrow(bronze_schema(TABLES[table]).empty_table())
        assert isinstance(empty, pl.DataFrame)
        return lambda part, parts_: empty
    after, upto = span.batches
    dt = storage.table("bronze", table)
    batch = pl.col("_batch_id")
    rows = pl.scan_delta(dt).filter((batch > after) & (batch <= upto))
    if parts == 1 or spool is None:
        return lambda part, parts_: rows.filter(in_part(key, (part, parts_))).collect()
    rows.sink_parquet(
        pl.PartitionBy(
            spool,
            key=key_part(key, parts).alias("_part"),
            include_key=False,
        ),
        compression="lz4",
        maintain_order=False,
        mkdir=True,
    )
    schema = pl.scan_delta(dt).collect_schema()

    def read(part: int, parts_: int) -> pl.DataFrame:
        files = sorted((spool / f"_part={part}").glob("*.parquet"))
        return pl.read_parquet(files) if files else pl.DataFrame(schema=schema)

    return read


def _batch_truncates(storage: Storage, table: str, span: Range) -> pl.DataFrame:
    """Read the truncate markers among the batches (partition 0 has them already)."""
    assert span.batches is not None
    after, upto = span.batches
    batch = pl.col("_batch_id")
    dt = storage.table("bronze", table)
    return (
        pl.scan_delta(dt)
        .filter((batch > after) & (batch <= upto) & (pl.col("_op") == "truncate"))
        .collect()
    )


def read_changes(storage: Storage, table: str, span: Range, part: tuple[int, int]) -> pl.DataFrame:
    """One key partition's CDC change rows (truncates go to every partition)."""
    assert span.changes is not None
    after, upto = span.changes
    dt = storage.table("bronze", changes_table(table))
    lsn = pl.col("_commit_lsn")
    rows = pl.scan_delta(dt).filter((lsn >= after) & (lsn < upto))
    key = TABLES[table].key
    if part[1] > 1:
        rows = rows.filter(
            in_part(key, part) | in_part("_old_key", part) | (pl.col("_op") == "truncate")
        )
    return rows.collect()


def read_input(
    storage: Storage, table: str, span: Range, part: tuple[int, int], batches: BronzeReader
) -> pl.DataFrame:
    """One key partition of silver's input: batch rows and change rows, in WAL order."""
    key = TABLES[table].key
    frames = []
    if span.batches is not None:
        rows = batches(*part)
        if part[1] > 1 and part[0] > 0:  # a truncate (no key) concerns every partition
            rows = pl.concat([rows, _batch_truncates(storage, table, span)], how="diagonal_relaxed")
        frames.append(changes_t.from_batches(rows))
    if span.changes is not None:
        rows = changes_t.from_changes(read_changes(storage, table, span, part), table)
        if part[1] > 1:
            rows = rows.filter(in_part(key, part) | (pl.col("_op") == "truncate"))
        frames.append(rows)
    frames = [f for f in frames if f.height > 0]
    if not frames:  # only heartbeats since last time: still record the new position
        empty = pl.from_arrow(bronze_schema(TABLES[table]).empty_table())
        assert isinstance(empty, pl.DataFrame)
        return changes_t.from_batches(empty)
    raw = pl.concat(frames, how="diagonal_relaxed") if len(frames) > 1 else frames[0]
    return transform.ordered(raw, key)


@dataclass(frozen=True)
class Prior:
    """The keys' state before a promotion, as the lagging targets had it.

    `state` has, per key: `_prior_state` (good, bad), `_prior_image`, `_prior_instant`;
    `raw` the raw-typed values of the key's version (for unchanged-TOAST columns);
    `good` the keys' open history versions (silver's values), `rejects` their current
    reject rows (raw values).
    """

    state: pl.DataFrame
    raw: pl.DataFrame
    good: pl.DataFrame
    rejects: pl.DataFrame


def _scan(dt: DeltaTable | None) -> pl.LazyFrame | None:
    return None if dt is None else pl.scan_delta(dt)


def read_prior(
    table: str,
    tables: dict[str, DeltaTable | None],
    keys: pl.Series | None,
    part: tuple[int, int],
) -> Prior:
    """Read the prior state of `keys` (None: every key of the partition) from the targets.

    `tables` holds each target as of the promotion's start marks. A key is good when its
    history has an open version (which equals its current row), bad when it has a
    current reject.
    """
    key = TABLES[table].key
    source = TABLES[table].column_names

    def only(lazy: pl.LazyFrame) -> pl.LazyFrame:
        lazy = lazy.filter(in_part(key, part))
        return lazy if keys is None else lazy.filter(pl.col(key).is_in(keys.implode()))

    history_scan = _scan(tables["history"])
    rejected_scan = _scan(tables["rejected"])
    good = (
        pl.DataFrame(schema={key: pl.Int64})
        if history_scan is None
        else only(history_scan.filter(pl.col("valid_to").is_null())).collect()
    )
    rejects = (
        pl.DataFrame(schema={key: pl.Int64})
        if rejected_scan is None
        else only(rejected_scan.filter(pl.col("is_current"))).collect()
    )
    instants = []
    if history_scan is not None:
        instants.append(
            only(history_scan).select(key, _t=pl.max_horizontal("valid_from", "valid_to")).collect()
        )
    if rejected_scan is not None:
        instants.append(
            only(rejected_scan)
            .select(key, _t=pl.max_horizontal("valid_from", "valid_to"))
            .collect()
        )
    last = (
        pl.concat(instants).group_by(key).agg(_prior_instant=pl.col("_t").max())
        if instants
        else pl.DataFrame(schema={key: pl.Int64, "_prior_instant": pl.Datetime("us", "UTC")})
    )
    good_raw = transform.to_raw_types(good.select([c for c in source if c in good.columns]), table)
    bad_raw = rejects.select(
        [c for c in (*source, "_unrepresentable") if c in rejects.columns]
    ).filter(~pl.col(key).is_in(good_raw[key].implode()))
    raw = pl.concat([good_raw, bad_raw], how="diagonal_relaxed") if bad_raw.height else good_raw
    images = []
    for frame, label in ((good_raw, transform.GOOD), (bad_raw, transform.BAD)):
        if frame.height == 0:
            continue
        images.append(
            with_image(quality.clean(frame, table), table).select(
                key, _prior_state=pl.lit(label), _prior_image="_image"
            )
        )
    state = (
        pl.concat(images).unique(key, keep="first")
        if images
        else pl.DataFrame(
            schema={key: pl.Int64, "_prior_state": pl.Utf8, "_prior_image": pl.UInt64}
        )
    )
    state = state.join(last, on=key, how="full", coalesce=True)
    return Prior(state=state, raw=raw, good=good, rejects=rejects)


def with_image(clean: pl.DataFrame, table: str) -> pl.DataFrame:
    """Add `_image`, the hash of a row's clean values in the source's types.

    Equal images mean the same silver outcome: a batch row with its key's prior image
    repeats a version silver already holds.
    """
    types = {**extract.extracted_schema(TABLES[table])}
    columns = [*TABLES[table].column_names, "_unrepresentable"]
    values = [
        (pl.col(c) if c in clean.columns else pl.lit(None)).cast(types[c]).alias(c) for c in columns
    ]
    return clean.with_columns(_image=pl.struct(values).hash(seed=0))


def known_keys(prior: Prior, key: str) -> pl.Series:
    """Keys alive before the promotion: in silver, or a current reject."""
    return pl.concat([prior.good[key], prior.rejects[key]]).unique()
