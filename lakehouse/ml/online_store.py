"""Look at Feast's online store itself: is it there, and how many rows does each view hold.

`Materialize` used to be complete when a state file said so. Delete the SQLite file (or
drop the Postgres tables) and every run said "nothing to do" while the API answered 500;
a manual `apply` + incremental `materialize` then loaded only the last window. Completion
now compares the store's row counts with those the last materialization recorded, and a
mismatch reloads it in full.

Reads only: the SQLite file is opened read-only (`mode=ro`), so looking never creates it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from lakehouse.ml.features import FEATURE_VIEWS
from lakehouse.settings import Settings

PROJECT = "lakehouse"  # feature_repo/feature_store.yaml


def sqlite_path(settings: Settings) -> Path:
    """Where feature_store.yaml puts the SQLite online store."""
    return settings.home / "feast" / "online_store.db"


def row_counts(settings: Settings, *, upto: int | None = None) -> dict[str, int] | None:
    """Return the rows of each view's online table; None if the store or a table is missing.

    With `upto`, count at most that many rows per table (cheap: "is it empty?").
    """
    # Feast's table of each view is `<project>_<view>` (`compute_table_id`, no versioning).
    tables = [f"{PROJECT}_{view}" for view in FEATURE_VIEWS]
    if settings.feast_online_store == "postgres":
        return _postgres_counts(settings, tables, upto)
    return _sqlite_counts(sqlite_path(settings), tables, upto)


def _count(quoted: str, upto: int | None) -> str:
    if upto is None:
        return f"SELECT count(*) FROM {quoted}"
    return f"SELECT count(*) FROM (SELECT 1 FROM {quoted} LIMIT {int(upto)}) AS t"


def _sqlite_counts(path: Path, tables: list[str], upto: int | None) -> dict[str, int] | None:
    if not path.is_file():
        return None
    try:
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return None
    try:
        counts = {}
        for table in tables:
            quoted = '"' + table.replace('"', '""') + '"'
            counts[table] = conn.execute(_count(quoted, upto)).fetchone()[0]
        return counts
    except sqlite3.Error:  # no such table, not a database
        return None
    finally:
        conn.close()


def _postgres_counts(
    settings: Settings, tables: list[str], upto: int | None
) -> dict[str, int] | None:
    import psycopg
    from psycopg import sql

    from lakehouse.environment import online_dsn

    schema = f"{settings.pg_schema}_online"
    counts = {}
    with psycopg.connect(online_dsn(settings), autocommit=True) as conn:
        for table in tables:
            (exists,) = conn.execute(
                "SELECT to_regclass(%s) IS NOT NULL",
                (sql.Identifier(schema, table).as_string(conn),),
            ).fetchone()  # type: ignore[misc]
            if not exists:
                return None
            quoted = sql.Identifier(schema, table).as_string(conn)
            counts[table] = conn.execute(_count(quoted, upto)).fetchone()[0]  # type: ignore[index]
    return counts


def empty_or_missing(settings: Settings) -> bool:
    """Tell whether the online store has nothing to serve (the API then answers 503)."""
    counts = row_counts(settings, upto=1)
    return counts is None or not any(counts.values())


def forget_orphans(settings: Settings) -> None:
    """Remove a lost SQLite file's write-ahead log, which a new file must not replay."""
    path = sqlite_path(settings)
    if settings.feast_online_store == "postgres" or path.exists():
        return
    for suffix in ("-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
