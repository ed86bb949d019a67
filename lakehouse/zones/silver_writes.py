"""How a promotion's outcome lands in the three silver targets, one commit each.

Each commit is made against the table version the promotion read its marks from, so a
writer that lost a race (or ran on stale marks) fails at commit time with nothing
visible (`lakehouse.zones.commits`). A MERGE that changes no row makes no commit in
delta-rs, so the marks then land in an empty append against the same version.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable, write_deltalake

from lakehouse.failpoints import failpoint
from lakehouse.storage import Storage
from lakehouse.zones.commits import TABLE_CONFIGURATION, ConcurrentWriteError, is_conflict
from lakehouse.zones.datafiles import TableFiles

_BATCH_ROWS = 100_000


class Spool:
    """Per-target outputs of each key partition: kept in memory, or spilled to Parquet."""

    def __init__(self, *, spill: bool) -> None:
        self.spill = spill
        self.frames: dict[str, list[pl.DataFrame]] = {}
        self.files: dict[str, list[Path]] = {}
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> Spool:
        if self.spill:
            self._dir = tempfile.TemporaryDirectory(prefix="lakehouse-silver-")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._dir is not None:
            self._dir.cleanup()

    def path(self, name: str) -> Path:
        """Return a fresh path for scratch files."""
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="lakehouse-silver-")
        return Path(self._dir.name) / name

    def add(self, target: str, frame: pl.DataFrame) -> None:
        """Keep one partition's rows for `target`."""
        if not self.spill:
            self.frames.setdefault(target, []).append(frame)
            return
        files = self.files.setdefault(target, [])
        path = self.path(f"{target}-{len(files)}.parquet")
        frame.write_parquet(path, compression="lz4")
        files.append(path)

    def shape(self, target: str) -> tuple[int, int] | None:
        """Return (rows, closing rows) of a target kept in memory; None when spilled."""
        if self.spill:
            return None
        frames = self.frames[target]
        rows = sum(f.height for f in frames)
        closings = sum(
            f.height - f["_close_key"].null_count() for f in frames if "_close_key" in f.columns
        )
        return rows, closings

    def reader(
        self, target: str, *, failpoint_name: str, drop: tuple[str, ...] = ()
    ) -> pa.RecordBatchReader:
        """Stream one target's rows to delta-rs, with a failpoint after the first batch."""
        if not self.spill:
            tables = [f.drop(drop, strict=False).to_arrow() for f in self.frames[target]]
            schema = _common_schema(tables)
            chunks: Iterator[pa.RecordBatch] = (
                b
                for t in tables
                for b in t.select(schema.names).cast(schema).to_batches(max_chunksize=_BATCH_ROWS)
            )
        else:
            assert not drop, "columns are dropped from frames kept in memory only"
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


def _common_schema(tables: list[pa.Table]) -> pa.Schema:
    """Return the first non-empty frame's schema (an empty one may type nulls as null)."""
    for t in tables:
        if t.num_rows:
            return t.schema
    return tables[0].schema


def create(
    files: TableFiles, props: CommitProperties, *, failpoint_name: str, guard: list[str]
) -> None:
    """Create a target from Parquet files written by Polars (a first load), in one commit."""
    _committed(files.label, lambda: files.commit(props, failpoint_name=failpoint_name, guard=guard))


def merge_current(
    dt: DeltaTable, key: str, source: pa.RecordBatchReader, props: CommitProperties
) -> None:
    """Merge deletes and latest versions by key; a version never replaces a later one."""
    newer = "(s._lsn > t._lsn OR (s._lsn = t._lsn AND s._seq >= t._seq) OR t._lsn IS NULL)"
    _merge(
        dt,
        props,
        lambda: (
            dt.merge(
                source,
                predicate=f's."{key}" = t."{key}"',
                source_alias="s",
                target_alias="t",
                commit_properties=props,
            )
            .when_matched_delete(predicate="s._op = 'delete'")
            .when_matched_update_all(predicate=f"s._op = 'upsert' AND {newer}", except_cols=["_op"])
            .when_not_matched_insert_all(predicate="s._op = 'upsert'", except_cols=["_op"])
            .execute()
        ),
    )


def merge_closing(
    dt: DeltaTable,
    key: str,
    source: pa.RecordBatchReader,
    props: CommitProperties,
    *,
    open_column: str,
    closed: dict[str, str],
) -> None:
    """Close each key's open row (`_close_key`) and insert the new rows, in one MERGE.

    History closes the open version (`valid_to IS NULL`); rejects clear `is_current`.
    """
    _merge(
        dt,
        props,
        lambda: (
            dt.merge(
                source,
                predicate=f't."{key}" = s._close_key AND {open_column}',
                source_alias="s",
                target_alias="t",
                commit_properties=props,
            )
            .when_matched_update(closed)
            .when_not_matched_insert_all(
                predicate="s._close_key IS NULL", except_cols=["_close_key", "_close_at"]
            )
            .execute()
        ),
    )


def _merge(dt: DeltaTable, props: CommitProperties, run: Callable[[], object]) -> None:
    before = dt.version()

    def merge_then_mark() -> None:
        run()
        if dt.version() == before:  # nothing changed: record the marks all the same
            _mark(dt, props)

    _committed(_label(dt), merge_then_mark)


def _mark(dt: DeltaTable, props: CommitProperties) -> None:
    empty = pa.schema(dt.schema().to_arrow()).empty_table()
    write_deltalake(dt, empty, mode="append", commit_properties=props)


def mark(dt: DeltaTable, props: CommitProperties) -> None:
    """Record the marks alone, for a target the promotion leaves as it is.

    A MERGE of nothing costs 40-60 ms in delta-rs (planning, a scan of the target) and
    commits nothing; this commit costs 4 ms. The speed layer's cycles mostly have no
    new reject, so each skipped two such merges.
    """
    _committed(_label(dt), lambda: _mark(dt, props))


def append_rows(dt: DeltaTable, source: pa.RecordBatchReader, props: CommitProperties) -> None:
    """Append rows that close nothing (new keys' first versions) to an existing target.

    Checked as the merge would be: the marks in `props` make a second writer of the same
    step fail at commit time (`lakehouse.zones.commits`).
    """
    _committed(
        _label(dt), lambda: write_deltalake(dt, source, mode="append", commit_properties=props)
    )


def _label(dt: DeltaTable) -> str:
    parts = dt.table_uri.rstrip("/").split("/")
    return ".".join(parts[-2:])


def append(
    storage: Storage, uri: str, source: pa.RecordBatchReader, props: CommitProperties
) -> None:
    """Append to a table that may not exist yet (its first commit creates it)."""
    _committed(
        uri,
        lambda: write_deltalake(
            uri,
            source,
            mode="append",
            schema_mode="merge",
            storage_options=storage.options,
            configuration=TABLE_CONFIGURATION,
            commit_properties=props,
        ),
    )


def _committed(label: str, write: Callable[[], object]) -> None:
    try:
        write()
    except Exception as exc:
        if is_conflict(exc):
            msg = f"another writer committed to {label} first"
            raise ConcurrentWriteError(msg) from exc
        raise
