"""Feast's SQLite online store, with batched writes.

Feast's `SqliteOnlineStore` stores one row per (entity, feature) and writes them with one
`execute` per row: about a million statements for 45,000 applications. This store builds
exactly the same rows and writes them with `executemany`, in the same transaction and with
the same upsert, so the table, and everything that reads it (Feast's own `online_read`,
`feast ui`), is unchanged. Reads, table creation and teardown are Feast's.

It also puts the database in write-ahead-log mode, so readers (the prediction API) are
not locked out while a materialization writes.

`feature_store.yaml` selects it with `type: lakehouse.ml.feast_online.BatchSqliteOnlineStore`
(Feast requires the class name to end in `SqliteOnlineStore` for SQLite paths, and finds the
config class by appending `Config`). Vector and numeric-search columns, which the lakehouse
does not use, go through Feast's own writer.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from feast import FeatureView
from feast.infra.key_encoding_utils import serialize_entity_key
from feast.infra.online_stores.helpers import extract_text_and_num
from feast.infra.online_stores.sqlite import (
    SqliteOnlineStore,
    SqliteOnlineStoreConfig,
    _quote_id,
    _table_id,
)
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.repo_config import RepoConfig
from feast.utils import to_naive_utc

TYPE = "lakehouse.ml.feast_online.BatchSqliteOnlineStore"
COLUMNS = ("entity_key", "feature_name", "value", "value_text", "event_ts", "created_ts")
CHUNK_ENTITIES = 10_000  # rows are built and written in chunks: bounded memory


class BatchSqliteOnlineStoreConfig(SqliteOnlineStoreConfig):
    """Feast's SQLite online store settings, under this store's type name."""

    type: Literal["lakehouse.ml.feast_online.BatchSqliteOnlineStore"] = TYPE  # type: ignore[assignment]


class OnlineStoreMissing(Exception):
    """The SQLite online store's file is not there (a reader never creates it)."""


class BatchSqliteOnlineStore(SqliteOnlineStore):
    """Feast's SQLite online store; writes are batched with `executemany`.

    `read_only` (set on the instance by the prediction API): the file is opened read-only
    and never created, and reopened if it was replaced; a missing file raises
    `OnlineStoreMissing`. Feast's own connection creates an empty file when it is gone.
    """

    read_only = False
    _inode: int | None = None

    def _get_conn(self, config: RepoConfig) -> Any:
        if self.read_only:
            return self._read_only_conn(config)
        fresh = self._conn is None
        conn = super()._get_conn(config)
        if fresh:
            # Write-ahead log: the API keeps reading while a materialization writes (with
            # the default rollback journal, a large write locks readers out until it ends).
            conn.execute("PRAGMA journal_mode = WAL")
        return conn

    def _read_only_conn(self, config: RepoConfig) -> Any:
        path = Path(self._get_db_path(config))
        try:
            inode = path.stat().st_ino
        except FileNotFoundError:
            inode = None
        if self._conn is not None and inode != self._inode:  # deleted or replaced
            self._conn.close()
            self._conn = None
        if inode is None:
            raise OnlineStoreMissing(str(path.name))
        if self._conn is None:
            self._conn = sqlite3.connect(
                f"{path.as_uri()}?mode=ro",
                uri=True,
                detect_types=sqlite3.PARSE_DECLTYPES | sqlite3.PARSE_COLNAMES,
                check_same_thread=False,
            )
            self._inode = inode
        return self._conn

    def online_write_batch(
        self,
        config: RepoConfig,
        table: FeatureView,
        data: list[tuple[EntityKeyProto, dict[str, ValueProto], datetime, datetime | None]],
        progress: Callable[[int], Any] | None,
    ) -> None:
        """Upsert one row per (entity, feature), as Feast does, in a few statements."""
        store = config.online_store
        if store.vector_enabled or getattr(store, "enable_openai_compatible_store", False):
            super().online_write_batch(config, table, data, progress)
            return
        conn = self._get_conn(config)
        name = _table_id(
            config.project, table, config.registry.enable_online_feature_view_versioning
        )
        update = ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[2:])
        upsert = (
            f"INSERT INTO {_quote_id(name)} ({', '.join(COLUMNS)}) "
            f"VALUES ({', '.join('?' * len(COLUMNS))}) "
            f"ON CONFLICT(entity_key, feature_name) DO UPDATE SET {update};"
        )
        version = config.entity_key_serialization_version
        with conn:  # one transaction, as in Feast's writer
            for start in range(0, len(data), CHUNK_ENTITIES):
                rows = []
                chunk = data[start : start + CHUNK_ENTITIES]
                for entity_key, values, timestamp, created in chunk:
                    key = serialize_entity_key(entity_key, entity_key_serialization_version=version)
                    event_ts = to_naive_utc(timestamp)
                    created_ts = None if created is None else to_naive_utc(created)
                    for feature, value in values.items():
                        text, _ = extract_text_and_num(value, False)
                        rows.append(
                            (key, feature, value.SerializeToString(), text, event_ts, created_ts)
                        )
                conn.executemany(upsert, rows)
                if progress:
                    progress(len(chunk))
