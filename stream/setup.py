"""Publications, slots and the snapshot that lines the stream up with bronze.

`setup` creates, per source table, a publication and a logical slot with an exported
snapshot, then lands the table's rows as seen by that very snapshot into `bronze.<table>`
(stamped with the slot's consistent point). Every transaction committed before the
point is in the snapshot, every one after is in the slot: no gap, no double count.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
from psycopg import pq, sql

from lakehouse.errors import first_line
from lakehouse.settings import Settings
from lakehouse.source.schema import TABLES, connect, ident
from lakehouse.storage import Storage
from lakehouse.zones import bronze
from stream.changes import changes_table, idle_at, progress, slot_name
from stream.pgoutput import format_lsn, parse_lsn
from stream.replication import SlotInfo, StreamError, connect_replication, explain


@dataclass(frozen=True)
class SetupResult:
    """What `setup` did for one table."""

    table: str
    slot: str
    created: bool
    snapshot_lsn: int | None
    snapshot_rows: int


def check_wal_level(conn: psycopg.Connection) -> None:
    """Fail with the fix when the server cannot decode logically."""
    row = conn.execute("SHOW wal_level").fetchone()
    if not row or row[0] != "logical":
        level = row[0] if row else "?"
        msg = (
            f"the source has wal_level={level}; CDC needs wal_level=logical: "
            "ALTER SYSTEM SET wal_level = logical, then restart Postgres"
        )
        raise StreamError(msg)


def slot_info(conn: psycopg.Connection, slot: str) -> SlotInfo | None:
    """Return a slot's state, or None when it does not exist."""
    row = conn.execute(
        "SELECT slot_name, active, (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint,"
        " (restart_lsn - '0/0'::pg_lsn)::bigint, wal_status,"
        " (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint"
        " FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    ).fetchone()
    return None if row is None else SlotInfo(*row)


def setup(
    settings: Settings, storage: Storage, tables: list[str] | None = None
) -> list[SetupResult]:
    """Create publications and slots and take the aligned snapshots (idempotent)."""
    results = []
    with connect(settings, autocommit=True) as conn:
        bronze.require_source(conn, settings.pg_schema)
        check_wal_level(conn)
        _check_replication_role(conn)
        for table in tables or list(TABLES):
            results.append(_setup_table(settings, storage, conn, table))
    return results


def _check_replication_role(conn: psycopg.Connection) -> None:
    row = conn.execute(
        "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    if not row or not row[0]:
        msg = (
            "the Postgres user may not use replication; `ALTER ROLE <user> WITH REPLICATION` "
            "(or run the stream as a role that has it)"
        )
        raise StreamError(msg)


def _setup_table(
    settings: Settings, storage: Storage, conn: psycopg.Connection, table: str
) -> SetupResult:
    name = slot_name(settings.pg_schema, table)
    exists = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (name,)).fetchone()
    if not exists:
        try:
            conn.execute(
                sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                    sql.Identifier(name), ident(settings.pg_schema, table)
                )
            )
        except psycopg.errors.InsufficientPrivilege as exc:
            msg = (
                f"the Postgres user may not create publication {name} ({first_line(exc)}); "
                "it needs CREATE on the database and ownership of the table (membership in "
                f"the owner's role): `GRANT CREATE ON DATABASE <db> TO <user>` and "
                f"`GRANT <owner of {settings.pg_schema}.{table}> TO <user>`"
            )
            raise StreamError(msg) from None
    info = slot_info(conn, name)
    if info is not None and bronze.stream_snapshot_lsn(storage, table):
        return SetupResult(table, name, False, bronze.stream_snapshot_lsn(storage, table), 0)
    if info is not None:
        # A slot without its snapshot in bronze: an earlier setup died half-way.
        _drop_slot(conn, name)
    repl = connect_replication(settings)
    try:
        query = sql.SQL("CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'export')").format(
            sql.Identifier(name)
        )
        result = repl.pgconn.exec_(query.as_bytes(repl))
        if result.status != pq.ExecStatus.TUPLES_OK:
            code = result.error_field(pq.DiagnosticField.SQLSTATE)
            message = (result.error_message or b"").decode(errors="replace")
            raise StreamError(explain(message, code.decode() if code else None, name))
        lsn_text, snapshot = (result.get_value(0, i) or b"" for i in (1, 2))
        lsn = parse_lsn(lsn_text.decode())
        # The exported snapshot lives until the next command on `repl`: use it now.
        ingested = bronze.ingest_snapshot(
            settings, storage, table, snapshot=snapshot.decode(), lsn=lsn
        )
    finally:
        repl.close()
    return SetupResult(table, name, True, lsn, ingested.rows)


