"""Read-only DuckDB SQL over the lakehouse: schemas bronze, silver and gold as Delta views."""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import duckdb

from lakehouse import duck
from lakehouse.errors import SqlError, TableNotFoundError
from lakehouse.settings import Settings
from lakehouse.storage import ZONES, Storage

Format = Literal["table", "csv", "json"]


@dataclass(frozen=True)
class QueryResult:
    """Column names and rows of a query."""

    columns: list[str]
    rows: list[tuple[Any, ...]]


def check_read_only(query: str) -> None:
    """Accept one SELECT, PIVOT or EXPLAIN of one; anything else gets a clear error.

    The second line of defence: the connection itself cannot write (`lock_down`).
    EXPLAIN ANALYZE runs its statement, so what it explains is checked too; a PIVOT
    without an IN list parses as a CREATE TYPE (its columns) and the SELECT.
    """
    statements = _statements(query)
    pivot = re.match(r"\s*(UN)?PIVOT\b", query, re.IGNORECASE) is not None
    kinds = [s.type for s in statements]
    if pivot and kinds == [duckdb.StatementType.CREATE, duckdb.StatementType.SELECT]:
        return
    if len(statements) != 1:
        msg = f"give exactly one statement, not {len(statements)}; `lakehouse sql` runs one query"
        raise SqlError(msg)
    kind = kinds[0]
    if kind == duckdb.StatementType.EXPLAIN:
        explained = re.match(r"\s*EXPLAIN\s+(ANALY[SZ]E\s+)?(?P<rest>.*)", query, re.I | re.S)
        try:
            inner = _statements(explained.group("rest")) if explained else []
        except SqlError:  # (a comment before ANALYZE, say): not a checkable SELECT
            inner = []
        if len(inner) == 1 and inner[0].type == duckdb.StatementType.SELECT:
            return
        kind = inner[0].type if len(inner) == 1 else kind
    if kind != duckdb.StatementType.SELECT:
        name = kind.name if hasattr(kind, "name") else str(kind)
        msg = (
            f"`lakehouse sql` is read-only: a {name} statement is not allowed; "
            "use SELECT (tables change only through the pipeline)"
        )
        raise SqlError(msg)


def _statements(query: str) -> list[duckdb.Statement]:
    try:
        return duckdb.extract_statements(query)
    except duckdb.ParserException as exc:
        msg = f"SQL syntax error: {_one_line(exc)}"
        raise SqlError(msg) from None


def lock_down(con: duckdb.DuckDBPyConnection, storage: Storage) -> None:
    """Make the connection read the warehouse and nothing else, for good.

    After the views exist: no file or URL outside the warehouse (so no local file, no
    Postgres password file), no extension installed or loaded, and the configuration
    locked so no statement can undo it. Writing is refused by `check_read_only`.
    """
    root = storage.root.rstrip("/") + "/"
    con.execute(f"SET allowed_directories = [{duck.literal(root)}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET lock_configuration = true")


def open_views(
    settings: Settings, storage: Storage, *, as_of_version: int | None = None
) -> tuple[duckdb.DuckDBPyConnection, dict[str, str]]:
    """Connect DuckDB with a view per Delta table; return it and the tables left out.

    With `as_of_version`, each view shows that version of its table; a table without that
    version is left out and named in the returned dict (`zone.table` -> reason).
    """
    con = duck.connect(settings, storage)
    missing: dict[str, str] = {}
    for zone in ZONES:
        con.execute(f"CREATE SCHEMA IF NOT EXISTS {duck.quote(zone)}")
    for zone, table in storage.list_tables():
        version = None
        if as_of_version is not None:
            latest = storage.table(zone, table).version()
            if as_of_version > latest:
                missing[f"{zone}.{table}"] = f"its latest version is {latest}"
                continue
            gone = _gone(storage, zone, table, as_of_version)
            if gone:
                missing[f"{zone}.{table}"] = gone
                continue
            version = as_of_version
        con.execute(
            f"CREATE VIEW {duck.quote(zone)}.{duck.quote(table)} AS SELECT * FROM "
            + duck.scan(storage.uri(zone, table), version)
        )
    lock_down(con, storage)
    return con, missing


