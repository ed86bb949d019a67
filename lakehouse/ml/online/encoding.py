"""How one online row holds all of a feature view's values: a JSON array, in field order.

Feast's own stores keep one row per (entity, feature), each value a serialized protobuf
built in Python: 35M rows and as many Python objects for 1M source rows. Here a view's
values for one entity are one JSON array, built column by column in Polars (no Python
per value) and parsed with `json.loads` on the read path, where one request reads a few
rows. The array is positional: the field list it was written with is stored beside the
table (`FieldList`), so a changed view is never decoded with the wrong names.

Exactness: integers are written as integers (all of int64), floats with the shortest text
that reads back to the same double (Polars' formatting), the infinities as `Infinity` and
`-Infinity`, which `json.loads` reads (JSON has no spelling for them). A NaN is written as
null, as Feast's own conversion (`python_values_to_proto_values`) stores it. Strings are
escaped by Polars' JSON writer. A null reads back as an empty `ValueProto`, as from
Feast's stores.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from typing import Any

import polars as pl
from feast.protos.feast.types.Value_pb2 import Value as ValueProto
from feast.value_type import ValueType

FORMAT = 2
"""Bumped when the layout changes: a table written in another format is rebuilt."""

# The value types a row can hold, and the ValueProto field each is read into.
PROTO_FIELD = {
    ValueType.INT64: "int64_val",
    ValueType.INT32: "int32_val",
    ValueType.DOUBLE: "double_val",
    ValueType.FLOAT: "float_val",
    ValueType.STRING: "string_val",
    ValueType.BOOL: "bool_val",
}

FieldList = list[tuple[str, ValueType]]
"""A view's features in the order their values are written: (name, value type)."""


class UnsupportedFeature(ValueError):
    """A feature's type that the lakehouse online store does not hold."""


def field_list(view: Any) -> FieldList:
    """Return a Feast feature view's features as a `FieldList`; fail on unsupported types."""
    fields = []
    for feature in view.features:
        value_type = feature.dtype.to_value_type()
        if value_type not in PROTO_FIELD:
            supported = ", ".join(sorted(t.name for t in PROTO_FIELD))
            msg = (
                f"feature `{view.name}.{feature.name}` is {value_type.name}; the lakehouse "
                f"online store holds {supported}: change its type or use Feast's own store"
            )
            raise UnsupportedFeature(msg)
        fields.append((feature.name, value_type))
    return fields


def _fragment(name: str, value_type: ValueType) -> pl.Expr:
    col = pl.col(name)
    if value_type in (ValueType.INT64, ValueType.INT32):
        text = col.cast(pl.Int64).cast(pl.String)
    elif value_type in (ValueType.DOUBLE, ValueType.FLOAT):
        c = col.cast(pl.Float64)
        text = (
            pl.when(c.is_nan())
            .then(pl.lit(None, dtype=pl.String))  # null, as Feast stores a NaN
            .when(c == math.inf)
            .then(pl.lit("Infinity"))
            .when(c == -math.inf)
            .then(pl.lit("-Infinity"))
            .otherwise(c.cast(pl.String))
        )
    elif value_type == ValueType.BOOL:
        text = pl.when(col).then(pl.lit("true")).when(~col).then(pl.lit("false"))
    else:  # a string: Polars' JSON writer escapes it; `{"v":"..."}` -> `"..."`
        quoted = pl.struct(col.cast(pl.String).alias("v")).struct.json_encode()
        return quoted.str.strip_prefix('{"v":').str.strip_suffix("}")
    return text.fill_null(pl.lit("null"))


def encode(frame: pl.DataFrame, fields: FieldList) -> pl.Series:
    """Return each row's values as a JSON array in `fields` order (a String column)."""
    if not fields:
        return pl.Series("values", ["[]"] * frame.height, dtype=pl.String)
    parts = [_fragment(name, value_type) for name, value_type in fields]
    row = pl.concat_str([pl.lit("["), pl.concat_str(parts, separator=","), pl.lit("]")])
    return frame.select(row.alias("values")).to_series()


def encode_protos(values: dict[str, ValueProto], fields: FieldList) -> str:
    """Encode one entity's values as Feast hands them to `online_write_batch`."""
    out: list[Any] = []
    for name, _ in fields:
        proto = values.get(name)
        kind = None if proto is None else proto.WhichOneof("val")
        value = None if kind is None or kind == "null_val" else getattr(proto, kind)
        if isinstance(value, float) and math.isnan(value):
            value = None  # as Feast's own conversion stores a NaN
        out.append(value)
    return json.dumps(out, allow_nan=True, separators=(",", ":"), ensure_ascii=False)


def decode(text: str, fields: FieldList, requested: Sequence[str] | None) -> dict[str, ValueProto]:
    """Return the requested features of one row as ValueProtos (all of them if None)."""
    values = json.loads(text)
    wanted = None if requested is None else set(requested)
    out: dict[str, ValueProto] = {}
    for (name, value_type), value in zip(fields, values, strict=True):
        if wanted is not None and name not in wanted:
            continue
        proto = ValueProto()
        if value is not None:
            kind = PROTO_FIELD[value_type]
            if value_type in (ValueType.DOUBLE, ValueType.FLOAT):
                value = float(value)
            setattr(proto, kind, value)
        out[name] = proto
    return out


def _as_float32(value: float) -> float:
    return float(struct.unpack("f", struct.pack("f", value))[0])


def decode_python(text: str, fields: FieldList, requested: Sequence[str]) -> dict[str, Any]:
    """Return the requested features of one row as Python values, as Feast's `to_dict` has them.

    Floats (a FLOAT through 32 bits, as its `float_val`), ints, strings, bools, and None
    for a null or a feature the row was not written with.
    """
    values = dict(zip((name for name, _ in fields), json.loads(text), strict=True))
    kinds = dict(fields)
    out: dict[str, Any] = {}
    for name in requested:
        value = values.get(name)
        if value is not None:
            kind = kinds[name]
            if kind == ValueType.DOUBLE:
                value = float(value)
            elif kind == ValueType.FLOAT:
                value = _as_float32(float(value))
        out[name] = value
    return out


def dump_fields(fields: FieldList) -> str:
    """Serialize a field list for the table's metadata."""
    return json.dumps([[name, value_type.name] for name, value_type in fields])


def load_fields(text: str) -> FieldList:
    """Read a field list written by `dump_fields`."""
    return [(name, ValueType[kind]) for name, kind in json.loads(text)]
