"""Change batches: decoded pgoutput changes of one table, typed by column, landed in Delta.

`bronze.<table>_changes` holds one row per source change: `_op` (insert, update,
delete, truncate), `_commit_lsn` and `_end_lsn` of its transaction, `_commit_ts`,
`_xid`, `_seq` (position within the transaction), `_old_key` (the key before a delete
or a key change), `_unchanged` (columns whose TOASTed value the server did not resend),
`_unrepresentable` (timestamps Arrow cannot hold, as source text; the column is null),
`_ingested_at`, then the source columns. Progress lives in the same commit (Delta app
transactions), so a replay after a crash is recognised and skipped.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import polars as pl
import pyarrow as pa
from deltalake import DeltaTable, write_deltalake

from lakehouse.errors import SourceError, TableNotFoundError
from lakehouse.source.extract import PG_TO_POLARS
from lakehouse.source.schema import TABLES, SourceTable
from lakehouse.storage import KeptTables, Storage
from lakehouse.zones.bronze import changes_table, stream_slot
from lakehouse.zones.commits import TABLE_CONFIGURATION, app_id, commit_properties, recorded
from stream import columnar, pgoutput
from stream.pgoutput import MessageType

# Postgres type OIDs (pg_type.dat) and the Polars type their text output becomes.
PG_TYPES: dict[int, pl.DataType] = {
    16: pl.Boolean(),
    20: pl.Int64(),
    21: pl.Int16(),
    23: pl.Int32(),
    700: pl.Float32(),
    701: pl.Float64(),
    25: pl.Utf8(),
    1043: pl.Utf8(),
    1042: pl.Utf8(),
    1082: pl.Date(),
    1114: pl.Datetime("us"),
    1184: pl.Datetime("us", "UTC"),
    28: pl.Int64(),  # xid
    5069: pl.Int64(),  # xid8: `updated_xid`, the batch extraction's change marker
}
# What the lakehouse's source columns are (type OIDs), to catch type changes.
EXPECTED_OIDS = {
    "bigint": 20,
    "integer": 23,
    "smallint": 21,
    "double precision": 701,
    "text": 25,
    "timestamptz": 1184,
}
META: dict[str, pl.DataType] = {
    "_op": pl.Utf8(),
    "_commit_lsn": pl.Int64(),
    "_end_lsn": pl.Int64(),
    "_commit_ts": pl.Datetime("us", "UTC"),
    "_xid": pl.Int64(),
    "_seq": pl.Int64(),
    "_old_key": pl.Int64(),
    "_unchanged": pl.List(pl.Utf8()),
    "_unrepresentable": pl.Utf8(),
    "_ingested_at": pl.Datetime("us", "UTC"),
}


class SchemaChangeError(SourceError):
    """The source table changed in a way the lakehouse cannot follow on its own."""


def slot_name(schema: str, table: str) -> str:
    """Return the replication slot (and publication) name of a source table."""
    return stream_slot(schema, table)


@dataclass(frozen=True)
class Progress:
    """How far `bronze.<table>_changes` has taken the slot in.

    `flushed`: every transaction ending at or before it is in Delta (safe to confirm).
    `lsn`, `seq`: the last change written (a huge transaction may be split across
    commits); a replayed change at or before it is a duplicate.
    """

    flushed: int = 0
    lsn: int = -1
    seq: int = -1


def progress(storage: Storage, table: str) -> Progress:
    """Read the recorded progress of a change table (zeros when it does not exist)."""
    dt = storage.table_or_none("bronze", changes_table(table))
    base = app_id("bronze", changes_table(table))
    flushed = recorded(dt, base)  # what `bronze.changes_landed` reads, with the same handle
    if flushed is None:
        return Progress()
    return Progress(flushed, recorded(dt, f"{base}#lsn") or -1, recorded(dt, f"{base}#seq") or -1)


def _pg_type(column: pgoutput.Column) -> pl.DataType:
    return PG_TYPES.get(column.type_oid, pl.Utf8())


def check_relation(relation: pgoutput.Relation, source: SourceTable) -> None:
    """Refuse a source table shape that would make silver silently wrong."""
    by_name = {c.name: c for c in relation.columns}
    for name, pg_type in source.columns:
        column = by_name.get(name)
        where = f"{relation.namespace}.{relation.name}.{name}"
        if column is None:
            msg = (
                f"source column {where} was dropped or renamed; silver needs it: restore "
                "the column, or stop the stream and rebuild the table's silver "
                "(`lakehouse stream teardown`)"
            )
            raise SchemaChangeError(msg)
        if column.type_oid != EXPECTED_OIDS[pg_type]:
            msg = (
                f"source column {where} changed type (now oid {column.type_oid}, expected "
                f"{pg_type}); bronze cannot hold both: revert the type, or land it in a new "
                "column and migrate"
            )
            raise SchemaChangeError(msg)


_OPS: dict[int, str] = {
    pgoutput.MessageType.INSERT: "insert",
    pgoutput.MessageType.UPDATE: "update",
    pgoutput.MessageType.DELETE: "delete",
}
# Columns decoded per row besides the source's own.
_PER_ROW = ("_old_key", "_unchanged", "_unrepresentable")
_REPRESENTABLE = (
    datetime(1, 1, 1, tzinfo=UTC),
    datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
)


@dataclass
class ChangeBatch:
    """Changes of one table in source order: raw row messages plus their positions.

    Values stay in the server's bytes until `to_frame`, which decodes and types whole
    columns at once (`stream.columnar`). `segments` marks where the table's shape
    changed: (first row, relation or None for a truncate row).
    """

    table: str
    key: str = ""
    columns: list[pgoutput.Column] = field(default_factory=list)
    segments: list[tuple[int, pgoutput.Relation | None]] = field(default_factory=list)
    payload: list[bytes] = field(default_factory=list)
    op: list[str] = field(default_factory=list)
    commit_lsn: list[int] = field(default_factory=list)
    end_lsn: list[int | None] = field(default_factory=list)
    """None only for the rows of a transaction larger than a batch, landed before its end."""
    commit_ts: list[int] = field(default_factory=list)
    """µs since the Unix epoch."""
    xid: list[int] = field(default_factory=list)
    seq: list[int] = field(default_factory=list)
    flushed: int = 0
    """After this batch lands, every transaction ending at or before this LSN is in Delta."""
    first_at: float = 0.0
    round: int | None = None
    """The speed-layer round it was closed for (the sink checks it in once landed)."""

    def __len__(self) -> int:
        return len(self.op)

    def to_frame(self) -> pl.DataFrame:
        """Decode and type the batch: a few vector operations per column."""
        n = len(self.op)
        meta = pl.DataFrame(
            {
                "_op": self.op,
                "_commit_lsn": self.commit_lsn,
                "_end_lsn": self.end_lsn,
                "_commit_ts": self.commit_ts,
                "_xid": self.xid,
                "_seq": self.seq,
            },
            schema={
                k: META[k] for k in ("_op", "_commit_lsn", "_end_lsn", "_commit_ts", "_xid", "_seq")
            },
        )
        bounds = [start for start, _ in self.segments] + [n]
        parts = []
        for (start, relation), stop in zip(self.segments, bounds[1:], strict=True):
            if stop > start:
                parts.append(self._decode(start, stop, relation))
        values = (
            pl.concat(parts, how="diagonal_relaxed")
            if parts
            else pl.DataFrame(schema={k: META[k] for k in _PER_ROW})
        )
        missing = [c for c in self.columns if c.name not in values.columns]
        values = values.with_columns(
            [pl.lit(None, _pg_type(c)).alias(c.name) for c in missing]
        ).select(
            *[pl.col(k).cast(META[k]) for k in _PER_ROW],
            *[pl.col(c.name).cast(_pg_type(c)) for c in self.columns],
        )
        ingested = pl.lit(datetime.now(UTC)).cast(META["_ingested_at"]).alias("_ingested_at")
        # The source's own columns are always there, even in a batch that saw no Relation
        # message yet (a heartbeat may create the table): readers can rely on them.
        names = [c.name for c in self.columns]
        source = TABLES.get(self.table)
        absent = [] if source is None else [c for c in source.columns if c[0] not in names]
        return (
            pl.concat([meta, values], how="horizontal")
            .with_columns(ingested)
            .with_columns([pl.lit(None, PG_TO_POLARS[t]).alias(n) for n, t in absent])
            .select(*META, *names, *[n for n, _ in absent])
        )

    def _decode(self, start: int, stop: int, relation: pgoutput.Relation | None) -> pl.DataFrame:
        rows = stop - start
        if relation is None:  # truncate rows: no values
            return pl.DataFrame(
                {k: [None] * rows for k in _PER_ROW}, schema={k: META[k] for k in _PER_ROW}
            )
        buf, base = columnar.concat(self.payload[start:stop])
        ops = np.fromiter((p[0] for p in self.payload[start:stop]), dtype=np.uint8, count=rows)
        markers = buf[base + 5]
        has_old = (ops == 68) | ((ops == 85) & ((markers == 75) | (markers == 79)))  # K, O
        width = len(relation.columns)
        key_index = relation.column_names.index(self.key or TABLES[self.table].key)
        new_at = base + 6
        old_key = pa.nulls(rows, pa.large_binary())
        if has_old.any():
            old_rows = np.flatnonzero(has_old)
            old = columnar.scan(buf, base[old_rows] + 6, width)
            keys, _ = columnar.column(buf, old, key_index)
            updates = ops[old_rows] == 85
            new_at[old_rows[updates]] = old.end[updates] + 1  # the new tuple follows 'N'
            full = [None] * rows
            for i, value in zip(old_rows.tolist(), keys.to_pylist(), strict=True):
                full[i] = value
            old_key = pa.array(full, pa.large_binary())
        tuples = columnar.scan(buf, new_at, width)
        data: dict[str, pl.Series] = {"_old_key": _typed(old_key, pl.Int64())[0]}
        unchanged = np.zeros(rows, dtype=bool)
        masks = []
        unheld: list[tuple[str, pl.Series]] = []
        for i, col in enumerate(relation.columns):
            array, mask = columnar.column(buf, tuples, i)
            data[col.name], bad = _typed(array, _pg_type(col))
            if bad is not None:
                unheld.append((col.name, bad))
            masks.append(mask)
            unchanged |= mask
        lists: list[list[str] | None] = [None] * rows
        for row in np.flatnonzero(unchanged).tolist():
            lists[row] = [c.name for c, m in zip(relation.columns, masks, strict=True) if m[row]]
        data["_unchanged"] = pl.Series(lists, dtype=pl.List(pl.Utf8()))
        data["_unrepresentable"] = unrepresentable_json(unheld, rows)
        return pl.DataFrame(data)


def _typed(values: pa.Array, dtype: pl.DataType) -> tuple[pl.Series, pl.Series | None]:
    """Type one column's text; return it and, for dates, the text of values Arrow cannot hold.

    `infinity`, BC dates and years past 9999 become null, their text is returned beside
    (the caller records it in `_unrepresentable`): one odd value never stops the stream.
    """
    text = pl.from_arrow(values.cast(pa.large_string()))
    assert isinstance(text, pl.Series)
    if dtype == pl.Utf8():
        return text, None
    if dtype == pl.Boolean():
        return text == "t", None
    if isinstance(dtype, pl.Datetime | pl.Date):
        if isinstance(dtype, pl.Date):
            parsed = text.str.to_date("%Y-%m-%d", strict=False).cast(pl.Datetime("us"))
        elif dtype.time_zone:
            parsed = text.str.to_datetime(
                "%Y-%m-%d %H:%M:%S%.f%#z", time_unit="us", time_zone="UTC", strict=False
            )
        else:
            parsed = text.str.to_datetime("%Y-%m-%d %H:%M:%S%.f", time_unit="us", strict=False)
        low, high = _REPRESENTABLE
        if parsed.dtype.time_zone is None:  # type: ignore[attr-defined]
            low, high = low.replace(tzinfo=None), high.replace(tzinfo=None)
        held = (
            parsed.is_not_null()
            & (parsed >= low)
            & (parsed <= high)
            & ~text.str.contains(" BC", literal=True).fill_null(False)
        )
        bad = text.is_not_null() & ~held
        typed = parsed.set(~held, None).cast(dtype)
        return typed, (text.set(~bad, None) if bad.any() else None)
    return text.cast(dtype), None


def unrepresentable_json(columns: list[tuple[str, pl.Series]], rows: int) -> pl.Series:
    """Per row, a JSON object {column: source text} of the values Arrow cannot hold, or null."""
    if not columns:
        return pl.Series("_unrepresentable", [None] * rows, dtype=pl.Utf8())
    frame = pl.DataFrame({f"c{i}": s for i, (_, s) in enumerate(columns)})
    pairs = [
        pl.when(pl.col(f"c{i}").is_not_null()).then(
            pl.lit(json.dumps(name) + ": ")
            + pl.col(f"c{i}").map_elements(json.dumps, return_dtype=pl.Utf8)
        )
        for i, (name, _) in enumerate(columns)
    ]
    body = pl.concat_str(pairs, separator=", ", ignore_nulls=True)
    return frame.select(
        pl.when(body != "").then(pl.lit("{") + body + pl.lit("}")).alias("_unrepresentable")
    ).to_series()


class BatchBuilder:
    """Feed pgoutput payloads of one slot; take change batches closed by size or time.

    Changes at or before `skip` (a (commit LSN, seq) position already in Delta) are
    dropped: that is how a replay after a crash is recognised.
    """

    def __init__(self, table: str, *, skip: Progress, source: SourceTable | None = None) -> None:
        self.table = table
        self.source = source or TABLES[table]
        self.skip = (skip.lsn, skip.seq)
        self.relation: pgoutput.Relation | None = None
        self.columns: list[pgoutput.Column] = []
        self.batch = ChangeBatch(table, self.source.key)
        self.in_txn = False
        self.txn_lsn = 0
        self.txn_ts = 0
        self.txn_xid = 0
        self.txn_seq = 0
        self.txn_first_row = 0
        self.flushed = skip.flushed

    def feed(self, payload: bytes) -> None:
        """Take in one pgoutput message."""
        kind = payload[0]
        if kind in _OPS:  # Insert, Update, Delete: the hot path, kept short
            self._append(_OPS[kind], payload)
        elif kind == MessageType.BEGIN:
            begin = pgoutput.decode(payload)
            assert isinstance(begin, pgoutput.Begin)
            self.in_txn = True
            self.txn_lsn, self.txn_xid = begin.final_lsn, begin.xid
            self.txn_ts = int(begin.commit_ts.timestamp()) * 1_000_000 + begin.commit_ts.microsecond
            self.txn_seq = 0
            self.txn_first_row = len(self.batch)
        elif kind == MessageType.COMMIT:
            commit = pgoutput.decode(payload)
            assert isinstance(commit, pgoutput.Commit)
            self.in_txn = False
            batch = self.batch
            first = self.txn_first_row
            batch.end_lsn[first:] = [commit.end_lsn] * (len(batch.end_lsn) - first)
            self.flushed = max(self.flushed, commit.end_lsn)
            batch.flushed = self.flushed
        elif kind == MessageType.RELATION:
            relation = pgoutput.decode(payload)
            assert isinstance(relation, pgoutput.Relation)
            self._relation(relation)
        elif kind == MessageType.TRUNCATE:
            self._append("truncate", b"")
        # Origin, Type and logical messages carry nothing the lakehouse needs.

    def _relation(self, relation: pgoutput.Relation) -> None:
        check_relation(relation, self.source)
        known = {c.name for c in self.columns}
        current = {c.name: c for c in relation.columns}
        self.columns = [current.get(c.name, c) for c in self.columns] + [
            c for c in relation.columns if c.name not in known
        ]
        self.relation = relation
        self.batch.columns = list(self.columns)
        self.batch.segments.append((len(self.batch), relation))

    def _append(self, op: str, payload: bytes) -> None:
        """Add one change at the next position of the open transaction, unless replayed."""
        self.txn_seq += 1
        if (self.txn_lsn, self.txn_seq) <= self.skip:
            return
        batch = self.batch
        if not batch.op:
            batch.first_at = time.monotonic()
        if op == "truncate":
            batch.segments.append((len(batch), None))
        batch.payload.append(payload)
        batch.op.append(op)
        batch.commit_lsn.append(self.txn_lsn)
        batch.end_lsn.append(None)
        batch.commit_ts.append(self.txn_ts)
        batch.xid.append(self.txn_xid)
        batch.seq.append(self.txn_seq)
        if op == "truncate":  # rows after it decode with the relation again
            batch.segments.append((len(batch), self.relation))

    def ready(self, *, max_rows: int, max_seconds: float) -> bool:
        """Tell whether the open batch should be closed now.

        By size anywhere (a huge transaction is split, bounding memory); by time only
        between transactions, so readers never see half a transaction when avoidable.
        """
        n = len(self.batch)
        if n >= max_rows:
            return True
        return n > 0 and not self.in_txn and time.monotonic() - self.batch.first_at >= max_seconds

    def take(self) -> ChangeBatch:
        """Close the open batch and start a new one."""
        batch = self.batch
        batch.flushed = self.flushed
        self.batch = ChangeBatch(self.table, self.source.key, columns=list(self.columns))
        self.batch.segments.append((0, self.relation))
        self.txn_first_row = 0
        return batch

    def take_complete(self) -> ChangeBatch:
        """Close the open batch without the open transaction's rows (they will be replayed).

        Used when stopping: what lands is whole transactions, and the slot is never told
        about the part left out, so the server sends it again on the next start.
        """
        if self.in_txn:
            cut = self.txn_first_row
            batch = self.batch
            for rows in (
                batch.payload,
                batch.op,
                batch.commit_lsn,
                batch.end_lsn,
                batch.commit_ts,
                batch.xid,
                batch.seq,
            ):
                del rows[cut:]
            batch.segments = [(start, rel) for start, rel in batch.segments if start < cut]
        return self.take()

    @property
    def idle(self) -> bool:
        """Tell whether nothing is buffered and no transaction is open."""
        return not self.in_txn and len(self.batch) == 0


def write(
    storage: Storage, batch: ChangeBatch, previous: Progress, kept: KeptTables | None = None
) -> Progress:
    """Append a batch to `bronze.<table>_changes` with its progress, atomically.

    With `kept` (the sink's), the table is brought up to date rather than opened again.
    """
    frame = batch.to_frame()
    base = app_id("bronze", changes_table(batch.table))
    done = Progress(
        max(batch.flushed, previous.flushed),
        batch.commit_lsn[-1] if len(batch) else previous.lsn,
        batch.seq[-1] if len(batch) else previous.seq,
    )
    marks = {base: done.flushed, f"{base}#lsn": done.lsn, f"{base}#seq": done.seq}
    if not len(batch):
        # A heartbeat: the stream held nothing when the server's WAL reached `flushed`,
        # so every change published before it has landed (`lakehouse stream status`).
        marks[f"{base}#idle"] = done.flushed
    name = changes_table(batch.table)
    target: DeltaTable | str = storage.uri("bronze", name)
    if kept is not None:
        with contextlib.suppress(TableNotFoundError):  # else the first write creates it
            target = kept.latest("bronze", name)
    write_deltalake(
        target,
        frame.to_arrow(),
        mode="append",
        schema_mode="merge",
        storage_options=None if isinstance(target, DeltaTable) else storage.options,
        configuration=TABLE_CONFIGURATION,
        commit_properties=commit_properties(
            marks, operation="stream", metadata={"lakehouse.rows": str(len(batch))}
        ),
    )
    return done


def idle_at(storage: Storage, table: str) -> int | None:
    """Return the position of the last heartbeat: the stream held nothing up to it."""
    base = app_id("bronze", changes_table(table))
    return recorded(storage.table_or_none("bronze", changes_table(table)), f"{base}#idle")
