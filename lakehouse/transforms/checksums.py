"""The same canonical text and hash of every source value, in Postgres and in DuckDB.

`lakehouse verify` compares silver with the source by checksums computed where the data
is: integers in decimal, doubles by their 64 bits with every NaN as one, text cleaned by
the same SQL as the rules, timestamps in microseconds; hashed with MD5 per key and
column. These build the SQL text for each side; they touch no connection.
"""

from __future__ import annotations

from collections.abc import Callable

from lakehouse.source import extract
from lakehouse.source.schema import SourceTable
from lakehouse.transforms import quality

NULL_TEXT = "'\\N'"
"""How a null value is written before hashing (Postgres' COPY text for null)."""


def hash_pg(text: str) -> str:
    """Postgres: the first 60 bits of MD5 of `text`, as a bigint."""
    return f"('x' || lpad(substr(md5({text}), 1, 15), 16, '0'))::bit(64)::bigint"


def hash_duck(text: str) -> str:
    """DuckDB: the same 60 bits of MD5 of `text`, as a BIGINT."""
    return f"('0x' || substr(md5({text}), 1, 15))::BIGINT"


def canon_pg(table: str, column: str, pg_type: str) -> str:
    """Postgres: a source column's value as canonical text."""
    c = f'"{column}"'
    if pg_type in ("bigint", "integer", "smallint"):
        return f"{c}::text"
    if pg_type == "double precision":
        # By its bits (so -0 differs from 0), except NaN: every NaN is the same value to
        # Postgres, whatever its payload, and the stream's text form carries none.
        return (
            f"CASE WHEN {c} = 'NaN'::float8 THEN 'NaN' ELSE "
            f"(('x' || encode(float8send({c}), 'hex'))::bit(64)::bigint)::text END"
        )
    if pg_type == "timestamptz":
        return (
            f"CASE WHEN {c} >= '{extract.REPRESENTABLE_FROM}'::timestamptz AND {c} < "
            f"'{extract.REPRESENTABLE_UNTIL}'::timestamptz THEN "
            f"(extract(epoch FROM {c}) * 1000000)::bigint::text END"
        )
    return quality.clean_sql(table, column, c)


def canon_duck(table: str, column: str, pg_type: str, *, typed: bool) -> str:
    """DuckDB: the same canonical text, from silver's typed columns or bronze's text."""
    c = f'"{column}"'
    if pg_type in ("bigint", "integer", "smallint"):
        return f"CAST({c} AS VARCHAR)"
    if pg_type == "double precision":
        return (
            f"CASE WHEN isnan(CAST({c} AS DOUBLE)) THEN 'NaN' ELSE "
            f"CAST(CAST(CAST(CAST({c} AS DOUBLE) AS BIT) AS BIGINT) AS VARCHAR) END"
        )
    if pg_type == "timestamptz":
        return f"CAST(epoch_us({c}) AS VARCHAR)"
    if typed and column == "previous_loan_defaults_on_file":
        return f"(CASE WHEN {c} THEN 'Yes' WHEN NOT {c} THEN 'No' END)"
    return quality.clean_sql(table, column, c)


def hashes(
    source: SourceTable,
    canon: Callable[[str, str], str],
    hash_: Callable[[str], str],
    as_text: Callable[[str], str],
) -> str:
    """One hash column per source column: MD5 of `key:value` as text, as an integer."""
    key = as_text(f'"{source.key}"')
    return ", ".join(
        f"{hash_(f'{key} || {chr(39)}:{chr(39)} || coalesce({canon(name, t)}, {NULL_TEXT})')}"
        f' AS "h_{name}"'
        for name, t in source.columns
    )
