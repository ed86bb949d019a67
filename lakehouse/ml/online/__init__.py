"""The lakehouse online store: its tables, and what the rest of the lakehouse asks of it.

`store` is the Feast side (selected in `feature_store.yaml`), `tables` the SQLite and
Postgres tables, `encoding` one row's values. Here: open the store the settings name
without Feast (for `lakehouse status`, completion checks and the API's 503), and count
its rows.

`Materialize` used to be complete when a state file said so. Delete the SQLite file (or
drop the Postgres tables) and every run said "nothing to do" while the API answered 500.
Completion now looks at the store: every view must hold rows, from the full load the last
materialization recorded (a token in the store), or it is reloaded in full. Reading never
creates the store (SQLite: `mode=ro`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from lakehouse.settings import Settings

if TYPE_CHECKING:
    from lakehouse.ml.online.tables import Tables

T = TypeVar("T")

PROJECT = "lakehouse"  # feature_repo/feature_store.yaml
VIEWS = ("application_features", "applicant_features", "applicant_profile")
"""The online feature views (lakehouse.ml.definitions)."""


def sqlite_path(settings: Settings) -> Path:
    """Where feature_store.yaml puts the SQLite online store."""
    return settings.home / "feast" / "online.db"


def open_tables(settings: Settings, *, read_only: bool = True) -> Tables:
    """Open the online store's tables the settings select (no Feast import)."""
    from lakehouse.ml.online.tables import PostgresTables, SqliteTables

    if settings.feast_online_store == "postgres":
        from lakehouse.environment import online_dsn

        schema = f"{settings.pg_schema}_online"
        return PostgresTables(online_dsn(settings), schema, PROJECT, read_only=read_only)
    return SqliteTables(sqlite_path(settings), PROJECT, read_only=read_only)


def _look(settings: Settings, look: Callable[[Tables], T], missing: T) -> T:
    """Run `look` on the store's tables, read-only; `missing` if there is no store."""
    import sqlite3

    from lakehouse.ml.online.tables import OnlineStoreMissing

    if settings.feast_online_store != "postgres" and not sqlite_path(settings).is_file():
        return missing
    tables = open_tables(settings)
    try:
        return look(tables)
    except (OnlineStoreMissing, sqlite3.Error):  # gone, or not a database
        return missing
    finally:
        tables.close()


def row_counts(settings: Settings, *, upto: int | None = None) -> dict[str, int] | None:
    """Return the rows of each view's online table; None if the store or a table is missing.

    With `upto`, count at most that many rows per table (cheap: "is it empty?").
    """

    def count(tables: Tables) -> dict[str, int] | None:
        counts = {view: tables.count(view, upto) for view in VIEWS}
        if any(c is None for c in counts.values()):
            return None
        return {view: c for view, c in counts.items() if c is not None}

    return _look(settings, count, None)


def intact(settings: Settings, loads: dict[str, str | None] | None) -> bool:
    """Tell whether the store holds rows in every view, from these full loads."""
    if not loads:
        return False
    return _look(
        settings,
        lambda t: all(t.load(v) == loads.get(v) and bool(t.count(v, 1)) for v in VIEWS),
        False,
    )


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
