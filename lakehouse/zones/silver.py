"""Silver: validated current state (MERGE), SCD2 history and rejects, promoted incrementally."""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, write_deltalake

from lakehouse.failpoints import failpoint
from lakehouse.source.schema import TABLES
from lakehouse.storage import Storage
from lakehouse.transforms import changes as changes_t
from lakehouse.transforms import quality
from lakehouse.transforms import silver as transform
from lakehouse.zones.bronze import bronze_schema, changes_landed, changes_table, watermark
from lakehouse.zones.commits import app_id, commit_properties, recorded
from lakehouse.zones.datafiles import TableFiles

# Order matters only for speed of recovery; each target records its own progress.
TARGETS = ("rejected", "history", "current")
_BATCH_ROWS = 100_000
# Bronze rows promoted per key partition: bounds memory (~1 GB per million rows).
_PARTITION_ROWS = 1_500_000
_BRONZE_ONLY = ["_source_watermark", "_extract_mode", "_ingested_at"]


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


def changes_progress(storage: Storage, table: str) -> dict[str, int | None]:
    """Return, per silver target, the LSN below which it has taken in every CDC change."""
    return {
        target: recorded(
            storage.table_or_none("silver", target_name(table, target)),
            app_id("silver", target_name(table, target), f"bronze.{changes_table(table)}"),
        )
        for target in TARGETS
    }


def changes_upto(storage: Storage, table: str) -> int | None:
    """Return the LSN below which CDC changes of `table` may be promoted (None: no CDC).

    That is the end of the last transaction fully landed in `bronze.<table>_changes`.
    Loan applications are also held below what `silver.applicants` has taken in, so an
    application never arrives before the applicant it references (one LSN cut).
    """
    flushed = changes_landed(storage, table)
    if flushed is None:
        return None
    if table == "loan_applications" and changes_landed(storage, "applicants") is not None:
        flushed = min(flushed, changes_progress(storage, "applicants")["current"] or 0)
    return flushed


def is_current(storage: Storage, table: str) -> bool:
    """Tell whether every silver target of `table` has taken in all landed bronze (cheap)."""
    last = watermark(storage, table)
    upto = changes_upto(storage, table)
    if last is None and upto is None:
        return False
    batches_done = last is None or all(v == last for v in progress(storage, table).values())
    changes_done = upto is None or all(
        (v or 0) >= upto for v in changes_progress(storage, table).values()
    )
    return batches_done and changes_done


