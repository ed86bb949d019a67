"""Feast's SQLite online store, with batched writes.

Feast's `SqliteOnlineStore` stores one row per (entity, feature) and writes them with one
`execute` per row: about a million statements for 45,000 applications. This store builds
exactly the same rows and writes them with `executemany`, in the same transaction and with
the same upsert, so the table, and everything that reads it (Feast's own `online_read`,
`feast ui`), is unchanged. Reads, table creation and teardown are Feast's.

It also puts the database in write-ahead-log mode, so readers (the prediction API) are
not locked out while a materialization writes.

`feature_store.yaml` selects it with `type: lakehouse.feast_online.BatchSqliteOnlineStore`
(Feast requires the class name to end in `SqliteOnlineStore` for SQLite paths, and finds the
config class by appending `Config`). Vector and numeric-search columns, which the lakehouse
does not use, go through Feast's own writer.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
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

TYPE = "lakehouse.feast_online.BatchSqliteOnlineStore"
COLUMNS = ("entity_key", "feature_name", "value", "value_text", "event_ts", "created_ts")
CHUNK_ENTITIES = 10_000  # rows are built and written in chunks: bounded memory


class BatchSqliteOnlineStoreConfig(SqliteOnlineStoreConfig):
    """Feast's SQLite online store settings, under this store's type name."""

    type: Literal["lakehouse.feast_online.BatchSqliteOnlineStore"] = TYPE  # type: ignore[assignment]


class BatchSqliteOnlineStore(SqliteOnlineStore):
    """Feast's SQLite online store; writes are batched with `executemany`."""

    def _get_conn(self, config: RepoConfig) -> Any:
        fresh = self._conn is None
        conn = super()._get_conn(config)
        if fresh:
            # Write-ahead log: the API keeps reading while a materialization writes (with
            # the default rollback journal, a large write locks readers out until it ends).
            conn.execute("PRAGMA journal_mode = WAL")
        return conn

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
