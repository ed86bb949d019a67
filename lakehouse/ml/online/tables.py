"""The online store's tables in SQLite and Postgres: bulk upserts, deletes, keyed reads.

One table per feature view, `<project>__<view>` (two underscores: never one of Feast's
own tables, `<project>_<view>`, which may sit in the same file or schema), with one row
per entity: `entity_key` (the view's one join key, as an integer or text), `event_ts`
(microseconds since the epoch, UTC), `values` (`encoding`) and `version`: the state of
silver the row was computed from (`lakehouse.ml.fresh.watermark`; null for rows Feast
wrote). A row only replaces one from the same or an older state, and a delete only
removes such rows: the stream and a batch materialization may write the same entity in
either order, and the newer state stays. A table `<project>__views` records each view's
field list, format and load (a token a full load sets: a store lost and recreated has
another one, or none).

Writes are bulk: SQLite takes `executemany` in one transaction per call (rows sorted by
key append to the table's B-tree); Postgres takes a `COPY` into a temporary table and
one `INSERT ... ON CONFLICT` upsert. Either way a call is one transaction: a reader sees
all of a batch or none of it.
"""

from __future__ import annotations

import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl

from lakehouse.ml.online.encoding import FORMAT, FieldList, dump_fields, load_fields

CHUNK = 100_000
"""Rows per `executemany` or COPY chunk (bounded memory for Python's row tuples)."""


class OnlineStoreMissing(Exception):
    """A read-only reader found no store (a reader never creates one)."""


_NOT_NEWER = (
    "excluded.version IS NULL OR {table}.version IS NULL OR excluded.version >= {table}.version"
)
"""An upsert's condition: the stored row is not from a newer silver state."""


def table_name(project: str, view: str) -> str:
    """Name the online table of a view."""
    return f"{project}__{view}"


def views_table(project: str) -> str:
    """Name the table holding each view's field list."""
    return f"{project}__views"


def quote(identifier: str) -> str:
    """Quote an SQL identifier (SQLite and Postgres alike)."""
    return '"' + identifier.replace('"', '""') + '"'


