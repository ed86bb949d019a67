"""`lakehouse verify`: does silver hold the source, row for row? And `--repair`.

Silver's promise: every live source row is in `silver.<table>` (its current version
passes the rules) or is a current reject, exactly once, with the source's values (as
`clean` normalises them). Verify checks that with checksums computed where the data is:
in Postgres over the source, in DuckDB over silver, the same canonical text per value
(integers in decimal, doubles by their 64 bits with every NaN as one, text cleaned by the
same SQL, timestamps in microseconds), hashed with MD5 per key and column and summed per
bucket of keys. Only buckets whose sums differ are compared key by key, so a clean table
costs one aggregate query on each side.

A source that keeps changing is compared at a fence: silver is first brought up to a
source snapshot (batch: an ingest; stream: waiting until the stream has landed past it),
and keys written after that snapshot are *in flight*, left out on both sides. What
differs is then a divergence, not a delay. `--repair` re-reads the differing keys from
the source into bronze as a repair batch (stamped with its snapshot's WAL position like
any batch) and promotes it. Each verification is recorded in `_meta.verifications`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import polars as pl
import psycopg
import pyarrow as pa
from deltalake import write_deltalake
from psycopg import sql

from lakehouse import duck
from lakehouse.errors import LakehouseError
from lakehouse.repair import promote_all, reread
from lakehouse.settings import Settings
from lakehouse.source import extract
from lakehouse.source.schema import TABLES, SourceTable, connect, ident
from lakehouse.storage import Storage
from lakehouse.transforms import checksums, quality
from lakehouse.zones import bronze
from lakehouse.zones.commits import TABLE_CONFIGURATION

BUCKETS = 256
ZONE, TABLE = "_meta", "verifications"
SCHEMA = pa.schema(
    [
        ("verified_at", pa.timestamp("us", tz="UTC")),
        ("table", pa.string()),
        ("source_rows", pa.int64()),
        ("in_flight", pa.int64()),
        ("differences", pa.int64()),
        ("repaired", pa.int64()),
        ("details", pa.string()),
        ("seconds", pa.float64()),
    ]
)
_SHOWN = 20


class VerifyError(LakehouseError):
    """Silver could not be brought up to the source to compare it."""


@dataclass(frozen=True)
class Difference:
    """One key where silver and the source disagree."""

    key: int
    problem: str
    """`missing from silver`, `not in the source`, `values differ: <columns>`, or a
    consistency problem inside silver."""


@dataclass
class Verification:
    """The result for one table."""

    table: str
    source_rows: int = 0
    in_flight: int = 0
    differences: list[Difference] = field(default_factory=list)
    repaired: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Tell whether silver holds the source (what is in flight aside)."""
        return not self.differences


# ----------------------------------------------------------------- the two sides


@dataclass(frozen=True)
class _Fence:
    """Which source rows silver must already hold: the rest are in flight."""

    snapshot: str | None
    """Stream-fed: rows visible in this pg_snapshot are settled."""
    xid: int | None
    """Batch-fed: rows written below this transaction id are settled."""

    def settled(self, column: str) -> sql.Composable:
        if self.snapshot is not None:
            return sql.SQL("pg_visible_in_snapshot({}, {}::pg_snapshot)").format(
                ident(column), sql.Literal(self.snapshot)
            )
        return sql.SQL("{} < {}::xid8").format(ident(column), sql.Literal(str(self.xid or 0)))


def _in_flight(
    conn: psycopg.Connection, schema: str, source: SourceTable, fence: _Fence
) -> pl.Series | None:
    """Keys written after the fence; None when a TRUNCATE is (then every key may be)."""
    truncated = conn.execute(
        sql.SQL(
            "SELECT EXISTS (SELECT 1 FROM {d} WHERE table_name = {name} AND row_id IS NULL"
            " AND NOT {s})"
        ).format(
            d=ident(schema, "deleted_rows"),
            name=sql.Literal(source.name),
            s=fence.settled("deleted_xid"),
        )
    ).fetchone()
    if truncated and truncated[0]:
        return None
    rows = conn.execute(
        sql.SQL(
            "SELECT {key} FROM {t} WHERE NOT {s1}"
            " UNION SELECT row_id FROM {d} WHERE table_name = {name} AND row_id IS NOT NULL"
            " AND NOT {s2}"
        ).format(
            key=ident(source.key),
            t=ident(schema, source.name),
            s1=fence.settled("updated_xid"),
            d=ident(schema, "deleted_rows"),
            name=sql.Literal(source.name),
            s2=fence.settled("deleted_xid"),
        )
    ).fetchall()
    return pl.Series(source.key, [r[0] for r in rows], dtype=pl.Int64)


