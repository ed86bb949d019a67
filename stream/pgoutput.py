"""A decoder for the pgoutput logical replication protocol (version 1).

Messages (https://www.postgresql.org/docs/15/protocol-logicalrep-message-formats.html):
Begin, Commit, Origin, Relation, Type, Insert, Update, Delete, Truncate. Tuple values
stay as the server's text bytes here; `stream.changes` types whole columns at once,
which is much faster than converting value by value in Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import IntEnum

PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)

# TupleData markers.
NULL = None


class MessageType(IntEnum):
    """The first byte of a pgoutput message: one list for the decoder and the batcher."""

    BEGIN = ord("B")
    COMMIT = ord("C")
    ORIGIN = ord("O")
    RELATION = ord("R")
    TYPE = ord("Y")
    INSERT = ord("I")
    UPDATE = ord("U")
    DELETE = ord("D")
    TRUNCATE = ord("T")
    MESSAGE = ord("M")


class TupleKind(IntEnum):
    """The first byte of each column value in a TupleData."""

    TEXT = ord("t")
    BINARY = ord("b")
    NULL = ord("n")
    UNCHANGED_TOAST = ord("u")


# Plain ints for the per-value loop (an enum attribute lookup costs more than the test).
_TEXT, _BINARY, _NULL, _UNCHANGED = (int(k) for k in TupleKind)


class Unchanged:
    """A TOASTed value the server did not send because the update did not change it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED = Unchanged()


@dataclass(frozen=True)
class Column:
    """A column of a published relation as the server describes it."""

    name: str
    type_oid: int
    type_modifier: int
    is_key: bool


@dataclass(frozen=True)
class Relation:
    """A Relation message: the current shape of a published table."""

    oid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]

    @property
    def column_names(self) -> list[str]:
        """Return the column names in table order."""
        return [c.name for c in self.columns]


@dataclass(frozen=True)
class Begin:
    """A transaction starts: `final_lsn` is the LSN of its commit record."""

    final_lsn: int
    commit_ts: datetime
    xid: int


@dataclass(frozen=True)
class Commit:
    """A transaction ends; `end_lsn` is where the next one can start."""

    commit_lsn: int
    end_lsn: int
    commit_ts: datetime


@dataclass(frozen=True)
class Change:
    """An Insert, Update or Delete of one row: values are text bytes, None or UNCHANGED."""

    op: str
    relation_oid: int
    new: list[bytes | Unchanged | None] | None
    old: list[bytes | Unchanged | None] | None = None
    old_kind: str = ""
    """'K' when `old` holds only the replica identity key, 'O' for the whole old row."""


@dataclass(frozen=True)
class Truncate:
    """A TRUNCATE of one or more published tables."""

    relation_oids: tuple[int, ...]
    cascade: bool = False
    restart_identity: bool = False


@dataclass(frozen=True)
class Ignored:
    """A message the lakehouse does not use (Origin, Type, logical decoding messages)."""

    kind: str
    details: dict[str, object] = field(default_factory=dict)


Message = Begin | Commit | Relation | Change | Truncate | Ignored


class DecodeError(ValueError):
    """The bytes are not a pgoutput message this decoder understands."""


def timestamp(micros: int) -> datetime:
    """Turn a Postgres timestamp (µs since 2000-01-01 UTC) into a datetime."""
    return PG_EPOCH + timedelta(microseconds=micros)


def format_lsn(lsn: int) -> str:
    """Format an LSN the way Postgres prints it: `16/B374D848`."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> int:
    """Parse `16/B374D848` into an integer."""
    hi, _, lo = text.partition("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def _u64(buf: bytes, pos: int) -> int:
    return int.from_bytes(buf[pos : pos + 8], "big")


def _i64(buf: bytes, pos: int) -> int:
    return int.from_bytes(buf[pos : pos + 8], "big", signed=True)


def _u32(buf: bytes, pos: int) -> int:
    return int.from_bytes(buf[pos : pos + 4], "big")


def _string(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.index(b"\x00", pos)
    return buf[pos:end].decode(), end + 1


def tuple_data(buf: bytes, pos: int) -> tuple[list[bytes | Unchanged | None], int]:
    """Decode a TupleData at `pos`; return the values and the position after them."""
    count = int.from_bytes(buf[pos : pos + 2], "big")
    pos += 2
    values: list[bytes | Unchanged | None] = []
    append = values.append
    for _ in range(count):
        kind = buf[pos]
        if kind in (_TEXT, _BINARY):
            size = int.from_bytes(buf[pos + 1 : pos + 5], "big")
            start = pos + 5
            pos = start + size
            append(buf[start:pos])
        elif kind == _NULL:
            append(None)
            pos += 1
        elif kind == _UNCHANGED:
            append(UNCHANGED)
            pos += 1
        else:
            msg = f"unknown TupleData kind {chr(kind)!r}"
            raise DecodeError(msg)
    return values, pos


def decode(buf: bytes) -> Message:
    """Decode one pgoutput message (the payload of an XLogData)."""
    kind = buf[0]
    if kind == MessageType.INSERT:
        new, _ = tuple_data(buf, 6)
        return Change("insert", _u32(buf, 1), new)
    if kind == MessageType.UPDATE:
        oid = _u32(buf, 1)
        marker = chr(buf[5])
        if marker in "KO":
            old, pos = tuple_data(buf, 6)
            new, _ = tuple_data(buf, pos + 1)
            return Change("update", oid, new, old, marker)
        new, _ = tuple_data(buf, 6)
        return Change("update", oid, new)
    if kind == MessageType.DELETE:
        marker = chr(buf[5])
        old, _ = tuple_data(buf, 6)
        return Change("delete", _u32(buf, 1), None, old, marker)
    if kind == MessageType.BEGIN:
        return Begin(_u64(buf, 1), timestamp(_i64(buf, 9)), _u32(buf, 17))
    if kind == MessageType.COMMIT:
        return Commit(_u64(buf, 2), _u64(buf, 10), timestamp(_i64(buf, 18)))
    if kind == MessageType.RELATION:
        return _relation(buf)
    if kind == MessageType.TRUNCATE:
        count = _u32(buf, 1)
        options = buf[5]
        oids = tuple(_u32(buf, 6 + 4 * i) for i in range(count))
        return Truncate(oids, cascade=bool(options & 1), restart_identity=bool(options & 2))
    if kind == MessageType.ORIGIN:
        name, _ = _string(buf, 9)
        return Ignored("origin", {"lsn": _u64(buf, 1), "name": name})
    if kind == MessageType.TYPE:
        namespace, pos = _string(buf, 5)
        name, _ = _string(buf, pos)
        return Ignored("type", {"oid": _u32(buf, 1), "namespace": namespace, "name": name})
    if kind == MessageType.MESSAGE:
        return Ignored("message")
    msg = f"unknown pgoutput message {chr(kind)!r}"
    raise DecodeError(msg)


def _relation(buf: bytes) -> Relation:
    oid = _u32(buf, 1)
    namespace, pos = _string(buf, 5)
    name, pos = _string(buf, pos)
    identity = chr(buf[pos])
    count = int.from_bytes(buf[pos + 1 : pos + 3], "big")
    pos += 3
    columns = []
    for _ in range(count):
        flags = buf[pos]
        col, pos = _string(buf, pos + 1)
        columns.append(Column(col, _u32(buf, pos), _i64_32(buf, pos + 4), bool(flags & 1)))
        pos += 8
    return Relation(oid, namespace, name, identity, tuple(columns))


def _i64_32(buf: bytes, pos: int) -> int:
    return int.from_bytes(buf[pos : pos + 4], "big", signed=True)
