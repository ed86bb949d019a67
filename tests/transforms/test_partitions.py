"""Every key lands in exactly one partition, and the spool's label is the readers' filter
(Polars' and DuckDB's spelling of the rule alike)."""

from __future__ import annotations

import duckdb
import polars as pl
from hypothesis import given
from hypothesis import strategies as st

from lakehouse.transforms.partitions import in_part, key_part, key_part_sql

INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@given(keys=st.lists(st.one_of(st.none(), INT64), max_size=40), parts=st.integers(1, 17))
def test_each_key_is_in_exactly_one_partition(keys: list[int | None], parts: int) -> None:
    frame = pl.DataFrame({"k": keys}, schema={"k": pl.Int64})
    seen = [frame.filter(in_part("k", (p, parts)))["k"].to_list() for p in range(parts)]
    assert sorted(k for part in seen for k in part if k is not None) == sorted(
        k for k in keys if k is not None
    )
    assert sum(len(part) for part in seen) == len(keys)
    # The label the spool writes (with more than one part) names the part that reads it.
    if parts > 1:
        labels = frame.select(key_part("k", parts))["k"].to_list()
        for key, label in zip(keys, labels, strict=True):
            expected = 0 if key is None else key % parts  # Python's floor modulo, by hand
            assert label == expected


@given(keys=st.lists(st.one_of(st.none(), INT64), max_size=40), parts=st.integers(1, 17))
def test_duckdb_puts_each_key_where_polars_does(keys: list[int | None], parts: int) -> None:
    frame = pl.DataFrame({"k y": keys}, schema={"k y": pl.Int64})
    polars_parts = frame.select(key_part("k y", parts))["k y"].to_list()
    con = duckdb.connect()
    con.register("frame", frame.to_arrow())
    duckdb_parts = [
        row[0] for row in con.execute(f"SELECT {key_part_sql('k y', parts)} FROM frame").fetchall()
    ]
    assert duckdb_parts == polars_parts
