"""The one rule that splits a table's keys into partitions, for every reader of a part.

A promotion reads a large backlog in key partitions: the spool writes each row under its
partition, readers filter by it, gold computes per partition. If two of those used
different rules, a key would be promoted twice or not at all, so all of them call these.
"""

from __future__ import annotations

import polars as pl


def key_part(column: str, parts: int) -> pl.Expr:
    """Return the partition (0 .. parts-1) of each row's key; a null key is partition 0.

    Polars' `%` is a floor modulo, so negative keys land in 0 .. parts-1 too.
    """
    return pl.col(column).fill_null(0) % parts


def in_part(column: str, part: tuple[int, int]) -> pl.Expr:
    """Select the rows of key partition `part` = (index, count)."""
    index, parts = part
    if parts == 1:
        return pl.lit(True)
    return key_part(column, parts) == index


def key_part_sql(column: str, parts: int) -> str:
    """Return `key_part` as a DuckDB expression over a quoted column.

    DuckDB's `%` keeps the sign of the dividend (-5 % 4 = -1), so the floor modulo is
    spelt out: a negative or null key lands in the same partition as in Polars.
    """
    quoted = '"' + column.replace('"', '""') + '"'
    return f"((coalesce({quoted}, 0) % {parts}) + {parts}) % {parts}"