def _source_frame(
    conn: psycopg.Connection,
    schema: str,
    source: SourceTable,
    fence: _Fence,
    *,
    buckets: list[int] | None,
) -> pl.DataFrame:
    """Per key (or per bucket when `buckets` is None): the column hashes, in Postgres."""
    key = f'"{source.key}"'
    hashes = checksums.hashes(
        source,
        lambda c, t: checksums.canon_pg(source.name, c, t),
        checksums.hash_pg,
        lambda k: f"{k}::text",
    )
    inner = sql.SQL(f"SELECT {key}, {hashes} FROM {{t}} WHERE {{settled}}").format(
        t=ident(schema, source.name), settled=fence.settled("updated_xid")
    )
    names = [f"h_{c}" for c in source.column_names]
    if buckets is None:
        sums = ", ".join(f'sum("{n}")::text AS "{n}"' for n in names)
        query = sql.SQL(
            f"SELECT {key} % {BUCKETS} AS bucket, count(*) AS n, {sums} FROM ({{}}) x GROUP BY 1"
        ).format(inner)
    else:
        query = sql.SQL(f"SELECT * FROM ({{}}) x WHERE {key} % {BUCKETS} = ANY({{}})").format(
            inner, sql.Literal(buckets)
        )
    cur = conn.execute(query)
    columns = [d.name for d in cur.description or []]
    return _frame(cur.fetchall(), columns)


def _frame(rows: list[tuple[object, ...]], columns: list[str]) -> pl.DataFrame:
    """Rows fetched from either engine: hashes and their sums as text (exact), the rest ints."""
    out = {}
    for i, name in enumerate(columns):
        values = [r[i] for r in rows]
        if name.startswith("h_"):
            out[name] = pl.Series(name, [None if v is None else str(v) for v in values], pl.Utf8)
        else:
            out[name] = pl.Series(name, values, pl.Int64)
    return pl.DataFrame(out)


def _silver_relation(storage: Storage, source: SourceTable) -> str:
    """Return SQL over silver: one row per key held (current rows, and current rejects)."""
    table = source.name
    cur = duck.scan(storage.uri("silver", table))
    rej = duck.scan(storage.uri("silver", f"{table}_rejected"))
    key = f'"{source.key}"'

    def as_text(k: str) -> str:
        return f"CAST({k} AS VARCHAR)"

    def canon(typed: bool) -> Callable[[str, str], str]:
        return lambda c, t: checksums.canon_duck(table, c, t, typed=typed)

    typed = checksums.hashes(source, canon(True), checksums.hash_duck, as_text)
    raw = checksums.hashes(source, canon(False), checksums.hash_duck, as_text)
    parts = [f"SELECT {key}, 'current' AS _where, {typed} FROM {cur}"]
    if storage.exists("silver", f"{table}_rejected"):
        parts.append(f"SELECT {key}, 'rejected' AS _where, {raw} FROM {rej} WHERE is_current")
    return " UNION ALL ".join(parts)


def _silver_frame(
    con: object, storage: Storage, source: SourceTable, *, buckets: list[int] | None
) -> pl.DataFrame:
    key = f'"{source.key}"'
    names = [f"h_{c}" for c in source.column_names]
    inner = _silver_relation(storage, source)
    flight = f"{key} NOT IN (SELECT {key} FROM in_flight)"
    if buckets is None:
        sums = ", ".join(f'CAST(sum("{n}") AS VARCHAR) AS "{n}"' for n in names)
        query = (
            f"SELECT {key} % {BUCKETS} AS bucket, count(*) AS n, {sums} "
            f"FROM ({inner}) WHERE {flight} GROUP BY 1"
        )
    else:
        listed = ", ".join(str(b) for b in buckets) or "NULL"
        query = (
            f"SELECT * EXCLUDE (_where) FROM ({inner}) "
            f"WHERE {flight} AND {key} % {BUCKETS} IN ({listed})"
        )
    result = con.execute(query)  # type: ignore[attr-defined]
    columns = [d[0] for d in result.description]
    return _frame(result.fetchall(), columns)


# ----------------------------------------------------------------- verify


