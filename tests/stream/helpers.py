"""Helpers for CDC tests: a witness slot, running the flow, waiting until changes land."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace

import polars as pl
import psycopg
from bytewax.testing import run_main

from lakehouse.settings import Settings
from lakehouse.source.schema import TABLES
from lakehouse.storage import Storage
from stream import cdc, changes
from tests.helpers import read


def stream_settings(settings: Settings) -> Settings:
    """Short batch and heartbeat intervals so tests do not wait."""
    return replace(
        settings, stream_batch_seconds=0.2, stream_heartbeat_seconds=0.2, stream_batch_rows=5_000
    )


class Witness:
    """An independent record of every source change: a test_decoding slot of its own.

    Created before the stream's slots, it sees every transaction the stream must land;
    `changes()` parses its text output, which shares no code with the pgoutput path.
    """

    _LINE = re.compile(r"^table (?P<schema>[^.]+)\.(?P<table>\w+): (?P<op>[A-Z]+): (?P<rest>.*)$")

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.slot = f"witness_{settings.pg_schema}"
        with self.connect() as conn:
            conn.execute(
                "SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (self.slot,)
            )

    def connect(self) -> psycopg.Connection:
        return psycopg.connect(self.settings.pg_dsn.get(), autocommit=True)

    def changes(self, table: str) -> dict[int, tuple[int, Counter[tuple[str, int | None]]]]:
        """Return {xid: (end LSN of the commit, Counter of (op, key))} for `table`."""
        key = TABLES[table].key
        out: dict[int, tuple[int, Counter[tuple[str, int | None]]]] = {}
        current: Counter[tuple[str, int | None]] = Counter()
        with self.connect() as conn:
            rows = conn.execute(
                "SELECT (lsn - '0/0'::pg_lsn)::bigint, xid::text::bigint, data "
                "FROM pg_logical_slot_peek_changes(%s, NULL, NULL, 'include-xids', '1')",
                (self.slot,),
            ).fetchall()
        for lsn, xid, data in rows:
            if data.startswith("BEGIN"):
                current = Counter()
            elif data.startswith("COMMIT"):
                if current:
                    out[xid] = (lsn, current)
            else:
                m = self._LINE.match(data)
                if not m or m["schema"] != self.settings.pg_schema or m["table"] != table:
                    continue
                op = m["op"].lower()
                rest = m["rest"]
                if op == "truncate":
                    current[("truncate", None)] += 1
                    continue
                if op == "update" and rest.startswith("old-key:"):
                    rest = rest.split("new-tuple:", 1)[1]
                found = re.search(rf"\b{key}\[bigint\]:(\d+)", rest)
                current[(op, int(found.group(1)) if found else None)] += 1
        return out


def bronze_changes(
    storage: Storage, table: str
) -> dict[int, tuple[int, Counter[tuple[str, int | None]]]]:
    """Return bronze's change rows in the witness's shape: {xid: (end LSN, Counter)}."""
    frame = read(storage, "bronze", changes.changes_table(table))
    key = TABLES[table].key
    out: dict[int, tuple[int, Counter[tuple[str, int | None]]]] = {}
    ends = dict(frame.group_by("_xid").agg(pl.col("_end_lsn").max()).iter_rows())
    for xid, op, value in frame.select("_xid", "_op", key).iter_rows():
        # Rows of a transaction larger than a micro-batch land before its end is known.
        entry = out.setdefault(xid, (ends[xid], Counter()))
        entry[1][(op, value)] += 1
    return out


def assert_exactly_once(witness: Witness, storage: Storage, table: str, snapshot_lsn: int) -> int:
    """Every change committed after the snapshot is in bronze once; nothing else is."""
    frame = read(storage, "bronze", changes.changes_table(table))
    positions = frame.select("_commit_lsn", "_seq")
    assert positions.n_unique() == frame.height, "a change landed twice"
    seen = witness.changes(table)
    wanted = {xid: v for xid, v in seen.items() if v[0] > snapshot_lsn}
    got = bronze_changes(storage, table)
    assert set(got) == set(wanted), (
        f"missing xids {sorted(set(wanted) - set(got))[:5]}, "
        f"unexpected {sorted(set(got) - set(wanted))[:5]}"
    )
    for xid, (end, counts) in wanted.items():
        got_end, got_counts = got[xid]
        assert got_counts == counts, (xid, got_counts, counts)
        # None only when every piece of a transaction bigger than a batch landed before
        # its Commit message arrived (documented on `_end_lsn`).
        assert got_end in (end, None), (xid, got_end, end)
    return frame.height


def current_lsn(settings: Settings) -> int:
    with psycopg.connect(settings.pg_dsn.get(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint"
        ).fetchone()
        assert row is not None
        return int(row[0])


def wait_landed(
    settings: Settings,
    storage: Storage,
    lsn: int,
    timeout: float = 90,
    ended: threading.Event | None = None,
) -> None:
    """Wait until every table's change log has landed everything before `lsn`.

    With `ended` (set when the flow stops), stop waiting for a flow that is gone.
    """
    deadline = time.monotonic() + timeout
    while True:
        done = [changes.progress(storage, t).flushed >= lsn for t in TABLES]
        if all(done):
            return
        assert ended is None or not ended.is_set(), f"the flow ended before {lsn} landed"
        assert time.monotonic() < deadline, f"changes before {lsn} not landed: {done}"
        time.sleep(0.2)


def stream_while(
    settings: Settings, storage: Storage, work: Callable[[], None], *, promote: bool = False
) -> None:
    """Run the dataflow in this process while `work` runs; stop once all of it landed."""
    errors: list[BaseException] = []
    ended = threading.Event()

    def driver() -> None:
        try:
            work()
            wait_landed(settings, storage, current_lsn(settings), ended=ended)
        except BaseException as exc:  # re-raised in the test thread below
            errors.append(exc)
        finally:
            cdc.STOP.set()

    cdc.STOP.clear()
    thread = threading.Thread(target=driver)
    thread.start()
    try:
        run_main(cdc.build_flow(settings, promote=promote))
    finally:
        ended.set()
        cdc.STOP.set()
        thread.join()
        cdc.STOP.clear()
    if errors:
        raise errors[0]
