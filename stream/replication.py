"""Logical replication over the streaming protocol with psycopg 3's libpq binding.

psycopg 3 has no replication API, but its `pgconn` exposes libpq: a connection opened
with `replication=database` accepts `START_REPLICATION`, and `get_copy_data` /
`put_copy_data` carry the CopyBoth stream. This is the protocol `pg_recvlogical` and
Debezium use: no WAL is re-read per batch (unlike the `pg_logical_slot_peek_*`
functions), and the slot advances only when we report a flushed position.
"""

from __future__ import annotations

import select
import time
from dataclasses import dataclass

import psycopg
from psycopg import pq, sql

from lakehouse.errors import SourceError
from lakehouse.settings import Settings
from lakehouse.source.schema import dsn, explain_connect_error
from stream.pgoutput import PG_EPOCH, format_lsn

_PG_EPOCH_US = int(PG_EPOCH.timestamp() * 1_000_000)


class StreamError(SourceError):
    """Replication cannot start or continue; the message says why and what to do."""


@dataclass(frozen=True)
class SlotInfo:
    """A replication slot as `pg_replication_slots` shows it."""

    name: str
    active: bool
    confirmed_flush_lsn: int | None
    restart_lsn: int | None
    wal_status: str | None
    lag_bytes: int | None


def connect_replication(settings: Settings) -> psycopg.Connection:
    """Open a replication connection (walsender) with UTC, ISO text output."""
    try:
        return psycopg.connect(
            dsn(settings),
            autocommit=True,
            replication="database",
            options="-c timezone=UTC -c datestyle=ISO -c extra_float_digits=3",
            connect_timeout=10,
        )
    except psycopg.OperationalError as exc:
        text = str(exc).lower()
        if "replication" in text and ("permission" in text or "must be" in text):
            msg = (
                "the Postgres user may not start replication; "
                "`ALTER ROLE <user> WITH REPLICATION` (or use a role that has it)"
            )
            raise StreamError(msg) from None
        raise StreamError(explain_connect_error(exc, settings)) from None


def explain(message: str, sqlstate: str | None, slot: str) -> str:
    """Turn a server error during replication into one line naming the fix."""
    low = message.lower()
    if "wal_level" in low:
        return (
            "logical decoding needs wal_level=logical on the source; set it "
            "(ALTER SYSTEM SET wal_level = logical) and restart Postgres"
        )
    if sqlstate == "55006" or "is active for pid" in low:
        return (
            f"replication slot {slot} is in use by another consumer; stop the other "
            "`lakehouse stream` (one consumer per slot)"
        )
    if (
        "has already been removed" in low
        or "can no longer get changes" in low
        or ("invalidated" in low)
    ):
        return (
            f"replication slot {slot} lost WAL it needed (the stream was down too long); "
            "run `lakehouse stream teardown`, then `lakehouse stream setup` to take a new "
            "snapshot"
        )
    if sqlstate == "42704" or "does not exist" in low:
        return f"replication slot {slot} does not exist; run `lakehouse stream setup`"
    if sqlstate == "42501" or "permission denied" in low or "must be superuser" in low:
        return (
            "the Postgres user may not use replication slots; `ALTER ROLE <user> WITH REPLICATION`"
        )
    return f"replication failed on slot {slot}: {message.strip().splitlines()[0]}"


