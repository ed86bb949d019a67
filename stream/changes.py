"""Change batches: decoded pgoutput changes of one table, typed by column, landed in Delta.

`bronze.<table>_changes` holds one row per source change: `_op` (insert, update,
delete, truncate), `_commit_lsn` and `_end_lsn` of its transaction, `_commit_ts`,
`_xid`, `_seq` (position within the transaction), `_old_key` (the key before a delete
or a key change), `_unchanged` (columns whose TOASTed value the server did not resend),
`_ingested_at`, then the source columns. Progress lives in the same commit (Delta app
transactions), so a replay after a crash is recognised and skipped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

import polars as pl
import pyarrow as pa
from deltalake import write_deltalake

from lakehouse.errors import SourceError
from lakehouse.source.schema import TABLES, SourceTable
from lakehouse.storage import Storage
from lakehouse.zones.bronze import stream_slot
from lakehouse.zones.commits import app_id, commit_properties, recorded
from stream import pgoutput

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
    "_ingested_at": pl.Datetime("us", "UTC"),
}


class SchemaChangeError(SourceError):
    """The source table changed in a way the lakehouse cannot follow on its own."""


def changes_table(table: str) -> str:
    """Return the bronze change table of a source table."""
    return f"{table}_changes"


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
    flushed = recorded(dt, base)
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


@dataclass
class ChangeBatch:
    """Changes of one table in source order, as columns of raw text values."""

    table: str
    columns: list[pgoutput.Column] = field(default_factory=list)
    values: dict[str, list[bytes | None]] = field(default_factory=dict)
    op: list[str] = field(default_factory=list)
    commit_lsn: list[int] = field(default_factory=list)
    end_lsn: list[int | None] = field(default_factory=list)
    commit_ts: list[datetime] = field(default_factory=list)
    xid: list[int] = field(default_factory=list)
    seq: list[int] = field(default_factory=list)
    old_key: list[bytes | None] = field(default_factory=list)
    unchanged: list[list[str] | None] = field(default_factory=list)
    flushed: int = 0
    """After this batch lands, every transaction ending at or before this LSN is in Delta."""
    first_at: float = 0.0

    def __len__(self) -> int:
        return len(self.op)

    def to_frame(self) -> pl.DataFrame:
        """Type the batch: one vectorised cast per column."""
        n = len(self.op)
        meta = pl.DataFrame(
            {
                "_op": self.op,
                "_commit_lsn": self.commit_lsn,
                "_end_lsn": self.end_lsn,
                "_commit_ts": self.commit_ts,
                "_xid": self.xid,
                "_seq": self.seq,
                "_old_key": _typed(self.old_key, pl.Int64(), n),
                "_unchanged": self.unchanged,
                "_ingested_at": [datetime.now(UTC)] * n,
            },
            schema=META,
        )
        cols = [_typed(self.values[c.name], _pg_type(c), n).alias(c.name) for c in self.columns]
        return meta.with_columns(cols) if cols else meta


def _typed(values: list[bytes | None], dtype: pl.DataType, n: int) -> pl.Series:
    if not values:
        return pl.Series(values=[None] * n, dtype=dtype)
    text = pl.from_arrow(pa.array(values, pa.binary()).cast(pa.string()))
    assert isinstance(text, pl.Series)
    if dtype == pl.Utf8():
        return text
    if dtype == pl.Boolean():
        return text == "t"
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone:
            return text.str.to_datetime(
                "%Y-%m-%d %H:%M:%S%.f%#z", time_unit="us", time_zone=dtype.time_zone
            )
        return text.str.to_datetime("%Y-%m-%d %H:%M:%S%.f", time_unit="us")
    if dtype == pl.Date():
        return text.str.to_date("%Y-%m-%d")
    return text.cast(dtype)


class BatchBuilder:
    """Feed pgoutput payloads of one slot; take change batches closed by size or time.

    Changes at or before `skip` (a (commit LSN, seq) position already in Delta) are
    dropped: that is how a replay after a crash is recognised.
    """

    def __init__(self, table: str, *, skip: Progress) -> None:
        self.table = table
        self.source = TABLES[table]
        self.skip = (skip.lsn, skip.seq)
        self.relations: dict[int, pgoutput.Relation] = {}
        self.columns: list[pgoutput.Column] = []
        self.batch = ChangeBatch(table)
        self.in_txn = False
        self.txn_lsn = 0
        self.txn_ts = datetime.now(UTC)
        self.txn_xid = 0
        self.txn_seq = 0
        self.flushed = skip.flushed
        self.key_index = 0

    def feed(self, payload: bytes) -> None:
        """Take in one pgoutput message."""
        kind = payload[0]
        if kind in (73, 85, 68):  # I U D: the hot path
            self._change(pgoutput.decode(payload))
        elif kind == 66:  # B
            begin = pgoutput.decode(payload)
            assert isinstance(begin, pgoutput.Begin)
            self.in_txn = True
            self.txn_lsn, self.txn_ts, self.txn_xid = begin.final_lsn, begin.commit_ts, begin.xid
            self.txn_seq = 0
        elif kind == 67:  # C
            commit = pgoutput.decode(payload)
            assert isinstance(commit, pgoutput.Commit)
            self.in_txn = False
            batch = self.batch
            i = len(batch.end_lsn) - 1
            while i >= 0 and batch.end_lsn[i] is None:
                batch.end_lsn[i] = commit.end_lsn
                i -= 1
            self.flushed = max(self.flushed, commit.end_lsn)
            batch.flushed = self.flushed
        elif kind == 82:  # R
            relation = pgoutput.decode(payload)
            assert isinstance(relation, pgoutput.Relation)
            self._relation(relation)
        elif kind == 84:  # T
            self._truncate()
        # Origin, Type and logical messages carry nothing the lakehouse needs.

    def _relation(self, relation: pgoutput.Relation) -> None:
        check_relation(relation, self.source)
        self.relations[relation.oid] = relation
        known = {c.name for c in self.columns}
        for column in relation.columns:
            if column.name not in known:
                # A column added mid-stream: earlier rows of the batch hold NULL.
                self.columns.append(column)
                self.batch.values[column.name] = [None] * len(self.batch)
        names = relation.column_names
        self.key_index = names.index(self.source.key)
        current = {c.name: c for c in relation.columns}
        for i, column in enumerate(self.columns):
            if column.name in current and current[column.name].type_oid != column.type_oid:
                self.columns[i] = current[column.name]
        self.batch.columns = list(self.columns)

    def _position_is_new(self) -> bool:
        self.txn_seq += 1
        return (self.txn_lsn, self.txn_seq) > self.skip

    def _start_row(self, op: str) -> None:
        batch = self.batch
        if not batch.op:
            batch.first_at = time.monotonic()
        batch.op.append(op)
        batch.commit_lsn.append(self.txn_lsn)
        batch.end_lsn.append(None)
        batch.commit_ts.append(self.txn_ts)
        batch.xid.append(self.txn_xid)
        batch.seq.append(self.txn_seq)

    def _change(self, change: pgoutput.Message) -> None:
        assert isinstance(change, pgoutput.Change)
        if not self._position_is_new():
            return
        relation = self.relations[change.relation_oid]
        names = relation.column_names
        batch = self.batch
        self._start_row(change.op)
        row = change.new if change.new is not None else change.old
        assert row is not None
        unchanged: list[str] | None = None
        present = dict(zip(names, row, strict=True))
        for column in self.columns:
            value = present.get(column.name)
            if value is pgoutput.UNCHANGED:
                unchanged = [*(unchanged or []), column.name]
                value = None
            if change.op == "delete" and change.old_kind == "K" and column.name != self.source.key:
                value = None  # identity DEFAULT: only the key is real, the rest is 'n'
            batch.values[column.name].append(value)  # type: ignore[arg-type]
        old_key = None
        if change.old is not None:
            key = change.old[self.key_index]
            old_key = key if isinstance(key, bytes) else None
        batch.old_key.append(old_key)
        batch.unchanged.append(unchanged)

    def _truncate(self) -> None:
        if not self._position_is_new():
            return
        self._start_row("truncate")
        for column in self.columns:
            self.batch.values[column.name].append(None)
        self.batch.old_key.append(None)
        self.batch.unchanged.append(None)

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
        self.batch = ChangeBatch(self.table, columns=list(self.columns))
        self.batch.values = {c.name: [] for c in self.columns}
        return batch

    @property
    def idle(self) -> bool:
        """Tell whether nothing is buffered and no transaction is open."""
        return not self.in_txn and len(self.batch) == 0


def write(storage: Storage, batch: ChangeBatch, previous: Progress) -> Progress:
    """Append a batch to `bronze.<table>_changes` with its progress, atomically."""
    frame = batch.to_frame()
    base = app_id("bronze", changes_table(batch.table))
    done = Progress(
        max(batch.flushed, previous.flushed),
        batch.commit_lsn[-1] if len(batch) else previous.lsn,
        batch.seq[-1] if len(batch) else previous.seq,
    )
    write_deltalake(
        storage.uri("bronze", changes_table(batch.table)),
        frame.to_arrow(),
        mode="append",
        schema_mode="merge",
        storage_options=storage.options,
        commit_properties=commit_properties(
            {base: done.flushed, f"{base}#lsn": done.lsn, f"{base}#seq": done.seq},
            operation="stream",
            metadata={"lakehouse.rows": str(len(batch))},
        ),
    )
    return done
