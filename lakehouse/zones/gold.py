"""Gold: feature tables and marts built with DuckDB SQL or Polars from pinned silver versions."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import duckdb
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from lakehouse import duck
from lakehouse.errors import LakehouseError
from lakehouse.settings import Settings
from lakehouse.storage import Storage
from lakehouse.transforms.gold import ALL_GOLD, Derived, with_linked
from lakehouse.transforms.partitions import in_part, key_part, key_part_sql
from lakehouse.zones import gold_marks as marks
from lakehouse.zones import gold_update
from lakehouse.zones.commits import (
    ConcurrentWriteError,
    commit_properties,
    is_conflict,
)
from lakehouse.zones.datafiles import TableFiles

_BATCH = 200_000
# Rows per data file written from a DuckDB query (a Polars-built partition is one file).
_FILE_ROWS = 1_000_000
# Input rows per key partition of a partitioned gold build (see GoldTable.partition_key).
_PARTITION_ROWS = 2_500_000


REFERENCES: dict[str, Callable[[Storage, duckdb.DuckDBPyConnection], None]] = {}
"""Relations a gold table's SQL reads that are not lake tables (`GoldTable.references`),
by name: each registers them on the build's connection. The side that owns them fills
this in when it is imported (`lakehouse.ml.monitor.drift`: `drift_reference`), so the
core builds such a table without importing that side."""


def _row_count(dt: DeltaTable) -> int:
    adds = pa.table(dt.get_add_actions(flatten=True))
    return int(pc.sum(adds["num_records"]).as_py() or 0) if adds.num_rows else 0


@dataclass(frozen=True)
class GoldResult:
    """What one gold build did."""

    table: str
    built: bool
    inputs: dict[str, int]
    recomputed: int | None = None
    """Entities whose rows were recomputed, when only those were (`gold_update`)."""


def build(
    settings: Settings, storage: Storage, name: str, *, incremental: bool = True
) -> GoldResult:
    """Bring `gold.<name>` to pinned silver versions, recording them in the commit.

    A feature table already built recomputes only the entities the silver changes since
    touched (`lakehouse.zones.gold_update`), unless `incremental` is off; any other table,
    or one that cannot be updated exactly, is rebuilt whole. The commit is checked against
    the version of the gold table read first: when another writer built it meanwhile, this
    build lands nothing, and it is done if that one used the same inputs or newer ones.
    """
    existing = storage.table_or_none("gold", name)  # first: the commit's guard
    inputs = marks.pinned(storage, name)
    if marks.current(existing, name, inputs):
        return GoldResult(name, False, inputs.versions)
    recomputed = None
    try:
        if incremental and existing is not None:
            recomputed = _update(settings, storage, name, inputs, existing)
        if recomputed is None:
            _build(settings, storage, name, inputs, existing)
    except ConcurrentWriteError:
        if marks.is_current(storage, name) or marks.newer_than(storage, name, inputs.versions):
            return GoldResult(name, False, inputs.versions)
        raise
    return GoldResult(name, True, inputs.versions, recomputed)


def _update(
    settings: Settings,
    storage: Storage,
    name: str,
    inputs: marks.Inputs,
    existing: DeltaTable,
) -> int | None:
    """Recompute the touched entities' rows of `existing` and land them; None if it cannot."""
    if name not in gold_update.UPDATABLE:
        return None
    if not marks.same_definition(existing, name):
        return None
    if not marks.same_tables(existing, name, inputs):  # a table made anew since
        return None
    people_from = None
    reads = inputs.reads
    if "gold.applicant_features" in reads:
        people = storage.table(
            "gold", "applicant_features", version=reads["gold.applicant_features"]
        )
        people_from = marks.built_from(storage, "applicant_features", people)
    silver = {t: v for src, v in inputs.versions.items() if (t := marks.located(src)[1]) == src}
    out = gold_update.update(
        settings,
        storage,
        name,
        existing,
        marks.built_from(storage, name, existing),
        reads,
        rows_now=_row_count(existing),
        people_from=people_from,
        versions=silver,
    )
    if out is None:
        return None
    files, recomputed = out
    _land(files, name, inputs, existing, recomputed)
    return recomputed