def verify(
    settings: Settings,
    storage: Storage,
    tables: list[str] | None = None,
    *,
    repair: bool = False,
    timeout: float = 60.0,
) -> list[Verification]:
    """Bring silver up to a source snapshot, compare, and (with `repair`) fix what differs."""
    chosen = tables or list(TABLES)
    fences = _catch_up(settings, storage, chosen, timeout)
    results = []
    for table in chosen:
        started = time.monotonic()
        result = _compare(settings, storage, table, fences[table])
        if repair and result.differences:
            result.repaired = reread(
                settings,
                storage,
                table,
                sorted({d.key for d in result.differences}),
                doubled=sorted(
                    {d.key for d in result.differences if d.problem.startswith("held twice")}
                ),
            )
            promote_all(storage)
            again = _compare(settings, storage, table, fences[table])
            result.differences = again.differences
        result.seconds = time.monotonic() - started
        record(storage, result)
        results.append(result)
    return results


def _catch_up(
    settings: Settings, storage: Storage, tables: list[str], timeout: float
) -> dict[str, _Fence]:
    """Bring silver up to a source snapshot; return, per table, which rows it must hold."""
    fences: dict[str, _Fence] = {}
    with connect(settings, autocommit=True) as conn:
        bronze.require_source(conn, settings.pg_schema)
        row = conn.execute(
            "SELECT pg_current_snapshot()::text,"
            " (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint"
        ).fetchone()
        assert row is not None
        snapshot, lsn = str(row[0]), int(row[1])
        fed = {t: bronze.stream_fed(conn, settings.pg_schema, t) for t in TABLES}
    deadline = time.monotonic() + timeout
    for table in TABLES:
        if fed[table]:
            while (bronze.changes_landed(storage, table) or 0) < lsn:
                if time.monotonic() > deadline:
                    msg = (
                        f"the stream has not landed `{table}` up to the verification point "
                        f"within {timeout:g}s; start `lakehouse stream` (or tear it down with "
                        "`lakehouse stream teardown`) and verify again"
                    )
                    raise VerifyError(msg)
                time.sleep(0.5)
        else:
            bronze.ingest(settings, storage, table)
    promote_all(storage)
    for table in tables:
        if fed[table]:
            fences[table] = _Fence(snapshot, None)
        else:
            fences[table] = _Fence(None, bronze.watermark(storage, table))
    return fences


def _compare(settings: Settings, storage: Storage, table: str, fence: _Fence) -> Verification:
    source = TABLES[table]
    key = source.key
    result = Verification(table)
    if not storage.exists("silver", table):
        msg = f"silver.{table} does not exist yet; run `lakehouse run` first"
        raise VerifyError(msg)
    con = duck.connect(settings, storage)
    try:
        with connect(settings) as conn, extract.snapshot(conn):
            flight = _in_flight(conn, settings.pg_schema, source, fence)
            if flight is None:
                # A TRUNCATE after the fence: only what the source still holds compares.
                flight = _silver_keys(con, storage, source).filter(
                    ~pl.col(key).is_in(_source_keys(conn, settings.pg_schema, source).implode())
                )[key]
            result.in_flight = flight.len()
            con.register("in_flight", pl.DataFrame({key: flight}).to_arrow())
            src = _source_frame(conn, settings.pg_schema, source, fence, buckets=None)
            src = src.filter(pl.col("bucket").is_not_null())
            lake = _silver_frame(con, storage, source, buckets=None)
            result.source_rows = int(src["n"].sum() or 0)
            joined = src.join(lake, on="bucket", how="full", suffix="_silver", coalesce=True)
            compare = [c for c in src.columns if c != "bucket"]
            differ = joined.filter(
                pl.any_horizontal([pl.col(c).ne_missing(pl.col(f"{c}_silver")) for c in compare])
            )["bucket"].to_list()
            if differ:
                src_rows = _source_frame(conn, settings.pg_schema, source, fence, buckets=differ)
                src_rows = src_rows.filter(~pl.col(key).is_in(flight.implode()))
                lake_rows = _silver_frame(con, storage, source, buckets=differ)
                result.differences += _by_key(src_rows, lake_rows, source)
        result.differences += _consistency(con, storage, table, flight)
    finally:
        con.close()
    result.differences.sort(key=lambda d: d.key)
    return result


def _silver_keys(con: object, storage: Storage, source: SourceTable) -> pl.DataFrame:
    key = f'"{source.key}"'
    rows = con.execute(  # type: ignore[attr-defined]
        f"SELECT {key} FROM ({_silver_relation(storage, source)})"
    ).fetchall()
    return pl.DataFrame({source.key: [r[0] for r in rows]}, schema={source.key: pl.Int64})


