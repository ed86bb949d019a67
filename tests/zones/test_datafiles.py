"""Tables created from Polars-written files: readable by every reader, stats never wrong."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl
import pytest
from deltalake import CommitProperties, Transaction

from lakehouse.settings import Settings
from lakehouse.storage import Storage
from lakehouse.zones.commits import ConcurrentWriteError
from lakehouse.zones.datafiles import TableFiles, file_stats

MOMENTS = [
    datetime(2026, 1, 1, 0, 0, 0, 1, tzinfo=UTC),  # 1 µs past a millisecond
    datetime(2026, 1, 1, 0, 0, 0, 999_999, tzinfo=UTC),  # 1 µs before the next second
]


def frame(rows: int, offset: int = 0) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "id": pl.Series(range(offset, offset + rows), dtype=pl.Int64),
            "name": [f"n{i % 3}" for i in range(rows)],
            "score": pl.Series([i / 2 for i in range(rows)], dtype=pl.Float64),
            "flag": [i % 2 == 0 for i in range(rows)],
            "at": [MOMENTS[i % 2] for i in range(rows)],
            "note": pl.Series([None] * rows, dtype=pl.String),
        }
    )


def test_stats_round_timestamps_outwards_and_skip_unsafe_values() -> None:
    stats = file_stats(
        frame(2).with_columns(
            score=pl.Series([0.5, float("nan")]),
            name=pl.Series(["x" * 40, "y"]),
        )
    )
    assert stats["numRecords"] == 2
    assert stats["minValues"]["at"] == "2026-01-01T00:00:00.000Z"
    assert stats["maxValues"]["at"] == "2026-01-01T00:00:01.000Z"
    assert stats["minValues"]["id"] == 0 and stats["maxValues"]["id"] == 1
    assert "score" not in stats["minValues"]  # NaN
    assert "name" not in stats["maxValues"]  # longer than delta-rs keeps
    assert "note" not in stats["minValues"]  # only nulls
    assert stats["nullCount"]["note"] == 2


def test_a_table_of_extreme_values_is_created_and_read_back(settings: Settings) -> None:
    """±Infinity has no JSON form: its statistics must be left out, not written invalid
    (a log entry with `Infinity` makes the table unreadable); instants at the edges of
    what Arrow holds, likewise."""
    storage = Storage.from_settings(settings)
    storage.check()
    edges = pl.DataFrame(
        {
            "x": [float("inf"), float("-inf"), float("nan"), -0.0, 5e-324, 1.7976931348623157e308],
            "at": [
                datetime(1, 1, 1, tzinfo=UTC),
                datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
                None,
                datetime(2026, 1, 1, tzinfo=UTC),
                datetime(1970, 1, 1, tzinfo=UTC),
                datetime(2000, 1, 1, tzinfo=UTC),
            ],
            "n": [-(2**63), 2**63 - 1, 0, 1, -1, None],
        }
    )
    table = TableFiles(storage, "silver", "edges_demo")
    table.add(edges)
    table.commit(CommitProperties(), failpoint_name="none")
    got = pl.read_delta(storage.uri("silver", "edges_demo"), storage_options=storage.options)
    assert got.equals(edges, null_equal=True)


def test_new_table_appears_whole_in_one_commit(settings: Settings) -> None:
    storage = Storage.from_settings(settings)
    storage.check()
    table = TableFiles(storage, "silver", "files_demo")
    table.add(frame(500))
    table.add(frame(0, offset=500))  # an empty part writes no file
    table.add(frame(300, offset=500))
    assert not storage.exists("silver", "files_demo")  # written, not committed
    props = CommitProperties(app_transactions=[Transaction("progress", 7)])
    table.commit(props, failpoint_name="none")

    dt = storage.table("silver", "files_demo")
    # Created empty (version 0), then every file in one commit with its progress.
    assert dt.version() == 1
    assert storage.table("silver", "files_demo", version=0).file_uris() == []
    assert len(dt.file_uris()) == 2
    assert dt.transaction_version("progress") == 7  # progress lands with the data
    expected = pl.concat([frame(500), frame(300, offset=500)])
    got = pl.read_delta(storage.uri("silver", "files_demo"), storage_options=storage.options)
    assert got.sort("id").equals(expected)

    # Readers that skip files by the stats still find the rows at the edges.
    from lakehouse import duck

    con = duck.connect(settings, storage)
    scan = duck.scan(storage.uri("silver", "files_demo"))
    for moment in MOMENTS:
        count = con.execute(f'SELECT count(*) FROM {scan} WHERE "at" = ?', [moment]).fetchone()
        assert count == (400,)
    assert con.execute(f"SELECT count(*) FROM {scan} WHERE id = 799").fetchone() == (1,)
    lazy = pl.scan_delta(storage.uri("silver", "files_demo"), storage_options=storage.options)
    assert lazy.filter(pl.col("at") == MOMENTS[1]).collect().height == 400


def test_two_writers_creating_one_table_land_once(settings: Settings) -> None:
    """delta-rs lets two concurrent CREATEs both commit: the files must still land once."""
    storage = Storage.from_settings(settings)
    storage.check()
    props = CommitProperties(app_transactions=[Transaction("progress", 7)])
    first, second = (
        TableFiles(storage, "silver", "files_race"),
        TableFiles(storage, "silver", "files_race"),
    )
    first.add(frame(10))
    second.add(frame(10))
    first.commit(props, failpoint_name="none", guard=["progress"])
    with pytest.raises(ConcurrentWriteError, match=r"another writer created silver\.files_race"):
        second.commit(props, failpoint_name="none", guard=["progress"])
    got = pl.read_delta(storage.uri("silver", "files_race"), storage_options=storage.options)
    assert got.height == 10


def test_an_existing_table_is_never_overwritten(settings: Settings) -> None:
    storage = Storage.from_settings(settings)
    storage.check()
    first = TableFiles(storage, "silver", "files_twice")
    first.add(frame(10))
    first.commit(CommitProperties(), failpoint_name="none")
    second = TableFiles(storage, "silver", "files_twice")
    second.add(frame(20))
    with pytest.raises(Exception, match=r"(?i)exist"):
        second.commit(CommitProperties(), failpoint_name="none")
    got = pl.read_delta(storage.uri("silver", "files_twice"), storage_options=storage.options)
    assert got.height == 10