class ReplicationStream:
    """One consumer of one slot: read XLogData payloads, report the flushed position."""

    def __init__(self, settings: Settings, slot: str, publication: str) -> None:
        self.settings = settings
        self.slot = slot
        self.publication = publication
        self.conn: psycopg.Connection | None = None
        self.server_wal_end = 0
        self.reported_flush = 0
        self._last_report = 0.0
        self._reply_requested = False

    def start(self, start_lsn: int = 0) -> None:
        """Start streaming from the slot (at its confirmed position when `start_lsn` is 0)."""
        self.conn = connect_replication(self.settings)
        query = sql.SQL(
            "START_REPLICATION SLOT {slot} LOGICAL {lsn} "
            "(proto_version '1', publication_names {pubs})"
        ).format(
            slot=sql.Identifier(self.slot),
            lsn=sql.SQL(format_lsn(start_lsn)),
            pubs=sql.Literal(f'"{self.publication}"'),
        )
        pgconn = self.conn.pgconn
        result = pgconn.exec_(query.as_bytes(self.conn))
        if result.status != pq.ExecStatus.COPY_BOTH:
            message = (result.error_message or pgconn.error_message).decode(errors="replace")
            code = result.error_field(pq.DiagnosticField.SQLSTATE)
            self.close()
            raise StreamError(explain(message, code.decode() if code else None, self.slot))
        pgconn.nonblocking = 1

    def read(self, *, max_messages: int, max_seconds: float) -> list[bytes]:
        """Return the pgoutput payloads available now (never blocks longer than `max_seconds`)."""
        try:
            return self._read(max_messages, max_seconds)
        except psycopg.Error as exc:
            raise StreamError(self._lost(exc)) from None

    def _lost(self, exc: BaseException) -> str:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return (
            f"lost the replication connection of slot {self.slot} ({first}); restart "
            "`lakehouse stream` when Postgres is back: it resumes where it stopped"
        )

    def _read(self, max_messages: int, max_seconds: float) -> list[bytes]:
        assert self.conn is not None
        pgconn = self.conn.pgconn
        out: list[bytes] = []
        deadline = time.monotonic() + max_seconds
        waited = False
        while len(out) < max_messages:
            nbytes, data = pgconn.get_copy_data(1)
            if nbytes == 0:
                if waited or time.monotonic() >= deadline:
                    break
                # Nothing buffered: wait for the socket once, briefly, then drain.
                select.select([pgconn.socket], [], [], max(0.0, deadline - time.monotonic()))
                pgconn.consume_input()
                waited = True
                continue
            if nbytes < 0:
                self._raise_ended()
            kind = data[0]
            if kind == 119:  # 'w' XLogData: start, end, send time, payload
                wal_end = int.from_bytes(data[9:17], "big")
                self.server_wal_end = max(self.server_wal_end, wal_end)
                out.append(bytes(data[25:]))
            elif kind == 107:  # 'k' keepalive: wal end, send time, reply requested
                self.server_wal_end = max(self.server_wal_end, int.from_bytes(data[1:9], "big"))
                if data[17]:
                    self._reply_requested = True
        return out

    def due(self, interval: float) -> bool:
        """Tell whether a status report is due (the server asked, or `interval` passed)."""
        return self._reply_requested or time.monotonic() - self._last_report >= interval

    def report(self, flushed: int, *, ask_reply: bool = True) -> None:
        """Tell the server everything up to `flushed` is durable: the slot may advance."""
        try:
            self._report(flushed, ask_reply=ask_reply)
        except psycopg.Error as exc:
            raise StreamError(self._lost(exc)) from None

    def _report(self, flushed: int, *, ask_reply: bool) -> None:
        assert self.conn is not None
        flushed = max(flushed, self.reported_flush)
        now = int(time.time() * 1_000_000) - _PG_EPOCH_US
        message = (
            b"r"
            + flushed.to_bytes(8, "big")
            + flushed.to_bytes(8, "big")
            + flushed.to_bytes(8, "big")
            + now.to_bytes(8, "big", signed=True)
            + (b"\x01" if ask_reply else b"\x00")
        )
        pgconn = self.conn.pgconn
        if pgconn.put_copy_data(message) != 1:
            self._raise_ended()
        while pgconn.flush() == 1:
            select.select([], [pgconn.socket], [], 1.0)
        self.reported_flush = flushed
        self._last_report = time.monotonic()
        self._reply_requested = False

    def _raise_ended(self) -> None:
        assert self.conn is not None
        pgconn = self.conn.pgconn
        result = pgconn.get_result()
        message = pgconn.error_message.decode(errors="replace")
        code = None
        if result is not None:
            message = (result.error_message or b"").decode(errors="replace") or message
            raw = result.error_field(pq.DiagnosticField.SQLSTATE)
            code = raw.decode() if raw else None
        raise StreamError(explain(message or "the server ended the stream", code, self.slot))

    def close(self) -> None:
        """Close the connection (the slot keeps its confirmed position)."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