def _gone(storage: Storage, zone: str, table: str, version: int) -> str | None:
    """Say why an old version cannot be read any more (None: it can)."""
    from lakehouse.storage import _split_s3, minio_client

    reason = (
        "`lakehouse maintain` removed its files (it keeps LAKEHOUSE_VACUUM_RETENTION_HOURS of "
        "time travel)"
    )
    try:
        uris = storage.table(zone, table, version=version).file_uris()
    except Exception:  # its log entry was cleaned up
        return reason
    if not storage.is_s3:
        missing = any(not Path(u.removeprefix("file://")).exists() for u in uris)
        return reason if missing else None
    client = minio_client(storage.s3, storage.options)
    for uri in uris:
        try:
            client.stat_object(*_split_s3(uri))
        except Exception:
            return reason
    return None


def run_query(
    settings: Settings, storage: Storage, query: str, *, as_of_version: int | None = None
) -> QueryResult:
    """Run one read-only query against the lakehouse views."""
    check_read_only(query)
    if as_of_version is not None and as_of_version < 0:
        msg = f"--as-of-version is {as_of_version}; versions start at 0"
        raise SqlError(msg)
    con, missing = open_views(settings, storage, as_of_version=as_of_version)
    try:
        cursor = con.execute(query)
        columns = [d[0] for d in cursor.description or []]
        return QueryResult(columns, cursor.fetchall())
    except duckdb.CatalogException as exc:
        text = _one_line(exc)
        match = re.search(r"Table with name (\w+) does not exist", text)
        if not match:
            msg = f"SQL error: {text}"
            raise SqlError(msg) from None
        name = _qualified(query, match.group(1))
        if name in missing:
            msg = f"table `{name}` has no version {as_of_version}: {missing[name]}"
            raise TableNotFoundError(msg) from None
        msg = (
            f"unknown table `{name}`; tables are named zone.table (bronze., silver., gold.): "
            "see `lakehouse tables`"
        )
        raise TableNotFoundError(msg) from None
    except duckdb.ParserException as exc:
        msg = f"SQL syntax error: {_one_line(exc)}"
        raise SqlError(msg) from None
    except duckdb.Error as exc:
        msg = f"SQL error: {_one_line(exc)}"
        raise SqlError(msg) from None
    finally:
        con.close()


def _qualified(query: str, name: str) -> str:
    """Find how the query qualified the unknown table `name` (`silver.x`), if it did."""
    match = re.search(r'(\w+)"?\s*\.\s*"?' + re.escape(name) + r"\b", query)
    return f"{match.group(1)}.{name}" if match else name


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _plain(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    return value


def render(result: QueryResult, fmt: Format = "table", *, max_rows: int | None = None) -> str:
    """Render a result as an aligned table, CSV or JSON Lines (one object per row)."""
    rows = result.rows if max_rows is None else result.rows[:max_rows]
    if fmt == "json":
        twice = sorted({c for c in result.columns if result.columns.count(c) > 1})
        if twice:
            msg = (
                f"column `{twice[0]}` appears twice in the result; JSON objects need distinct "
                "names: rename one with AS (or use --format csv)"
            )
            raise SqlError(msg)
        return "".join(
            json.dumps(dict(zip(result.columns, map(_plain, r), strict=True)), default=str) + "\n"
            for r in rows
        )
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(result.columns)
        writer.writerows([["" if v is None else _plain(v) for v in r] for r in rows])
        return buf.getvalue()
    cells = [["NULL" if v is None else str(_plain(v)) for v in r] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(result.columns)]
    numeric = [
        all(isinstance(r[i], int | float | Decimal) or r[i] is None for r in rows) and bool(rows)
        for i in range(len(result.columns))
    ]

    def line(values: list[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return " | ".join(parts).rstrip()

    out = [line(result.columns), "-+-".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    shown = len(rows)
    footer = f"({len(result.rows)} row{'s' if len(result.rows) != 1 else ''}"
    footer += f", {shown} shown)" if shown < len(result.rows) else ")"
    out.append(footer)
    return "\n".join(out) + "\n"
