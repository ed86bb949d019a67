"""The prediction API's read of a feature service: Feast's rows, without Feast's response.

`FeatureStore.get_online_features` of one entity is about 0.5-0.9 ms on this machine,
most of it Feast building its response: a ValueProto and a status per feature, a
protobuf response, then Python values again in `to_dict`. The lakehouse store's read
(one SQLite or Postgres row, one `json.loads`) is a tenth of it. `ServiceReader` reads
the same rows through the same tables and returns what `to_dict` returns for them, so
`/predict` pays for the read and not for the conversions
(`tests/ml/test_ml.py` compares the two on every entity of a store, on SQLite and
Postgres; `tests/ml/test_online_store.py` on values at the edges of their types).

It covers what the lakehouse's services use: views of one integer join key, no join key
map, no version, no max age (`ttl` 0), no on-demand views, features by their own names.
Anything else, and a store that is not the lakehouse's, is read through Feast
(`ServiceReader.of` is None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lakehouse.ml.online import encoding
from lakehouse.ml.online.store import _LakehouseOnlineStore, key_type
from lakehouse.ml.online.tables import Tables


@dataclass(frozen=True)
class _Part:
    view: str
    join_key: str
    features: tuple[str, ...]


class ServiceReader:
    """Read one entity's values of a feature service straight from the lakehouse store."""

    def __init__(self, tables: Tables, parts: list[_Part]) -> None:
        self._tables = tables
        self._parts = parts

    @classmethod
    def of(cls, store: Any, service: Any) -> ServiceReader | None:
        """Return a reader of `service` on the Feast `store`, or None: read through Feast."""
        online = store._get_provider().online_store
        if not isinstance(online, _LakehouseOnlineStore):
            return None
        if getattr(service, "feature_view_projections", None) is None:
            return None
        parts = []
        for projection in service.feature_view_projections:
            try:
                view = store.get_feature_view(projection.name)
            except Exception:  # an on-demand view, or one not applied: Feast's business
                return None
            try:
                kind = key_type(view)
            except encoding.UnsupportedFeature:
                return None
            simple = (
                not projection.join_key_map
                and projection.name_alias in (None, "")
                and getattr(projection, "version_tag", None) is None
                and not view.ttl
                # An integer key: Feast converts a request's value to the key's type, the
                # reader looks it up as given (the API's ids are JSON integers).
                and kind == "int"
            )
            if not simple:
                return None
            names = tuple(f.name for f in projection.features)
            parts.append(_Part(view.name, view.join_keys[0], names))
        every = [n for part in parts for n in part.features]
        if len(every) != len(set(every)) or set(every) & {p.join_key for p in parts}:
            return None  # Feast would need full feature names
        return cls(online.tables(store.config), parts)

    def read(self, entity: dict[str, Any]) -> dict[str, Any]:
        """Return {feature: value} for one entity, None where Feast would give None."""
        return self.read_timed(entity)[0]

    def read_timed(self, entity: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        """Return `read`'s values and the newest event time of the rows (µs), if any."""
        row: dict[str, Any] = {}
        newest: int | None = None
        for part in self._parts:
            key = entity[part.join_key]
            found = None
            if self._tables.fields(part.view) is not None:
                found = self._tables.read(part.view, [key]).get(key)
            if found is None:
                row.update(dict.fromkeys(part.features))
            else:
                if newest is None or found[0] > newest:
                    newest = found[0]
                # The field list after the read, as `online_read` decodes (a replaced file).
                fields = self._tables.fields(part.view) or []
                row.update(encoding.decode_python(found[1], fields, part.features))
        return row, newest