def _source_keys(conn: psycopg.Connection, schema: str, source: SourceTable) -> pl.Series:
    rows = conn.execute(
        sql.SQL("SELECT {} FROM {}").format(ident(source.key), ident(schema, source.name))
    ).fetchall()
    return pl.Series(source.key, [r[0] for r in rows], dtype=pl.Int64)


def _by_key(src: pl.DataFrame, lake: pl.DataFrame, source: SourceTable) -> list[Difference]:
    key = source.key
    out = []
    dup = lake.filter(pl.col(key).is_duplicated())[key].unique().to_list()
    out += [Difference(k, "held twice in silver (current and rejected, or twice)") for k in dup]
    lake = lake.unique(key, keep="first")
    joined = src.join(lake, on=key, how="full", suffix="_silver", coalesce=True)
    for row in joined.iter_rows(named=True):
        k = row[key]
        if row[f"h_{key}"] is None:
            out.append(Difference(k, "not in the source"))
        elif row[f"h_{key}_silver"] is None:
            out.append(Difference(k, "missing from silver"))
        else:
            cols = [c for c in source.column_names if row[f"h_{c}"] != row[f"h_{c}_silver"]]
            if cols:
                out.append(Difference(k, "values differ: " + ", ".join(cols)))
    return out


def _consistency(con: object, storage: Storage, table: str, flight: pl.Series) -> list[Difference]:
    """Problems inside silver that no comparison of values shows."""
    key = TABLES[table].key
    queries = []
    history = duck.scan(storage.uri("silver", f"{table}_history"))
    current = duck.scan(storage.uri("silver", table))
    if storage.exists("silver", f"{table}_history"):
        queries.append(
            (
                "its history has more than one open version",
                f'SELECT "{key}" FROM {history} WHERE valid_to IS NULL GROUP BY 1 '
                "HAVING count(*) > 1",
            )
        )
        queries.append(
            (
                "in silver without an open history version",
                f'SELECT "{key}" FROM {current} EXCEPT SELECT "{key}" FROM {history} '
                "WHERE valid_to IS NULL",
            )
        )
    if table == "loan_applications" and storage.exists("silver", "applicants"):
        people = duck.scan(storage.uri("silver", "applicants"))
        queries.append(
            (
                "in silver though its applicant is not",
                f'SELECT "{key}" FROM {current} WHERE applicant_id NOT IN '
                f"(SELECT applicant_id FROM {people})",
            )
        )
        if storage.exists("silver", f"{table}_rejected"):
            rejected = duck.scan(storage.uri("silver", f"{table}_rejected"))
            queries.append(
                (
                    "held back by applicant_exists though its applicant is in silver",
                    f'SELECT "{key}" FROM {rejected} WHERE is_current AND '
                    f"list_contains(_failed_rules, '{quality.APPLICANT_EXISTS}') AND "
                    f"applicant_id IN (SELECT applicant_id FROM {people})",
                )
            )
    out = []
    skip = set(flight.to_list())
    for problem, query in queries:
        for (k,) in con.execute(query).fetchall():  # type: ignore[attr-defined]
            if k not in skip:
                out.append(Difference(int(k), problem))
    return out


# ----------------------------------------------------------------- records


def record(storage: Storage, result: Verification) -> None:
    """Append one verification to `_meta.verifications` (one Delta commit)."""
    details = "; ".join(f"{d.key}: {d.problem}" for d in result.differences[:_SHOWN])
    row = pa.Table.from_pylist(
        [
            {
                "verified_at": datetime.now(UTC),
                "table": result.table,
                "source_rows": result.source_rows,
                "in_flight": result.in_flight,
                "differences": len(result.differences),
                "repaired": result.repaired,
                "details": details,
                "seconds": round(result.seconds, 3),
            }
        ],
        schema=SCHEMA,
    )
    write_deltalake(
        storage.uri(ZONE, TABLE),
        row,
        mode="append",
        storage_options=storage.options,
        configuration=TABLE_CONFIGURATION,
    )


def last(storage: Storage) -> list[dict[str, object]]:
    """Return the newest verification of each table (none before the first)."""
    dt = storage.table_or_none(ZONE, TABLE)
    if dt is None:
        return []
    return (
        pl.scan_delta(dt)
        .sort("verified_at", descending=True)
        .unique("table", keep="first", maintain_order=True)
        .sort("table")
        .collect()
        .to_dicts()
    )
