"""The lakehouse online store, as Feast sees it: one row per entity and feature view.

`feature_store.yaml` selects it (`type: lakehouse.ml.online.store.LakehouseSqliteOnlineStore`
or `...LakehousePostgresOnlineStore`); Feast then reads through it everywhere it reads
online features (`get_online_features`, the feature server, `feast ui`). The lakehouse
writes it in bulk from gold (`lakehouse.ml.materialize`), never through Feast's
per-value protobufs; Feast's own writes (`feast materialize`, a push) still work through
`online_write_batch`, one encoded row per entity.

A view must have one join key (integer or text): every view of the lakehouse has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from feast import Entity, FeatureView
from feast.infra.online_stores.online_store import OnlineStore
from feast.infra.utils.postgres.postgres_config import PostgreSQLConfig
from feast.protos.feast.types.EntityKey_pb2 import EntityKey as EntityKeyProto
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.repo_config import FeastConfigBaseModel, RepoConfig
from pydantic import StrictStr

from lakehouse.ml.online import encoding
from lakehouse.ml.online.tables import PostgresTables, SqliteTables, Tables

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class LakehouseSqliteOnlineStoreConfig(FeastConfigBaseModel):
    """The SQLite file (relative paths are under the repository)."""

    type: Literal["lakehouse.ml.online.store.LakehouseSqliteOnlineStore"] = (
        "lakehouse.ml.online.store.LakehouseSqliteOnlineStore"
    )
    path: StrictStr = "data/online.db"


class LakehousePostgresOnlineStoreConfig(PostgreSQLConfig):
    """Feast's Postgres connection settings; `db_schema` holds the tables."""

    type: Literal["lakehouse.ml.online.store.LakehousePostgresOnlineStore"] = (
        "lakehouse.ml.online.store.LakehousePostgresOnlineStore"
    )


def key_type(view: Any) -> str:
    """Return "int" or "text": the kind of the view's one join key; fail otherwise."""
    columns = view.entity_columns
    if len(columns) != 1:
        msg = (
            f"feature view `{view.name}` has {len(columns)} join keys; the lakehouse online "
            "store keys a row by one: give the view one entity with one join key"
        )
        raise encoding.UnsupportedFeature(msg)
    kind = columns[0].dtype.to_value_type().name
    if kind in ("INT64", "INT32"):
        return "int"
    if kind == "STRING":
        return "text"
    msg = f"feature view `{view.name}`'s join key is {kind}; use an integer or a string key"
    raise encoding.UnsupportedFeature(msg)


def entity_value(entity_key: EntityKeyProto) -> Any:
    """Return the plain value of a one-key entity key."""
    value = entity_key.entity_values[0]
    kind = value.WhichOneof("val")
    return None if kind is None else getattr(value, kind)


