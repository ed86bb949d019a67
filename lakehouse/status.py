"""`lakehouse status`: tables, freshness against the source, the CDC slots, the last runs.

Each section is read on its own: a section that cannot be read (Postgres down, no stream
set up) says why in its place and the others are still shown.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from lakehouse import catalog, runs
from lakehouse.errors import LakehouseError, described
from lakehouse.settings import Settings
from lakehouse.source.schema import TABLES
from lakehouse.storage import Storage


@dataclass
class SourceTable:
    """A source table's size and newest change."""

    table: str
    rows: int
    newest_change: datetime | None


@dataclass
class TableState:
    """A Delta table with what it holds of the source."""

    table: str
    version: int
    rows: int
    size_bytes: int
    last_update: datetime | None
    newest_change: datetime | None = None
    """The newest source `updated_at` the table holds (from the file statistics)."""
    behind_seconds: float | None = None
    """How much newer the source's newest change is; 0 when the table holds it."""
    current: bool | None = None
    """Whether the step that writes the table has nothing left to take in."""


@dataclass
class Status:
    """Everything `lakehouse status` shows; a section that failed holds its error instead."""

    at: datetime
    warehouse: str
    source: list[SourceTable] = field(default_factory=list)
    source_error: str | None = None
    tables: list[TableState] = field(default_factory=list)
    tables_error: str | None = None
    stream: list[dict[str, Any]] = field(default_factory=list)
    stream_error: str | None = None
    runs: list[runs.RunRecord] = field(default_factory=list)
    runs_error: str | None = None
    verifications: list[dict[str, Any]] = field(default_factory=list)
    verifications_error: str | None = None
    features: dict[str, Any] = field(default_factory=dict)
    features_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (`--format json`)."""
        out = asdict(self)
        out["runs"] = [{**asdict(r), "seconds": round(r.seconds, 3)} for r in self.runs]
        return out


def _error(exc: BaseException) -> str:
    if isinstance(exc, LakehouseError):
        return str(exc)
    return described(exc)


FeaturesReader = Callable[[Settings, Storage], dict[str, Any]]


def collect(settings: Settings, storage: Storage, features: FeaturesReader | None = None) -> Status:
    """Read every section; the ML side's (`features`) is passed in by the caller.

    The batch core never imports `lakehouse.ml` (its imports go one way, ML to core), so
    the command that shows the status hands over the reader of the feature store and model
    section (`lakehouse.ml.status.features`).
    """
    status = Status(at=datetime.now(UTC), warehouse=storage.root)
    readers: list[tuple[str, Callable[[], Any]]] = [
        ("source", lambda: _source(settings)),
        ("tables", lambda: _tables(settings, storage, status.source)),
        ("stream", lambda: _stream(settings, storage)),
        ("runs", lambda: runs.recent(storage)),
        ("verifications", lambda: _verifications(storage)),
    ]
    if features is not None:
        readers.append(("features", lambda: features(settings, storage)))
    for section, read in readers:
        try:
            setattr(status, section, read())
        except Exception as exc:  # this section shows why; the others are still read
            setattr(status, f"{section}_error", _error(exc))
    return status


def _source(settings: Settings) -> list[SourceTable]:
    from psycopg import sql

    from lakehouse.source.schema import connect, ident
    from lakehouse.zones.bronze import require_source

    out = []
    with connect(settings, autocommit=True) as conn:
        require_source(conn, settings.pg_schema)
        for table in TABLES:
            query = sql.SQL("SELECT count(*), max(updated_at) FROM {}").format(
                ident(settings.pg_schema, table)
            )
            row = conn.execute(query).fetchone()
            assert row is not None
            out.append(SourceTable(table, int(row[0]), row[1]))
    return out


def _base_table(zone: str, name: str) -> str | None:
    """Return the source table a bronze/silver table follows, if it follows one."""
    if zone not in ("bronze", "silver") or name.endswith("_rejected"):
        return None
    for suffix in ("_history", "_changes", ""):
        base = name.removesuffix(suffix) if suffix else name
        if base in TABLES:
            return base
    return None


def _tables(settings: Settings, storage: Storage, source: list[SourceTable]) -> list[TableState]:
    from lakehouse.zones import bronze, gold_marks, silver

    newest_in_source = {s.table: s.newest_change for s in source}
    checked: dict[tuple[str, str], bool | None] = {}

    def current(zone: str, producer: str) -> bool | None:
        if (zone, producer) not in checked:
            try:
                if zone == "bronze":
                    checked[zone, producer] = bronze.is_current(settings, storage, producer)
                elif zone == "silver":
                    checked[zone, producer] = silver.is_current(storage, producer)
                else:
                    checked[zone, producer] = gold_marks.is_current(storage, producer)
            except Exception:  # the source is down: its own section says so
                checked[zone, producer] = None
        return checked[zone, producer]

    out = []
    for info in catalog.describe(storage):
        state = TableState(
            table=f"{info.zone}.{info.name}",
            version=info.version,
            rows=info.rows,
            size_bytes=info.size_bytes,
            last_update=info.last_update,
        )
        base = _base_table(info.zone, info.name)
        if base is not None:
            state.newest_change = info.newest_change
            source_newest = newest_in_source.get(base)
            if source_newest is not None and state.newest_change is not None:
                # File statistics keep milliseconds: compare at that precision.
                source_ms = source_newest.replace(
                    microsecond=source_newest.microsecond // 1000 * 1000
                )
                behind = (source_ms - state.newest_change).total_seconds()
                state.behind_seconds = max(0.0, behind)
            if not info.name.endswith("_changes"):
                state.current = current(info.zone, base)
        elif info.zone == "gold":
            state.current = current("gold", info.name)
        out.append(state)
    return out


def _stream(settings: Settings, storage: Storage) -> list[dict[str, Any]]:
    from stream import setup as stream_setup

    rows = []
    for t in stream_setup.status(settings, storage):
        if not t.slot_exists and not t.changes:
            continue
        rows.append(
            {
                "table": t.table,
                "slot": t.slot if t.slot_exists else None,
                "active": t.active,
                "wal_status": t.wal_status,
                "lag_bytes": t.lag_bytes,
                "caught_up": t.caught_up,
                "behind": t.behind,
                "confirmed_lsn": t.confirmed_lsn,
                "landed_lsn": t.landed_lsn,
                "changes": t.changes,
                "since_last_change_seconds": t.freshness_seconds,
            }
        )
    return rows


def _verifications(storage: Storage) -> list[dict[str, Any]]:
    from lakehouse import verify

    return verify.last(storage)


# ---------------------------------------------------------------- rendering


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _yes(value: bool | None) -> str:
    return "" if value is None else ("yes" if value else "NO")


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _section(
    title: str, error: str | None, empty: str, header: list[str], rows: list[tuple[Any, ...]]
) -> str:
    """One titled section: its error, a line saying it is empty, or an aligned table."""
    from lakehouse.sql import QueryResult
    from lakehouse.sql import render as table

    if error:
        return f"\n{title}\n  unavailable: {error}\n"
    if not rows:
        return f"\n{title}\n  {empty}\n"
    return f"\n{title}\n" + table(QueryResult(header, rows))


def render(status: Status) -> str:
    """Render the status as one screen of aligned tables."""
    parts = [f"lakehouse status at {_when(status.at)} UTC, warehouse {status.warehouse}\n"]
    parts.append(
        _section(
            "Source (Postgres)",
            status.source_error,
            "no source tables",
            ["table", "rows", "newest change UTC"],
            [(s.table, f"{s.rows:,}", _when(s.newest_change)) for s in status.source],
        )
    )
    parts.append(
        _section(
            "Tables",
            status.tables_error,
            "no tables yet; run `lakehouse run`",
            [
                "table",
                "version",
                "rows",
                "size",
                "last update UTC",
                "newest change UTC",
                "behind source",
                "current",
            ],
            [
                (
                    t.table,
                    t.version,
                    f"{t.rows:,}",
                    catalog.human_size(t.size_bytes),
                    _when(t.last_update),
                    _when(t.newest_change),
                    _ago(t.behind_seconds),
                    _yes(t.current),
                )
                for t in status.tables
            ],
        )
    )
    parts.append(
        _section(
            "CDC stream",
            status.stream_error,
            "no replication slots: batch extraction feeds bronze",
            ["table", "slot", "active", "behind", "landed LSN", "changes", "last change"],
            [
                (
                    s["table"],
                    s["slot"] or "(dropped)",
                    "yes" if s["active"] else "no",
                    s["behind"],
                    s["landed_lsn"] or "",
                    f"{s['changes']:,}",
                    _ago(s["since_last_change_seconds"]),
                )
                for s in status.stream
            ],
        )
    )
    parts.append(
        _section(
            "Pipeline runs (newest first)",
            status.runs_error,
            "none recorded yet (`lakehouse run` records its runs)",
            ["started UTC", "took", "outcome", "tasks", "error"],
            [
                (
                    _when(r.started_at),
                    f"{r.seconds:.1f}s",
                    r.outcome,
                    len(r.tasks),
                    (r.error or "")[:80],
                )
                for r in status.runs
            ],
        )
    )
    parts.append(
        _section(
            "Last verification against the source (`lakehouse verify`)",
            status.verifications_error,
            "never verified; run `lakehouse verify`",
            ["table", "verified UTC", "rows", "in flight", "differences", "repaired", "first"],
            [
                (
                    f"silver.{v['table']}",
                    _when(v["verified_at"]),
                    f"{v['source_rows']:,}",
                    f"{v['in_flight']:,}",
                    f"{v['differences']:,}",
                    f"{v['repaired']:,}",
                    (v["details"] or "")[:60],
                )
                for v in status.verifications
            ],
        )
    )
    parts.append("\nFeatures and model\n")
    if status.features_error:
        parts.append(f"  unavailable: {status.features_error}\n")
    else:
        f = status.features
        upto = f.get("materialized_up_to") or "never materialized"
        parts.append(
            f"  online store ({f['online_store']}): materialized up to {upto}; "
            f"current with gold: {_yes(f['online_store_current'])}\n"
        )
        if "online_behind_silver_seconds" in f:
            streamed = f.get("online_refreshed_by_stream_at")
            parts.append(
                f"    freshness: {_ago(f['online_behind_silver_seconds'])} behind silver "
                f"(silver's own lag: the Tables section)"
                + (f"; last refreshed by the stream at {streamed}" if streamed else "")
                + "\n"
            )
        if f.get("model_version"):
            parts.append(
                f"  model {f['model_version']}, current: {_yes(f['model_current'])}\n"
                f"    {f.get('model_summary', '')}\n"
            )
        else:
            parts.append("  no model yet; run `lakehouse train` or `lakehouse run`\n")
        parts.append(_prediction_log(f.get("prediction_log") or {}))
        parts.append(_monitoring(f.get("monitoring") or {}))
    return "".join(parts)


def _monitoring(state: dict[str, Any]) -> str:
    """Render the monitoring flags: drifting features and AUC below evaluation."""
    if "error" in state:
        return f"  monitoring: unavailable: {state['error']}\n"
    if not state.get("built"):
        return "  monitoring: no marts yet (`lakehouse run` builds them from bronze.predictions)\n"
    drifting, falling = state.get("drifting", []), state.get("falling_auc", [])
    head = (
        f"  monitoring (gold, as of the last `lakehouse run`; newest day "
        f"{state.get('newest_day') or 'none'}): "
    )
    if not drifting and not falling:
        return head + "no drifting feature, no model below its evaluation AUC\n"
    lines = [head + f"{len(drifting)} drifting feature(s), {len(falling)} falling AUC\n"]
    for d in drifting:
        lines.append(
            f"    DRIFT {d['feature']} (model {d['model_version']}, {d['day']}, "
            f"{d['predictions']:,} predictions): {'; '.join(d['reasons'])}\n"
        )
    for q in falling:
        lines.append(
            f"    AUC model {q['model_version']} on {q['day']}: {q['roc_auc']:.3f} against "
            f"{q['evaluation_roc_auc']:.3f} at evaluation ({q['with_outcome']:,} outcomes)\n"
        )
    return "".join(lines)


def _prediction_log(state: dict[str, Any]) -> str:
    """Render the inference log: running writers, and crashed ones with what they lost."""
    if not state.get("enabled", True):
        return "  prediction log: off (LAKEHOUSE_PREDICTION_LOG=off)\n"
    running, crashed = state.get("running", []), state.get("crashed", [])
    unlanded = state.get("unlanded", [])
    if not running and not crashed and not unlanded:
        return "  prediction log (bronze.predictions): no API running here\n"
    lines = []
    for w in running:
        lines.append(
            f"  prediction log: API process {w['pid']} landed {w['landed']:,} of "
            f"{w['received']:,}, {w['buffered']:,} buffered, {w['dropped']:,} dropped"
            + (f"; last error: {w['last_error']}" if w.get("last_error") else "")
            + "\n"
        )
    for w in crashed:
        lines.append(
            f"  prediction log: API process {w['pid']} on {w['host']} ended without closing "
            f"(a crash): {w['buffered']:,} predictions buffered at its last report "
            f"({w['reported_at']}) and any answered after it were not logged; "
            f"{w['dropped']:,} dropped before\n"
        )
    for w in unlanded:
        lines.append(
            f"  prediction log: API process {w['pid']} on {w['host']} exited with "
            f"{w['buffered']:,} predictions not landed (its drain ran out of time; last "
            f"error: {w.get('last_error') or 'none'})\n"
        )
    return "".join(lines)
