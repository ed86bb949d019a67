"""Tables kept open by the stream's loops stay true to what is on disk.

`KeptTables` brings an open table up to date instead of opening it again. A table deleted
and created again under the same name (a rebuild of silver while a stream runs) must be
read as the new table, whatever its number of versions, never as a mix of the two.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import write_deltalake

from lakehouse.settings import Settings
from lakehouse.storage import KeptTables, Storage, opened_once


def _write(uri: str, values: list[int]) -> None:
    write_deltalake(uri, pa.table({"v": pa.array(values, pa.int64())}), mode="append")


def _values(storage: Storage, kept: KeptTables) -> list[int]:
    return sorted(kept.latest("silver", "kept").to_pyarrow_table()["v"].to_pylist())


@pytest.mark.parametrize("settings", ["local"], indirect=True)
@pytest.mark.parametrize("versions_after", [1, 3, 4, 6])
def test_a_kept_table_deleted_and_created_again_is_read_as_the_new_one(
    settings: Settings, versions_after: int
) -> None:
    storage = Storage.from_settings(settings)
    uri = storage.uri("silver", "kept")
    _write(uri, [1])
    for v in (2, 3, 4):
        _write(uri, [v])  # versions 0-3
    kept = KeptTables(storage)
    assert _values(storage, kept) == [1, 2, 3, 4]
    _write(uri, [5])
    assert _values(storage, kept) == [1, 2, 3, 4, 5]  # brought up to date

    shutil.rmtree(Path(uri))  # fewer, as many, or more versions than the one held
    for v in range(versions_after):
        _write(uri, [100 + v])
    assert _values(storage, kept) == [100 + v for v in range(versions_after)]


@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_inside_a_block_a_table_is_one_snapshot_and_fresh_sees_other_writers(
    settings: Settings,
) -> None:
    storage = Storage.from_settings(settings)
    uri = storage.uri("silver", "kept")
    _write(uri, [1])
    with opened_once():
        first = storage.table("silver", "kept")
        _write(uri, [2])  # another writer
        assert storage.table("silver", "kept") is first  # the block's snapshot
        assert first.version() == 0
        assert storage.table("silver", "kept", fresh=True).version() == 1
        assert storage.table("silver", "kept", version=0) is first
    assert storage.table("silver", "kept").version() == 1  # outside: opened anew
