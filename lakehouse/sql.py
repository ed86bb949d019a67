"""Read-only DuckDB SQL over the lakehouse: schemas bronze, silver and gold as Delta views."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import select
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, TextIO, TypeVar

import duckdb

from lakehouse import duck, interrupts
from lakehouse.errors import LakehouseError, SqlError, TableNotFoundError
from lakehouse.settings import Settings
from lakehouse.storage import ZONES, Storage

Format = Literal["table", "csv", "json"]


@dataclass(frozen=True)
class QueryResult:
    """Column names and rows of a query."""

    columns: list[str]
    rows: list[tuple[Any, ...]]
    #: True when the query had rows beyond those fetched (see `run_query`'s max_rows).
    more: bool = False


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
    settings: Settings,
    storage: Storage,
    query: str,
    *,
    as_of_version: int | None = None,
    max_rows: int | None = None,
    timeout: float | None = None,
) -> QueryResult:
    """Run one read-only query against the lakehouse views.

    With `max_rows`, at most that many rows are fetched (DuckDB streams the rest of the
    result away unread, so memory stays that of N rows) and `more` says if there were more.
    """

    def fetch(cursor: duckdb.DuckDBPyConnection) -> QueryResult:
        columns = [d[0] for d in cursor.description or []]
        if max_rows is None:
            return QueryResult(columns, cursor.fetchall())
        rows = cursor.fetchmany(max_rows + 1)
        return QueryResult(columns, rows[:max_rows], more=len(rows) > max_rows)

    return _execute(settings, storage, query, fetch, as_of_version=as_of_version, timeout=timeout)


def export_query(
    settings: Settings,
    storage: Storage,
    query: str,
    fmt: Literal["csv", "json"],
    out: TextIO,
    *,
    as_of_version: int | None = None,
    timeout: float | None = None,
) -> int:
    """Write a query's whole result to `out` as CSV or JSON Lines, a batch at a time.

    Memory stays that of one batch whatever the result's size; returns the rows written.
    """

    def write(cursor: duckdb.DuckDBPyConnection) -> int:
        columns = [d[0] for d in cursor.description or []]
        if fmt == "json":
            _check_json_names(columns)
        writer = csv.writer(out, lineterminator="\n")
        if fmt == "csv":
            writer.writerow(columns)
        written = 0
        while rows := cursor.fetchmany(_BATCH):
            if fmt == "csv":
                writer.writerows(_csv_cells(rows))
            else:
                out.write(_json_lines(columns, rows))
            written += len(rows)
        return written

    return _execute(settings, storage, query, write, as_of_version=as_of_version, timeout=timeout)


_BATCH = 10_000
_T = TypeVar("_T")


def _execute(
    settings: Settings,
    storage: Storage,
    query: str,
    consume: Callable[[duckdb.DuckDBPyConnection], _T],
    *,
    as_of_version: int | None,
    timeout: float | None,
) -> _T:
    """Check, open the views, run the query and hand its cursor to `consume`; stoppable."""
    check_read_only(query)
    if as_of_version is not None and as_of_version < 0:
        msg = f"--as-of-version is {as_of_version}; versions start at 0"
        raise SqlError(msg)
    if timeout is not None and timeout <= 0:
        msg = f"--timeout is {timeout:g}; give a number of seconds above 0"
        raise SqlError(msg)
    with _Stopper(timeout) as stopper:
        con, missing = open_views(settings, storage, as_of_version=as_of_version)
        try:
            stopper.attach(con)
            return consume(con.execute(query))
        except duckdb.InterruptException:
            if stopper.interrupted:
                raise KeyboardInterrupt from None
            msg = (
                f"query stopped after --timeout {timeout:g} s: narrow it (WHERE, LIMIT) or "
                "raise --timeout"
            )
            raise SqlError(msg) from None
        except duckdb.CatalogException as exc:
            raise _unknown_table(exc, query, missing, as_of_version) from None
        except duckdb.ParserException as exc:
            msg = f"SQL syntax error: {_one_line(exc)}"
            raise SqlError(msg) from None
        except duckdb.Error as exc:
            msg = f"SQL error: {_one_line(exc)}"
            raise SqlError(msg) from None
        finally:
            stopper.attach(None)
            con.close()


class _Stopper:
    """Stop a DuckDB query on Ctrl-C or at a deadline, while it runs in the main thread.

    Python runs a signal handler only between bytecodes, never while DuckDB computes with
    the GIL released, so Ctrl-C did nothing until the query ended. But the C-level
    handler writes every signal to the wakeup fd, from whatever thread the kernel chose:
    a watcher thread reads it and asks DuckDB to stop (`interrupt` is safe from another
    thread). The query itself stays in the main thread: run in another thread, a query
    that SIGINT reached ended the thread without unwinding it, and the process aborted at
    exit ("terminate called without an active exception", duckdb 1.5).
    """

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.interrupted = False
        self.timed_out = False
        self._con: duckdb.DuckDBPyConnection | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._restore: list[Callable[[], object]] = []

    def __enter__(self) -> _Stopper:
        read_fd = None
        if threading.current_thread() is threading.main_thread():
            read_fd, write_fd = os.pipe()
            os.set_blocking(write_fd, False)
            old_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
            old_handler = signal.signal(signal.SIGINT, self._on_sigint)
            self._restore = [
                lambda: signal.signal(signal.SIGINT, old_handler),
                lambda: signal.set_wakeup_fd(old_fd),
                lambda: os.close(read_fd),
                lambda: os.close(write_fd),
            ]
        if read_fd is not None or self.timeout is not None:
            watcher = threading.Thread(
                target=self._watch, args=(read_fd,), name="lakehouse-sql-stop", daemon=True
            )
            watcher.start()
            self._restore.insert(0, watcher.join)
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        for undo in self._restore:
            undo()

    def _on_sigint(self, signum: int, frame: object) -> None:
        interrupts.note()
        self.interrupted = True  # the watcher stops the query; see `attach` for before it

    def attach(self, con: duckdb.DuckDBPyConnection | None) -> None:
        """Let the query on `con` be stopped; raise if it was stopped before it started.

        `None` detaches, before the connection closes.
        """
        with self._lock:
            self._con = con
        if con is None:
            return
        if self.interrupted or interrupts.received():  # also one swallowed before this
            raise KeyboardInterrupt
        if self.timed_out:
            msg = "stopped before it started"
            raise duckdb.InterruptException(msg)

    def _watch(self, read_fd: int | None) -> None:
        # Once asked, interrupt again at every tick: an interrupt reaches only a query
        # that is running, and this one may not have started yet.
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while not self._done.is_set():
            fds = [read_fd] if read_fd is not None else []
            ready, _, _ = select.select(fds, [], [], 0.05)
            # The fd carries the signal numbers: the Python-level handler runs only once
            # the main thread is back in Python, which may be when the query is over.
            if ready and signal.SIGINT in os.read(read_fd, 512):  # type: ignore[arg-type]
                self.interrupted = True
            if interrupts.received():  # a Ctrl-C whose KeyboardInterrupt was swallowed
                self.interrupted = True
            if deadline is not None and time.monotonic() >= deadline:
                self.timed_out = True
            if self.interrupted or self.timed_out:
                with self._lock:
                    if self._con is not None:
                        self._con.interrupt()


def _unknown_table(
    exc: duckdb.CatalogException, query: str, missing: dict[str, str], as_of_version: int | None
) -> LakehouseError:
    text = _one_line(exc)
    match = re.search(r"Table with name (\w+) does not exist", text)
    if not match:
        return SqlError(f"SQL error: {text}")
    name = _qualified(query, match.group(1))
    if name in missing:
        return TableNotFoundError(f"table `{name}` has no version {as_of_version}: {missing[name]}")
    return TableNotFoundError(
        f"unknown table `{name}`; tables are named zone.table (bronze., silver., gold.): "
        "see `lakehouse tables`"
    )


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


def _check_json_names(columns: list[str]) -> None:
    twice = sorted({c for c in columns if columns.count(c) > 1})
    if twice:
        msg = (
            f"column `{twice[0]}` appears twice in the result; JSON objects need distinct "
            "names: rename one with AS (or use --format csv)"
        )
        raise SqlError(msg)


def _json_lines(columns: list[str], rows: list[tuple[Any, ...]]) -> str:
    return "".join(
        json.dumps(dict(zip(columns, map(_plain, r), strict=True)), default=str) + "\n"
        for r in rows
    )


def _csv_cells(rows: list[tuple[Any, ...]]) -> list[list[Any]]:
    return [["" if v is None else _plain(v) for v in r] for r in rows]


def render(result: QueryResult, fmt: Format = "table", *, max_rows: int | None = None) -> str:
    """Render a result as an aligned table, CSV or JSON Lines (one object per row)."""
    rows = result.rows if max_rows is None else result.rows[:max_rows]
    if fmt == "json":
        _check_json_names(result.columns)
        return _json_lines(result.columns, rows)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(result.columns)
        writer.writerows(_csv_cells(rows))
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
    if result.more:
        footer = f"(more than {shown} rows, {shown} shown: raise --max-rows to see more)"
    else:
        footer = f"({len(result.rows)} row{'s' if len(result.rows) != 1 else ''}"
        footer += f", {shown} shown)" if shown < len(result.rows) else ")"
    out.append(footer)
    return "\n".join(out) + "\n"