class _LakehouseOnlineStore(OnlineStore):
    """What both databases share: Feast's calls mapped onto `Tables`."""

    read_only = False
    """Set by the prediction API: open read-only, never create anything."""

    _tables: Tables | None = None

    def _open(self, config: RepoConfig) -> Tables:
        raise NotImplementedError

    def tables(self, config: RepoConfig) -> Tables:
        """Return this store's tables (opened once per store object)."""
        if self._tables is None or self._tables.read_only != self.read_only:
            if self._tables is not None:
                self._tables.close()
            self._tables = self._open(config)
        return self._tables

    def online_write_batch(
        self,
        config: RepoConfig,
        table: FeatureView,
        data: list[tuple[EntityKeyProto, dict[str, ValueProto], datetime, datetime | None]],
        progress: Callable[[int], Any] | None,
    ) -> None:
        """Write Feast's rows (from `feast materialize` or a push): one row per entity."""
        import polars as pl

        tables = self.tables(config)
        fields = encoding.field_list(table)
        tables.ensure(table.name, fields, key_type(table))
        latest: dict[Any, tuple[int, str]] = {}
        for entity_key, values, timestamp, _created in data:
            stamp = timestamp if timestamp.tzinfo else timestamp.replace(tzinfo=UTC)
            micros = (stamp - EPOCH) // _MICROSECOND
            latest[entity_value(entity_key)] = (micros, encoding.encode_protos(values, fields))
        frame = pl.DataFrame(
            {
                "entity_key": list(latest),
                "event_ts": [v[0] for v in latest.values()],
                "values": [v[1] for v in latest.values()],
            },
            schema_overrides={"event_ts": pl.Int64, "values": pl.String},
        )
        tables.upsert(table.name, frame)
        if progress:
            progress(len(data))

    def online_read(
        self,
        config: RepoConfig,
        table: FeatureView,
        entity_keys: list[EntityKeyProto],
        requested_features: list[str] | None = None,
    ) -> list[tuple[datetime | None, dict[str, ValueProto] | None]]:
        """Read each entity's row: (event time, {feature: value}) or (None, None)."""
        tables = self.tables(config)
        keys = [entity_value(k) for k in entity_keys]
        fields = tables.fields(table.name)
        if fields is None:
            return [(None, None)] * len(keys)
        found = tables.read(table.name, keys)
        # Again after the read: a replaced SQLite file is noticed there, and its rows are
        # decoded with its own field list.
        fields = tables.fields(table.name) or []
        out: list[tuple[datetime | None, dict[str, ValueProto] | None]] = []
        for key in keys:
            row = found.get(key)
            if row is None:
                out.append((None, None))
                continue
            micros, text = row
            when = EPOCH + micros * _MICROSECOND
            out.append((when, encoding.decode(text, fields, requested_features)))
        return out

    def update(
        self,
        config: RepoConfig,
        tables_to_delete: Sequence[FeatureView],
        tables_to_keep: Sequence[Any],
        entities_to_delete: Sequence[Entity],
        entities_to_keep: Sequence[Entity],
        partial: bool,
    ) -> None:
        """Create the kept views' tables (emptied if their fields changed); drop the rest."""
        tables = self.tables(config)
        for view in tables_to_keep:
            tables.ensure(view.name, encoding.field_list(view), key_type(view))
        for view in tables_to_delete:
            tables.drop(view.name)

    def teardown(
        self, config: RepoConfig, tables: Sequence[FeatureView], entities: Sequence[Entity]
    ) -> None:
        """Drop the views' tables."""
        store = self.tables(config)
        for view in tables:
            store.drop(view.name)


class LakehouseSqliteOnlineStore(_LakehouseOnlineStore):
    """The lakehouse online store in one SQLite file."""

    def _open(self, config: RepoConfig) -> Tables:
        return SqliteTables(sqlite_file(config), config.project, read_only=self.read_only)


class LakehousePostgresOnlineStore(_LakehouseOnlineStore):
    """The lakehouse online store in a Postgres schema."""

    def _open(self, config: RepoConfig) -> Tables:
        store = config.online_store
        return PostgresTables(
            postgres_conninfo(store), store.db_schema, config.project, read_only=self.read_only
        )


def sqlite_file(config: RepoConfig) -> Path:
    """Return the SQLite file a repository config names (relative: under the repository)."""
    path = Path(config.online_store.path)
    if config.repo_path and not path.is_absolute():
        path = Path(config.repo_path) / path
    return path


def postgres_conninfo(store: Any) -> str:
    """Return a libpq connection string for Feast's Postgres settings."""
    from psycopg.conninfo import make_conninfo

    params = {
        "host": store.host,
        "port": store.port,
        "dbname": store.database,
        "user": store.user,
        "password": store.password,
        "sslmode": store.sslmode,
        "sslkey": store.sslkey_path,
        "sslcert": store.sslcert_path,
        "sslrootcert": store.sslrootcert_path,
    }
    return make_conninfo("", **{k: v for k, v in params.items() if v is not None})


_MICROSECOND = timedelta(microseconds=1)