def _drop_slot(conn: psycopg.Connection, name: str) -> None:
    try:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
    except psycopg.errors.ObjectInUse:
        msg = f"replication slot {name} is in use; stop `lakehouse stream` first"
        raise StreamError(msg) from None


def teardown(settings: Settings, storage: Storage, tables: list[str] | None = None) -> list[str]:
    """Drop the slots and publications; batch extraction takes over again."""
    dropped = []
    with connect(settings, autocommit=True) as conn:
        for table in tables or list(TABLES):
            name = slot_name(settings.pg_schema, table)
            if storage.table_or_none("bronze", table) is not None:
                bronze.forget_stream_snapshot(storage, table)
            if slot_info(conn, name) is not None:
                _drop_slot(conn, name)
                dropped.append(name)
            conn.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(name)))
    return dropped


@dataclass(frozen=True)
class TableStatus:
    """The stream's state for one table, for `lakehouse stream status`."""

    table: str
    slot: str
    slot_exists: bool
    active: bool
    wal_status: str | None
    lag_bytes: int | None
    confirmed_lsn: str | None
    landed_lsn: str | None
    changes: int
    last_commit_ts: datetime | None
    caught_up: bool | None = None
    """Every change published so far has landed (None: unknown, the slot is gone)."""

    @property
    def behind(self) -> str:
        """`caught up`, or how far the slot is behind, for people."""
        if self.caught_up:
            return "caught up"
        if self.caught_up is None or self.lag_bytes is None:
            return ""
        if not self.active:
            return f"changes pending ({self.lag_bytes:,} WAL bytes to read)"
        return f"in flight ({self.lag_bytes:,} WAL bytes to read)"

    @property
    def freshness_seconds(self) -> float | None:
        """Seconds since the newest landed change was committed in the source."""
        if self.last_commit_ts is None:
            return None
        return (datetime.now(UTC) - self.last_commit_ts).total_seconds()


def status(settings: Settings, storage: Storage) -> list[TableStatus]:
    """Return each table's slot lag, landed position and freshness."""
    import polars as pl

    out = []
    with connect(settings, autocommit=True) as conn:
        for table in TABLES:
            name = slot_name(settings.pg_schema, table)
            info = slot_info(conn, name)
            landed = progress(storage, table)
            dt = storage.table_or_none("bronze", changes_table(table))
            count, last_ts = 0, None
            if dt is not None:
                stats = (
                    pl.scan_delta(dt).select(pl.len(), pl.col("_commit_ts").max()).collect().row(0)
                )
                count, last_ts = int(stats[0]), stats[1]
            out.append(
                TableStatus(
                    table,
                    name,
                    info is not None,
                    bool(info and info.active),
                    info.wal_status if info else None,
                    info.lag_bytes if info else None,
                    format_lsn(info.confirmed_flush_lsn)
                    if info and info.confirmed_flush_lsn is not None
                    else None,
                    format_lsn(landed.flushed) if landed.flushed else None,
                    count,
                    last_ts,
                    _caught_up(conn, storage, table, info, landed.flushed),
                )
            )
    return out


def _caught_up(
    conn: psycopg.Connection, storage: Storage, table: str, info: SlotInfo | None, landed: int
) -> bool | None:
    """Tell whether every change published on the slot has landed.

    The server's WAL keeps growing with other tables' and other databases' work, so
    its distance from the landed position says little. A stopped stream's slot is
    asked (a peek decodes what is pending without consuming it); a running stream
    records, with each heartbeat, that it held nothing up to the landed position.
    """
    if info is None:
        return None
    if not info.active:
        try:
            row = conn.execute(
                "SELECT count(*) FROM pg_logical_slot_peek_binary_changes("
                "%s, NULL, 1, 'proto_version', '1', 'publication_names', %s)",
                (info.name, info.name),
            ).fetchone()
        except psycopg.errors.ObjectInUse:  # the stream started meanwhile
            return idle_at(storage, table) == landed
        except psycopg.errors.InsufficientPrivilege:  # a role without REPLICATION
            return None
        return bool(row and row[0] == 0)
    return landed > 0 and idle_at(storage, table) == landed
