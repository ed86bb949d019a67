"""DuckDB connections with the Delta, httpfs and aws extensions and an S3 secret from settings."""

from __future__ import annotations

import importlib
from pathlib import Path

import duckdb

from lakehouse.errors import StorageError
from lakehouse.settings import Settings
from lakehouse.storage import Storage


def literal(value: str) -> str:
    """Quote a string as a SQL literal."""
    return "'" + value.replace("'", "''") + "'"


def quote(name: str) -> str:
    """Quote an identifier."""
    return '"' + name.replace('"', '""') + '"'


def load_extension(con: duckdb.DuckDBPyConnection, name: str) -> None:
    """Install and load a DuckDB extension, from its PyPI wheel when there is one."""
    # Prefer the extension shipped in a PyPI wheel (offline, DuckDB-signed); elsewhere
    # DuckDB downloads the same extension into the extension directory.
    try:
        module = importlib.import_module(f"duckdb_extension_{name}")
    except ImportError:
        module = None
    if module is not None and module.__file__:
        version = con.execute("PRAGMA version").fetchone()[0]  # type: ignore[index]
        path = Path(module.__file__).parent / "extensions" / version / f"{name}.duckdb_extension"
        if path.is_file():
            con.execute(f"INSTALL {literal(str(path))}")
    else:
        con.execute(f"INSTALL {name}")
    con.execute(f"LOAD {name}")


def connect(settings: Settings, storage: Storage) -> duckdb.DuckDBPyConnection:
    """Open an in-memory DuckDB that can read the lakehouse's Delta tables."""
    ext_dir = settings.home / "duckdb_extensions"
    ext_dir.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(
        config={
            "extension_directory": str(ext_dir),
            # DuckDB wants a home for its own files and fails without $HOME (a service
            # or a container may have none): ours is the lakehouse's home.
            "home_directory": str(settings.home),
            "memory_limit": settings.duckdb_memory,
            "temp_directory": str(settings.home / "duckdb_tmp"),
        }
    )
    try:
        con.execute("SET TimeZone = 'UTC'")
        # DuckDB draws a progress bar on stdout for a query over 2 s: in the middle of
        # `lakehouse sql --format csv` output, say (found by a test counting rows).
        con.execute("SET enable_progress_bar = false")
        extensions = ["delta"] + (["httpfs", "aws"] if storage.is_s3 else [])
        for name in extensions:
            load_extension(con, name)
        if storage.is_s3:
            create_secret(con, settings, storage)
    except duckdb.Error as exc:
        con.close()
        msg = f"DuckDB could not load its Delta/S3 extensions: {exc}"
        raise StorageError(msg) from None
    return con


def create_secret(con: duckdb.DuckDBPyConnection, settings: Settings, storage: Storage) -> None:
    """Create the S3 secret from settings (credentials are never taken implicitly)."""
    parts = [
        "TYPE s3",
        f"KEY_ID {literal(settings.s3_access_key_id)}",
        f"SECRET {literal(settings.s3_secret_access_key.get())}",
        f"REGION {literal(settings.s3_region)}",
    ]
    endpoint = storage.s3.get("endpoint")
    if endpoint:
        host = endpoint.split("://", 1)[1]
        parts += [
            f"ENDPOINT {literal(host)}",
            "URL_STYLE 'path'",
            f"USE_SSL {'true' if endpoint.startswith('https') else 'false'}",
        ]
    con.execute(f"CREATE OR REPLACE SECRET lakehouse_s3 ({', '.join(parts)})")


def scan(uri: str, version: int | None = None) -> str:
    """Return a `delta_scan(...)` call for `uri`, optionally at a version."""
    args = literal(uri) + (f", version => {int(version)}" if version is not None else "")
    return f"delta_scan({args})"