class Tables(ABC):
    """The online tables of one project in one database."""

    def __init__(self, project: str, *, read_only: bool = False) -> None:
        self.project = project
        self.read_only = read_only
        self._fields: dict[str, FieldList] = {}
        self._lock = threading.Lock()

    # -- what each database does

    @abstractmethod
    def _execute(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement in its own transaction; return its rows."""

    @abstractmethod
    def _create(self, view: str, key_type: str) -> None:
        """Create the view's table and the views table if missing."""

    @abstractmethod
    def _upsert(
        self, view: str, keys: list[Any], ts: list[int], values: list[str], version: int | None
    ) -> None:
        """Insert or replace rows (not newer ones), in one transaction."""

    @abstractmethod
    def _exists(self, table: str) -> bool:
        """Tell whether a table exists."""

    @abstractmethod
    def close(self) -> None:
        """Close the connection."""

    # -- shared

    def ensure(self, view: str, fields: FieldList, key_type: str) -> bool:
        """Create the view's table; empty it if it was written with other fields.

        Returns True when the table was (re)created empty, so its rows must be loaded.
        """
        self._create(view, key_type)
        stored = self.fields(view, refresh=True)
        if stored == fields and self._format(view) == FORMAT:
            return False
        # Another layout or field list: the table is rebuilt empty (and then loaded).
        self._execute(f"DROP TABLE {quote(table_name(self.project, view))}")
        self._create(view, key_type)
        self._execute(
            f"DELETE FROM {quote(views_table(self.project))} WHERE view = {self._param}",
            (view,),
        )
        self._execute(
            f"INSERT INTO {quote(views_table(self.project))} (view, fields, format, load_id) "
            f"VALUES ({self._param}, {self._param}, {self._param}, NULL)",
            (view, dump_fields(fields), FORMAT),
        )
        self._fields[view] = fields
        return True

    _param = "?"

    def _format(self, view: str) -> int | None:
        rows = self._execute(
            f"SELECT format FROM {quote(views_table(self.project))} WHERE view = {self._param}",
            (view,),
        )
        return int(rows[0][0]) if rows else None

    def load(self, view: str) -> str | None:
        """Return the token of the view's last full load (None: none, or no table)."""
        if not self._exists(views_table(self.project)):
            return None
        rows = self._execute(
            f"SELECT load_id FROM {quote(views_table(self.project))} WHERE view = {self._param}",
            (view,),
        )
        return rows[0][0] if rows else None

    def set_load(self, view: str, token: str) -> None:
        """Record a full load of the view."""
        self._execute(
            f"UPDATE {quote(views_table(self.project))} SET load_id = {self._param} "
            f"WHERE view = {self._param}",
            (token, view),
        )

    def fields(self, view: str, *, refresh: bool = False) -> FieldList | None:
        """Return the field list the view's rows were written with (None: no table)."""
        if refresh or view not in self._fields:
            if not self._exists(views_table(self.project)):
                return None
            rows = self._execute(
                f"SELECT fields FROM {quote(views_table(self.project))} WHERE view = {self._param}",
                (view,),
            )
            if not rows:
                return None
            self._fields[view] = load_fields(rows[0][0])
        return self._fields[view]

    def upsert(self, view: str, frame: pl.DataFrame, version: int | None = None) -> None:
        """Write rows (`entity_key`, `event_ts` in µs, `values`) from silver state `version`.

        One transaction. A stored row from a newer state is kept. Keys must be unique
        within the frame (the latest row per entity).
        """
        if frame.height == 0:
            return
        frame = frame.sort("entity_key")
        self._upsert(
            view,
            frame["entity_key"].to_list(),
            frame["event_ts"].to_list(),
            frame["values"].to_list(),
            version,
        )

    def forget_versions(self, view: str) -> None:
        """Mark every stored row as from an unknown state: the next write replaces it.

        For rows computed from silver tables since made anew, whose states do not compare
        with the new tables' (`lakehouse.ml.tasks`). One statement: readers keep every row.
        """
        self._execute(f"UPDATE {quote(table_name(self.project, view))} SET version = NULL")

    def delete(self, view: str, keys: Sequence[Any], version: int | None = None) -> None:
        """Remove entities that no longer have a row, unless stored from a newer state."""
        table = quote(table_name(self.project, view))
        for start in range(0, len(keys), CHUNK):
            chunk = list(keys[start : start + CHUNK])
            self._delete(table, chunk, version)

    @abstractmethod
    def _delete(self, quoted_table: str, keys: list[Any], version: int | None) -> None: ...

    def keys(self, view: str) -> list[Any]:
        """Return every entity key the view's table holds."""
        rows = self._execute(f"SELECT entity_key FROM {quote(table_name(self.project, view))}")
        return [row[0] for row in rows]

    @abstractmethod
    def read(self, view: str, keys: Sequence[Any]) -> dict[Any, tuple[int, str]]:
        """Return {key: (event_ts µs, values)} for the keys found."""

    def count(self, view: str, upto: int | None = None) -> int | None:
        """Count the view's rows (at most `upto`); None when its table is missing."""
        table = table_name(self.project, view)
        if not self._exists(table):
            return None
        quoted = quote(table)
        if upto is None:
            statement = f"SELECT count(*) FROM {quoted}"
        else:
            statement = f"SELECT count(*) FROM (SELECT 1 FROM {quoted} LIMIT {int(upto)}) AS t"
        return int(self._execute(statement)[0][0])

    def drop(self, view: str) -> None:
        """Drop the view's table and forget its fields (the last one: the views table)."""
        self._execute(f"DROP TABLE IF EXISTS {quote(table_name(self.project, view))}")
        views = quote(views_table(self.project))
        if self._exists(views_table(self.project)):
            self._execute(f"DELETE FROM {views} WHERE view = {self._param}", (view,))
            if not self._execute(f"SELECT 1 FROM {views} LIMIT 1"):
                self._execute(f"DROP TABLE {views}")
        self._fields.pop(view, None)


class SqliteTables(Tables):
    """The online tables in one SQLite file (write-ahead log: readers are never blocked)."""

    def __init__(self, path: Path, project: str, *, read_only: bool = False) -> None:
        super().__init__(project, read_only=read_only)
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._inode: int | None = None

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            # Reopened when the file was replaced or deleted; never created.
            try:
                inode: int | None = self.path.stat().st_ino
            except FileNotFoundError:
                inode = None
            if self._conn is not None and inode != self._inode:
                self._conn.close()
                self._conn = None
                self._fields.clear()
            if inode is None:
                raise OnlineStoreMissing(self.path.name)
            if self._conn is None:
                self._conn = sqlite3.connect(
                    f"{self.path.as_uri()}?mode=ro", uri=True, check_same_thread=False
                )
                self._inode = inode
            return self._conn
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, timeout=60)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            self._conn = conn
        return self._conn

    def _execute(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            conn = self._connect()
            with conn:
                return conn.execute(statement, tuple(params)).fetchall()

    def _exists(self, table: str) -> bool:
        if self.read_only and not self.path.exists():
            return False
        rows = self._execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
        )
        return bool(rows)

    def _create(self, view: str, key_type: str) -> None:
        key = "INTEGER PRIMARY KEY" if key_type == "int" else "TEXT PRIMARY KEY"
        tail = "" if key_type == "int" else " WITHOUT ROWID"
        self._execute(
            f"CREATE TABLE IF NOT EXISTS {quote(views_table(self.project))} "
            "(view TEXT PRIMARY KEY, fields TEXT NOT NULL, format INTEGER NOT NULL, load_id TEXT)"
        )
        self._execute(
            f"CREATE TABLE IF NOT EXISTS {quote(table_name(self.project, view))} "
            f'(entity_key {key}, event_ts INTEGER NOT NULL, "values" TEXT NOT NULL, '
            f"version INTEGER){tail}"
        )

    def _upsert(
        self, view: str, keys: list[Any], ts: list[int], values: list[str], version: int | None
    ) -> None:
        table = quote(table_name(self.project, view))
        statement = (
            f'INSERT INTO {table} (entity_key, event_ts, "values", version) VALUES (?, ?, ?, ?) '
            "ON CONFLICT (entity_key) DO UPDATE SET event_ts = excluded.event_ts, "
            '"values" = excluded."values", version = excluded.version '
            f"WHERE {_NOT_NEWER.format(table=table)}"
        )
        with self._lock:
            conn = self._connect()
            with conn:  # one transaction
                for start in range(0, len(keys), CHUNK):
                    end = start + CHUNK
                    rows = zip(keys[start:end], ts[start:end], values[start:end], strict=True)
                    conn.executemany(statement, ((*row, version) for row in rows))

    def _delete(self, quoted_table: str, keys: list[Any], version: int | None) -> None:
        statement = (
            f"DELETE FROM {quoted_table} WHERE entity_key = ? AND "
            "(? IS NULL OR version IS NULL OR version <= ?)"
        )
        with self._lock:
            conn = self._connect()
            with conn:
                conn.executemany(statement, ((k, version, version) for k in keys))

    def read(self, view: str, keys: Sequence[Any]) -> dict[Any, tuple[int, str]]:
        """Return {key: (event_ts µs, values)} for the keys found."""
        table = quote(table_name(self.project, view))
        found: dict[Any, tuple[int, str]] = {}
        for start in range(0, len(keys), 500):  # SQLite's limit on parameters
            chunk = list(keys[start : start + 500])
            marks = ", ".join("?" * len(chunk))
            for key, ts, values in self._execute(
                f'SELECT entity_key, event_ts, "values" FROM {table} WHERE entity_key IN ({marks})',
                chunk,
            ):
                found[key] = (ts, values)
        return found

    def close(self) -> None:
        """Close the connection (the next call opens another)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class PostgresTables(Tables):
    """The online tables in one Postgres schema.

    A read-only instance sets `default_transaction_read_only` on its session: it cannot
    write, by construction, whatever its role may do.
    """

    _param = "%s"

    def __init__(self, conninfo: str, schema: str, project: str, *, read_only: bool = False):
        super().__init__(project, read_only=read_only)
        self.conninfo = conninfo
        self.schema = schema
        self._conn: Any = None

    def _connect(self) -> Any:
        import psycopg

        if self._conn is not None and self._conn.closed:
            self._conn = None
        if self._conn is None:
            options = "-c default_transaction_read_only=on" if self.read_only else ""
            # Bounded: a port that drops packets must not hold a request (or a readiness
            # probe) for the kernel's two minutes.
            self._conn = psycopg.connect(
                self.conninfo, autocommit=True, options=options, connect_timeout=10
            )
        return self._conn

    def _qualified(self, table: str) -> str:
        return f"{quote(self.schema)}.{quote(table)}"

    def _execute(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement with the store's schema first on the search path."""
        import psycopg

        with self._lock:
            conn = self._connect()
            try:
                with conn.transaction():
                    conn.execute(f"SET LOCAL search_path = {quote(self.schema)}")
                    cur = conn.execute(statement, tuple(params))
                    return cur.fetchall() if cur.description else []
            except psycopg.OperationalError:
                self._conn = None  # a lost connection is reopened by the next call
                raise

    def _exists(self, table: str) -> bool:
        rows = self._execute("SELECT to_regclass(%s) IS NOT NULL", (self._qualified(table),))
        return bool(rows[0][0])

    def _create(self, view: str, key_type: str) -> None:
        key = "BIGINT" if key_type == "int" else "TEXT"
        with self._lock:
            conn = self._connect()
            with conn.transaction():
                # Only when missing: IF NOT EXISTS still needs CREATE on the database, which
                # a role owning just the online schema (the compose deployment's) lacks.
                (exists,) = conn.execute(
                    "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (self.schema,)
                ).fetchone()
                if not exists:
                    conn.execute(f"CREATE SCHEMA {quote(self.schema)}")
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self._qualified(views_table(self.project))} "
                    "(view TEXT PRIMARY KEY, fields TEXT NOT NULL, format INTEGER NOT NULL, "
                    "load_id TEXT)"
                )
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS "
                    f"{self._qualified(table_name(self.project, view))} "
                    f"(entity_key {key} PRIMARY KEY, event_ts BIGINT NOT NULL, "
                    '"values" TEXT NOT NULL, version BIGINT)'
                )

    def _upsert(
        self, view: str, keys: list[Any], ts: list[int], values: list[str], version: int | None
    ) -> None:
        table = self._qualified(table_name(self.project, view))
        with self._lock:
            conn = self._connect()
            with conn.transaction():
                conn.execute(
                    f"CREATE TEMPORARY TABLE lakehouse_staging (LIKE {table}) ON COMMIT DROP"
                )
                with conn.cursor().copy(
                    'COPY lakehouse_staging (entity_key, event_ts, "values", version) FROM STDIN'
                ) as copy:
                    for start in range(0, len(keys), CHUNK):
                        end = start + CHUNK
                        for row in zip(
                            keys[start:end], ts[start:end], values[start:end], strict=True
                        ):
                            copy.write_row((*row, version))
                conn.execute(
                    f'INSERT INTO {table} AS t (entity_key, event_ts, "values", version) '
                    'SELECT entity_key, event_ts, "values", version FROM lakehouse_staging '
                    "ON CONFLICT (entity_key) DO UPDATE SET event_ts = excluded.event_ts, "
                    '"values" = excluded."values", version = excluded.version '
                    f"WHERE {_NOT_NEWER.format(table='t')}"
                )

    def _delete(self, quoted_table: str, keys: list[Any], version: int | None) -> None:
        self._execute(
            f"DELETE FROM {quote(self.schema)}.{quoted_table} WHERE entity_key = ANY(%s) "
            "AND (%s::BIGINT IS NULL OR version IS NULL OR version <= %s::BIGINT)",
            (keys, version, version),
        )

    def read(self, view: str, keys: Sequence[Any]) -> dict[Any, tuple[int, str]]:
        """Return {key: (event_ts µs, values)} for the keys found."""
        rows = self._execute(
            f'SELECT entity_key, event_ts, "values" FROM '
            f"{self._qualified(table_name(self.project, view))} WHERE entity_key = ANY(%s)",
            (list(keys),),
        )
        return {key: (ts, values) for key, ts, values in rows}

    def close(self) -> None:
        """Close the connection (the next call opens another)."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
