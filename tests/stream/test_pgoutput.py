"""The pgoutput decoder, on messages a real server produced, and the columnar decoder."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import polars as pl
import psycopg
import pytest

from lakehouse.settings import Settings
from lakehouse.source.schema import SourceTable
from stream import pgoutput
from stream.changes import BatchBuilder, Progress


@pytest.fixture
def slot(base_settings: Settings) -> tuple[psycopg.Connection, str, str]:
    """A scratch table with every column type the lakehouse uses, a publication and a slot."""
    conn = psycopg.connect(base_settings.pg_dsn.get(), autocommit=True)
    # The session server runs with synchronous_commit off; decoding reads flushed WAL only.
    conn.execute("SET synchronous_commit = on")
    name = f"dec_{uuid.uuid4().hex[:8]}"
    s = base_settings.pg_schema
    conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{s}"')
    conn.execute(f"CREATE TYPE \"{s}\".mood AS ENUM ('ok', 'sad')")
    conn.execute(
        f'CREATE TABLE "{s}".{name} (id bigint PRIMARY KEY, i integer, sm smallint, '
        "d double precision, t text, ts timestamptz, b boolean, day date, n numeric, "
        f'm "{s}".mood)'
    )
    conn.execute(f'CREATE PUBLICATION {name} FOR TABLE "{s}".{name}')
    conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
    yield conn, name, s
    conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
    conn.execute(f"DROP PUBLICATION {name}")
    conn.close()


def peek(conn: psycopg.Connection, name: str) -> list[bytes]:
    rows = conn.execute(
        "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, "
        "'proto_version', '1', 'publication_names', %s, 'messages', 'true')",
        (name, name),
    ).fetchall()
    return [bytes(r[0]) for r in rows]


def test_every_message_kind_and_column_type(slot: tuple[psycopg.Connection, str, str]) -> None:
    conn, name, s = slot
    table = f'"{s}".{name}'
    big = "x" * 10 + "é" * 3
    with conn.transaction():
        conn.execute(
            f"INSERT INTO {table} VALUES (1, -2, 3, 1.5, %s, '2026-01-02 03:04:05.123456+00', "
            "true, '2026-02-03', 12.50, 'ok'), (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, "
            "NULL, NULL)",
            (big,),
        )
        conn.execute("SELECT pg_logical_emit_message(true, 'lakehouse', 'hello')")
    conn.execute(f"UPDATE {table} SET i = 7 WHERE id = 1")
    conn.execute(f"UPDATE {table} SET id = 10 WHERE id = 2")  # key change: old key sent
    conn.execute(f"DELETE FROM {table} WHERE id = 10")
    conn.execute(f"ALTER TABLE {table} REPLICA IDENTITY FULL")
    conn.execute(f"DELETE FROM {table} WHERE id = 1")  # whole old row sent
    conn.execute(f"TRUNCATE {table}")
    messages = [pgoutput.decode(m) for m in peek(conn, name)]
    kinds = [type(m).__name__ if not isinstance(m, pgoutput.Change) else m.op for m in messages]
    assert kinds.count("Begin") == kinds.count("Commit") == 6
    assert {"Relation", "insert", "update", "delete", "Truncate", "Ignored"} <= set(kinds)

    relation = next(m for m in messages if isinstance(m, pgoutput.Relation))
    assert relation.namespace == s and relation.name == name
    assert relation.column_names == ["id", "i", "sm", "d", "t", "ts", "b", "day", "n", "m"]
    assert [c.type_oid for c in relation.columns][:9] == [20, 23, 21, 701, 25, 1184, 16, 1082, 1700]
    assert [c.is_key for c in relation.columns] == [True] + [False] * 9
    assert any(isinstance(m, pgoutput.Ignored) and m.kind == "type" for m in messages)
    assert any(isinstance(m, pgoutput.Ignored) and m.kind == "message" for m in messages)

    changes = [m for m in messages if isinstance(m, pgoutput.Change)]
    first = changes[0]
    assert first.new == [
        b"1",
        b"-2",
        b"3",
        b"1.5",
        big.encode(),
        b"2026-01-02 03:04:05.123456+00",
        b"t",
        b"2026-02-03",
        b"12.50",
        b"ok",
    ]
    assert changes[1].new == [b"2"] + [None] * 9
    update, moved, deleted, deleted_full = changes[2], changes[3], changes[4], changes[5]
    assert update.op == "update" and update.old is None and update.new is not None
    assert update.new[1] == b"7"
    assert moved.old_kind == "K" and moved.old is not None and moved.old[0] == b"2"
    assert moved.new is not None and moved.new[0] == b"10"
    assert deleted.op == "delete" and deleted.old_kind == "K" and deleted.old is not None
    assert deleted.old[0] == b"10" and deleted.old[1:] == [None] * 9
    assert deleted_full.old_kind == "O" and deleted_full.old is not None
    assert deleted_full.old[1] == b"7"
    truncate = next(m for m in messages if isinstance(m, pgoutput.Truncate))
    assert truncate.relation_oids == (relation.oid,)

    begin = next(m for m in messages if isinstance(m, pgoutput.Begin))
    commit = next(m for m in messages if isinstance(m, pgoutput.Commit))
    assert begin.final_lsn == commit.commit_lsn < commit.end_lsn
    assert abs(begin.commit_ts - datetime.now(UTC)) < timedelta(minutes=5)


def test_unchanged_toast_and_lsn_text() -> None:
    row = b"I" + (16384).to_bytes(4, "big") + b"N" + (3).to_bytes(2, "big")
    row += b"t" + (2).to_bytes(4, "big") + b"42" + b"u" + b"n"
    change = pgoutput.decode(row)
    assert isinstance(change, pgoutput.Change)
    assert change.new == [b"42", pgoutput.UNCHANGED, None]
    assert pgoutput.format_lsn(pgoutput.parse_lsn("16/B374D848")) == "16/B374D848"
    with pytest.raises(pgoutput.DecodeError):
        pgoutput.decode(b"Z")


def test_columnar_decoding_matches_the_reference_decoder(
    slot: tuple[psycopg.Connection, str, str], base_settings: Settings
) -> None:
    """The numpy decoder (what the stream lands) agrees with `pgoutput.decode`, row by row."""
    conn, name, s = slot
    table = f'"{s}".{name}'
    conn.execute(
        f"INSERT INTO {table} (id, i, sm, d, t, ts, b, day, n) "
        "SELECT g, g * 3, g % 7, g / 3.0, repeat('ab', g % 5), "
        "'2026-01-01'::timestamptz + g * interval '1 second', g % 2 = 0, "
        "'2026-01-01'::date + g, g / 7.0 FROM generate_series(1, 500) g"
    )
    conn.execute(f"UPDATE {table} SET t = NULL, id = id + 1000 WHERE id % 50 = 0")
    conn.execute(f"DELETE FROM {table} WHERE id % 40 = 1")
    payloads = peek(conn, name)
    builder = BatchBuilder(
        "scratch", skip=Progress(), source=SourceTable("scratch", "id", (("id", "bigint"),))
    )
    for payload in payloads:
        builder.feed(payload)
    frame = builder.take().to_frame()
    reference = [m for m in map(pgoutput.decode, payloads) if isinstance(m, pgoutput.Change)]
    assert frame.height == len(reference) == 500 + 10 + 13
    for row, change in zip(frame.iter_rows(named=True), reference, strict=True):
        values = change.new if change.new is not None else change.old
        assert values is not None
        assert row["_op"] == change.op
        assert row["id"] == int(values[0])
        assert row["t"] == (values[4].decode() if isinstance(values[4], bytes) else None)
        if change.op == "insert":
            assert row["i"] == int(values[1])
            assert row["ts"] == datetime.fromisoformat(values[5].decode() + ":00")
            assert row["b"] == (values[6] == b"t")
            assert row["n"] == values[8].decode()  # numeric stays exact text
        if change.old is not None:
            assert row["_old_key"] == int(change.old[0])
    assert frame.schema["ts"] == pl.Datetime("us", "UTC")
    assert frame.schema["day"] == pl.Date