def promote(storage: Storage, table: str) -> PromoteResult:
    """Promote the bronze batches and CDC changes each target has not taken in yet.

    Batch rows and change rows are merged in WAL order (`_lsn`, `_seq`); a rerun is a
    no-op. A large backlog (a first load of millions of rows) is processed in key
    partitions of about `_PARTITION_ROWS` rows, spooled to local Parquet, then written to
    each target in one commit: memory stays bounded by a partition, and each target
    still changes atomically.
    """
    last = watermark(storage, table)
    upto = changes_upto(storage, table)
    result = PromoteResult(table, last)
    if last is None and upto is None:
        return result
    done = progress(storage, table)
    done_lsn = changes_progress(storage, table)
    pending = [
        t
        for t in TARGETS
        if (last is not None and done[t] != last)
        or (upto is not None and (done_lsn[t] or 0) < upto)
    ]
    if not pending:
        return result
    key = TABLES[table].key
    start = min(v if v is not None else -1 for v in done.values())
    start_lsn = min(v or 0 for v in done_lsn.values())
    existing = {t: storage.table_or_none("silver", target_name(table, t)) for t in pending}
    known = None
    if table == "loan_applications":
        known = ("applicant_id", _current_keys(storage, "applicants", "applicant_id"))
    total = 0
    if last is not None and start < last:
        total += _count_bronze(storage, table, after=start, upto=last)
    if upto is not None and start_lsn < upto:
        total += _count_changes(storage, table, start_lsn, upto)
    parts = max(1, -(-total // _PARTITION_ROWS))
    rejects: Counter[str] = Counter()
    # A target that does not exist yet (a first load) gets Parquet files from Polars and
    # one creating commit; the others are spooled, then appended or merged by delta-rs.
    created = {
        t: TableFiles(storage, "silver", target_name(table, t))
        for t in pending
        if existing[t] is None
    }
    spilled = [t for t in pending if t not in created]
    with _Spool(spill=parts > 1 and bool(spilled)) as spool:
        bronze_rows: _BronzeReader = _read_bronze
        if last is not None and start < last and parts > 1:
            spool.ensure_dir()
            # One pass over bronze, split by key into local files, instead of one full
            # scan of bronze per partition.
            bronze_rows = _split_bronze(storage, table, start, last, parts, spool.path("bronze"))
        for part in range(parts):
            raw = _read_input(
                storage,
                table,
                batches=(start, last) if last is not None and start < last else None,
                changes=(start_lsn, upto) if upto is not None and start_lsn < upto else None,
                part=(part, parts),
                bronze_rows=bronze_rows,
            )
            good, rejected = quality.validate(
                quality.clean(raw, table), quality.RULES[table], known_keys=known, raw=raw
            )
            del raw  # at millions of rows, every frame held on to counts
            # Sorted once; history and current state both read the same order.
            good = transform.ordered(
                transform.to_silver_types(good.drop(_BRONZE_ONLY, strict=False), table), key
            )
            for target in pending:
                rows = good if target != "rejected" else rejected
                rows = rows.filter(_not_taken(done[target], done_lsn[target])).drop("_stream")
                out, count = _prepare(target, rows, key, exists=existing[target] is not None)
                if target == "rejected":
                    rejects.update(dict(out.group_by("_rule").len().iter_rows()))
                if target in created:
                    created[target].add(out)
                else:
                    spool.add(target, out)
                name = target_name(table, target)
                result.rows[name] = result.rows.get(name, 0) + count
        for target in pending:
            name = target_name(table, target)
            marks = {}
            if last is not None:
                marks[app_id("silver", name, f"bronze.{table}")] = last
            if upto is not None:
                marks[app_id("silver", name, f"bronze.{changes_table(table)}")] = upto
            props = commit_properties(
                marks,
                operation=f"promote-{target}",
                metadata={
                    "lakehouse.bronze_batch_from": str(done[target]),
                    "lakehouse.bronze_batch_to": str(last),
                    "lakehouse.bronze_lsn_from": str(done_lsn[target]),
                    "lakehouse.bronze_lsn_to": str(upto),
                },
            )
            if target in created:
                created[target].commit(props, failpoint_name=f"silver.{name}.mid-write")
                continue
            source = spool.reader(target, failpoint_name=f"silver.{name}.mid-write")
            dt = existing[target]
            if dt is None or target == "rejected":
                write_deltalake(
                    storage.uri("silver", name),
                    source,
                    mode="append",
                    schema_mode="merge",
                    storage_options=storage.options,
                    commit_properties=props,
                )
            elif target == "history":
                _merge_history(dt, key, source, props)
            else:
                _merge_current(dt, key, source, props)
    result.rejects_by_rule = dict(sorted(rejects.items()))
    return result


def _not_taken(batch: int | None, lsn: int | None) -> pl.Expr:
    """Rows a target has not taken in yet: later batches, or changes at or after `lsn`."""
    from_batches = pl.col("_batch_id") > (batch if batch is not None else -1)
    from_changes = pl.col("_lsn") >= (lsn or 0)
    return pl.when(pl.col("_stream")).then(from_changes).otherwise(from_batches)


def _read_input(
    storage: Storage,
    table: str,
    *,
    batches: tuple[int, int] | None,
    changes: tuple[int, int] | None,
    part: tuple[int, int],
    bronze_rows: _BronzeReader,
) -> pl.DataFrame:
    """Read one key partition of silver's input: batch rows and change rows, in WAL order."""
    key = TABLES[table].key
    frames = []
    if batches is not None:
        after, upto = batches
        frames.append(
            changes_t.from_batches(bronze_rows(storage, table, after=after, upto=upto, part=part))
        )
    if changes is not None:
        rows = changes_t.from_changes(_read_changes(storage, table, changes, part), table)
        index, parts = part
        if parts > 1:
            rows = rows.filter(
                (pl.col(key).fill_null(0) % parts == index) | (pl.col("_op") == "truncate")
            )
        frames.append(rows)
    frames = [f for f in frames if f.height > 0]
    if not frames:  # only heartbeats since last time: still record the new position
        empty = pl.from_arrow(bronze_schema(TABLES[table]).empty_table())
        assert isinstance(empty, pl.DataFrame)
        return changes_t.from_batches(empty)
    raw = pl.concat(frames, how="diagonal_relaxed") if len(frames) > 1 else frames[0]
    if not (raw["_op"] == "truncate").any() and "_unchanged" not in raw.columns:
        return raw
    raw = transform.ordered(raw, key)
    if (raw["_op"] == "truncate").any():
        index, parts = part
        keys = _current_keys(storage, table, key)
        if parts > 1:
            keys = keys.filter(keys % parts == index)
        raw = transform.ordered(changes_t.expand_truncates(raw, key, keys), key)
    current = storage.table_or_none("silver", table)
    previous = pl.DataFrame() if current is None else _current_rows(current, raw, key)
    return changes_t.carry_unchanged(raw, key, previous)


def _current_rows(dt: DeltaTable, rows: pl.DataFrame, key: str) -> pl.DataFrame:
    """Return the current silver rows of the keys that have unchanged-TOAST values."""
    if "_unchanged" not in rows.columns:
        return pl.DataFrame()
    keys = rows.filter(pl.col("_unchanged").is_not_null())[key].unique()
    return pl.scan_delta(dt).filter(pl.col(key).is_in(keys.implode())).collect()


def _count_changes(storage: Storage, table: str, after: int, upto: int) -> int:
    dt = storage.table("bronze", changes_table(table))
    lsn = pl.col("_commit_lsn")
    return int(
        pl.scan_delta(dt).filter((lsn >= after) & (lsn < upto)).select(pl.len()).collect().item()
    )


def _read_changes(
    storage: Storage, table: str, window: tuple[int, int], part: tuple[int, int]
) -> pl.DataFrame:
    dt = storage.table("bronze", changes_table(table))
    after, upto = window
    lsn = pl.col("_commit_lsn")
    rows = pl.scan_delta(dt).filter((lsn >= after) & (lsn < upto))
    index, parts = part
    if parts > 1:
        key = pl.col(TABLES[table].key)
        rows = rows.filter(
            (key.fill_null(0) % parts == index)
            | (pl.col("_old_key").fill_null(0) % parts == index)
            | (pl.col("_op") == "truncate")
        )
    return rows.collect()


def _prepare(
    target: str, rows: pl.DataFrame, key: str, *, exists: bool
) -> tuple[pl.DataFrame, int]:
    """Return what to write to one target (and how many rows that is, for the report)."""
    if target == "rejected":
        out = rows.with_columns(
            _rejected_at=pl.lit(datetime.now(UTC)).cast(pl.Datetime("us", "UTC"))
        )
        return out, out.height
    if target == "history":
        versions, closings = transform.scd2(rows, key, is_ordered=True)
        if not exists:
            return versions, versions.height
        # One MERGE closes the open versions (rows with `_close_key`) and inserts the new
        # ones (rows without), so history never shows two open versions of a key.
        close_rows = closings.select(pl.col(key).alias("_close_key"), pl.col("_close_at"))
        new_rows = versions.with_columns(
            _close_key=pl.lit(None, pl.Int64), _close_at=pl.lit(None, pl.Datetime("us", "UTC"))
        )
        return pl.concat([new_rows, close_rows], how="diagonal_relaxed"), versions.height
    latest = transform.latest(rows, key, is_ordered=True)
    if not exists:
        return latest.filter(pl.col("_op") == "upsert").drop("_op", "_source_ts"), latest.height
    return latest.drop("_source_ts"), latest.height


def _count_bronze(storage: Storage, table: str, *, after: int, upto: int) -> int:
    dt = storage.table("bronze", table)
    batch = pl.col("_batch_id")
    return int(
        pl.scan_delta(dt)
        .filter((batch > after) & (batch <= upto))
        .select(pl.len())
        .collect()
        .item()
    )


def _read_bronze(
    storage: Storage, table: str, *, after: int, upto: int, part: tuple[int, int]
) -> pl.DataFrame:
    dt = storage.table("bronze", table)
    batch = pl.col("_batch_id")
    rows = pl.scan_delta(dt).filter((batch > after) & (batch <= upto))
    index, parts = part
    if parts > 1:
        rows = rows.filter(pl.col(TABLES[table].key).fill_null(0) % parts == index)
    return rows.collect()


class _BronzeReader(Protocol):
    def __call__(
        self, storage: Storage, table: str, *, after: int, upto: int, part: tuple[int, int]
    ) -> pl.DataFrame: ...


def _split_bronze(
    storage: Storage, table: str, after: int, upto: int, parts: int, folder: Path
) -> _BronzeReader:
    """Split bronze batches `after < _batch_id <= upto` by key into `parts` local files.

    One streaming scan of bronze; returns a reader of one part's rows.
    """
    dt = storage.table("bronze", table)
    batch = pl.col("_batch_id")
    (
        pl.scan_delta(dt)
        .filter((batch > after) & (batch <= upto))
        .sink_parquet(
            pl.PartitionBy(
                folder,
                key=(pl.col(TABLES[table].key).fill_null(0) % parts).alias("_part"),
                include_key=False,
            ),
            compression="lz4",
            maintain_order=False,
            mkdir=True,
        )
    )
    schema = pl.scan_delta(dt).collect_schema()

    def read(
        storage: Storage, table: str, *, after: int, upto: int, part: tuple[int, int]
    ) -> pl.DataFrame:
        files = sorted((folder / f"_part={part[0]}").glob("*.parquet"))
        if not files:
            return pl.DataFrame(schema=schema)
        return pl.read_parquet(files)

    return read


def _current_keys(storage: Storage, table: str, key: str) -> pl.Series:
    dt = storage.table_or_none("silver", table)
    if dt is None:
        return pl.Series(key, [], dtype=pl.Int64)
    return pl.scan_delta(dt).select(key).collect()[key]


class _Spool:
    """Per-target outputs of each partition: kept in memory, or spilled to Parquet."""

    def __init__(self, *, spill: bool) -> None:
        self.spill = spill
        self.frames: dict[str, list[pl.DataFrame]] = {}
        self.files: dict[str, list[Path]] = {}
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> _Spool:
        if self.spill:
            self._dir = tempfile.TemporaryDirectory(prefix="lakehouse-silver-")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._dir is not None:
            self._dir.cleanup()

    def ensure_dir(self) -> None:
        """Have a scratch folder even when outputs are not spilled."""
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="lakehouse-silver-")

    def path(self, name: str) -> Path:
        """Return a fresh folder for scratch files."""
        assert self._dir is not None
        return Path(self._dir.name) / name

    def add(self, target: str, frame: pl.DataFrame) -> None:
        if not self.spill:
            self.frames.setdefault(target, []).append(frame)
            return
        files = self.files.setdefault(target, [])
        path = self.path(f"{target}-{len(files)}.parquet")
        frame.write_parquet(path, compression="lz4")
        files.append(path)

    def reader(self, target: str, *, failpoint_name: str) -> pa.RecordBatchReader:
        """Stream one target's rows to delta-rs, with a failpoint after the first batch."""
        if not self.spill:
            tables = [f.to_arrow() for f in self.frames[target]]
            schema = tables[0].schema
            chunks: Iterator[pa.RecordBatch] = (
                b for t in tables for b in t.to_batches(max_chunksize=_BATCH_ROWS)
            )
        else:
            paths = self.files[target]
            schema = pq.read_schema(paths[0])
            chunks = (
                b for p in paths for b in pq.ParquetFile(p).iter_batches(batch_size=_BATCH_ROWS)
            )

        def batches() -> Iterator[pa.RecordBatch]:
            first = True
            for batch in chunks:
                yield batch
                if first:
                    failpoint(failpoint_name)
                    first = False
            if first:
                failpoint(failpoint_name)

        return pa.RecordBatchReader.from_batches(schema, batches())


def _merge_current(
    dt: DeltaTable, key: str, source: pa.RecordBatchReader, props: CommitProperties
) -> None:
    (
        dt.merge(
            source,
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
    dt: DeltaTable, key: str, source: pa.RecordBatchReader, props: CommitProperties
) -> None:
    (
        dt.merge(
            source,
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