def _build(
    settings: Settings,
    storage: Storage,
    name: str,
    inputs: marks.Inputs,
    existing: DeltaTable | None,
) -> None:
    spec = ALL_GOLD[name]
    reads = inputs.reads
    con = duck.connect(settings, storage)
    try:
        # Row order of a Delta table means nothing; not keeping it saves memory at scale.
        con.execute("SET preserve_insertion_order = false")
        parts, key = 1, spec.partition_key or ""
        if key:
            rows = storage.table(*marks.located(spec.sources[0]), version=reads[spec.sources[0]])
            parts = max(1, -(-_row_count(rows) // _PARTITION_ROWS))

        # Derived relations by name: one table per key partition when they have the key
        # (each part's joins then build on its own rows, not on every row once per
        # part), else one. Cut once, and a part's tables dropped once it is built: the
        # build holds one copy of them at most.
        derived: dict[str, list[pa.Table | None]] = {}
        # Relations computed in each part from its own rows instead (`Derived.partition_via`).
        per_part = [
            r for r in spec.derived if parts > 1 and r.frame is not None and r.partition_via
        ]

        via = {source: (column, relation) for source, column, relation in spec.partition_via}

        def views(part: int | None) -> None:
            # Relations first: a view over a source may read one (`partition_via`).
            for name_, tables in derived.items():
                table_ = tables[part if part is not None and len(tables) > 1 else 0]
                assert table_ is not None, "a key partition's relations are used once"
                con.register(name_, table_)
            for own in per_part if part is not None else ():
                assert own.partition_via is not None and part is not None
                tables = derived.get(own.partition_via[2], [])
                if len(tables) != parts:
                    msg = (
                        f"gold.{name}: `{own.name}` is cut through `{own.partition_via[2]}`,"
                        f" which must be computed whole and carry `{key}`"
                    )
                    raise LakehouseError(msg)
                theirs = tables[part]
                assert theirs is not None, "a key partition's relations are used once"
                mine = _derived_via(storage, own, spec.sources, reads, theirs)
                con.register(own.name, mine)
            for source in spec.sources:
                zone, table = marks.located(source)
                where = ""
                if part is not None and source in via:
                    column, relation = map(duck.quote, via[source])
                    where = f" WHERE {column} IN (SELECT {column} FROM {relation})"
                elif part is not None:
                    where = f" WHERE {key_part_sql(key, parts)} = {part}"
                con.execute(
                    f"CREATE OR REPLACE VIEW {duck.quote(table)} AS SELECT * FROM "
                    + duck.scan(storage.uri(zone, table), reads[source])
                    + where
                )

        if spec.frame is None:
            # Derived relations (market-wide aggregates) see every row, once.
            views(None)
            if spec.references is not None:
                provide = REFERENCES.get(spec.references)
                if provide is None:
                    msg = (
                        f"gold.{name} reads `{spec.references}`, which the ML side provides: "
                        "build it with `lakehouse run` (with ML), not on its own"
                    )
                    raise LakehouseError(msg)
                provide(storage, con)
            computed: dict[object, pl.DataFrame] = {}  # derived relations sharing an input
            for relation in spec.derived:
                if relation in per_part:
                    continue
                source = relation.frame or relation.sql
                if source not in computed:
                    if relation.frame is not None:
                        computed[source] = relation.frame(_scans(storage, spec.sources, reads))
                    else:
                        computed[source] = _frame(con.execute(relation.sql).to_arrow_table())
                derived[relation.name] = _cut(relation.transform(computed[source]), key, parts)
                con.register(relation.name, derived[relation.name][0])
            computed.clear()
            for _, relation_name in via.values():
                cut_in_parts = relation_name in {r.name for r in per_part}
                if parts > 1 and not cut_in_parts and len(derived.get(relation_name, [])) != parts:
                    # Uncut, it would put every row in every part: each one written N times.
                    msg = f"gold.{name}: `{relation_name}` must carry `{key}` to cut {name}"
                    raise LakehouseError(msg)

        def part_frames(part: int) -> Iterator[pl.DataFrame]:
            # Each key partition is an independent query over filtered views, so a big
            # build never holds (or spills) more than one partition's working set.
            if spec.frame is not None:
                whole = dict(spec.partition_whole)
                yield _frame_part(
                    storage, spec.frame, spec.sources, reads, key, (part, parts), whole
                )
                return
            if parts > 1:
                views(part)
            yield from _chunks(_normalise(con.execute(spec.sql).to_arrow_reader(_BATCH)))

        files = TableFiles(storage, "gold", name)
        for part in range(parts):
            for frame in part_frames(part):
                files.add(frame)
                del frame  # not held while the next part is computed
            for tables in derived.values():
                if len(tables) > 1:
                    tables[part] = None
            for own in per_part:  # nor this part's relations, while the next one's are
                con.unregister(own.name)
        _land(files, name, inputs, existing)
    finally:
        con.close()


def _land(
    files: TableFiles,
    name: str,
    inputs: marks.Inputs,
    existing: DeltaTable | None,
    recomputed: int | None = None,
) -> None:
    """Commit a build's files with its inputs' marks (`gold_marks`), against the table as read.

    The metadata names the tables read by their ids; an update (`recomputed` entities)
    says so.
    """
    progress = marks.progress(name, inputs)
    operation = "build-gold" if recomputed is None else "update-gold"
    metadata = {"lakehouse.input_ids": json.dumps(inputs.ids, sort_keys=True)}
    if recomputed is not None:
        metadata["lakehouse.recomputed"] = str(recomputed)
    try:
        files.commit(
            commit_properties(progress, operation=operation, metadata=metadata),
            failpoint_name=f"gold.{name}.mid-write",
            replace=existing,
            guard=list(progress),
        )
    except Exception as exc:
        if is_conflict(exc):
            msg = f"another writer built gold.{name} at the same time; this build landed nothing"
            raise ConcurrentWriteError(msg) from None
        raise


def _cut(frame: pl.DataFrame, key: str, parts: int) -> list[pa.Table | None]:
    """Return a derived relation as one Arrow table per key partition (one without the key)."""
    if parts == 1 or key not in frame.columns:
        return [frame.to_arrow()]
    labelled = frame.with_columns(key_part(key, parts).alias("_part"))
    cut = labelled.partition_by("_part", as_dict=True, include_key=False)
    empty = frame.clear().to_arrow()
    return [cut[(p,)].to_arrow() if (p,) in cut else empty for p in range(parts)]


def _derived_via(
    storage: Storage,
    relation: Derived,
    sources: tuple[str, ...],
    versions: dict[str, int],
    theirs: pa.Table,
) -> pa.Table:
    """Compute one key partition of a derived relation (`Derived.partition_via`).

    `theirs` is the part of the relation it is cut through: the source is read for the
    values of the column that part holds.
    """
    assert relation.frame is not None and relation.partition_via is not None
    source, column, _ = relation.partition_via
    lazy = _scans(storage, sources, versions)
    name = marks.located(source)[1]
    values = pl.Series(theirs.column(column))
    lazy[name] = lazy[name].filter(pl.col(column).is_in(values.implode()))
    return relation.transform(relation.frame(lazy)).to_arrow()


def _frame_part(
    storage: Storage,
    frame: Callable[[dict[str, pl.LazyFrame]], pl.DataFrame],
    sources: tuple[str, ...],
    versions: dict[str, int],
    key: str,
    part: tuple[int, int],
    whole: dict[str, str],
) -> pl.DataFrame:
    """Compute one key partition of a Polars-built gold table (`GoldTable.partition_whole`)."""
    lazy = _scans(storage, sources, versions)
    if part[1] == 1:
        return frame(lazy)
    cut = {}
    for name, scan in lazy.items():
        mine = in_part(key, part)
        cut[name] = with_linked(scan, mine, whole[name]) if name in whole else scan.filter(mine)
    result = frame(cut)
    return result.filter(in_part(key, part)) if whole else result


def _scans(
    storage: Storage, sources: tuple[str, ...], versions: dict[str, int]
) -> dict[str, pl.LazyFrame]:
    """Lazy scans of the pinned input versions, by table name."""
    return {
        marks.located(source)[1]: pl.scan_delta(
            storage.uri(*marks.located(source)),
            version=versions[source],
            storage_options=storage.options,
        )
        for source in sources
    }


def _chunks(reader: pa.RecordBatchReader) -> Iterator[pl.DataFrame]:
    """Regroup a query's record batches into frames of about `_FILE_ROWS` rows (one file each)."""
    pending: list[pa.RecordBatch] = []
    rows, emitted = 0, False
    for batch in reader:
        pending.append(batch)
        rows += batch.num_rows
        if rows >= _FILE_ROWS:
            yield _frame(pa.Table.from_batches(pending, reader.schema))
            pending, rows, emitted = [], 0, True
    if pending or not emitted:  # an empty result still gives the table its schema
        yield _frame(pa.Table.from_batches(pending, reader.schema))


def _frame(table: pa.Table) -> pl.DataFrame:
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame


def _normalise(reader: pa.RecordBatchReader) -> pa.RecordBatchReader:
    """Cast DuckDB's decimals from integer division to doubles (Delta-friendly types)."""
    fields = []
    for f in reader.schema:
        if pa.types.is_decimal(f.type):
            fields.append(pa.field(f.name, pa.float64()))
        else:
            fields.append(f)
    schema = pa.schema(fields)
    if schema == reader.schema:
        return reader
    return pa.RecordBatchReader.from_batches(schema, (batch.cast(schema) for batch in reader))
