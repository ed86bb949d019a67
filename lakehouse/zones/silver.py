"""Silver: the validated current state, SCD2 history and rejects, promoted in WAL order.

`silver.<table>` holds exactly the source rows whose current version passes the rules;
`silver.<table>_history` every version silver held, with when; `silver.<table>_rejected`
every version that failed a rule, with the rules, the current ones flagged `is_current`.
A promotion reads the bronze batches and CDC changes its targets have not taken in,
orders them by WAL position, applies them to each key's prior state
(`lakehouse.transforms.silver`), and commits the three targets in turn, each against the
version it read (`lakehouse.zones.silver_state` says how an interrupted promotion is
finished). Any number of writers may promote the same table at once: a commit that finds
another writer's commit since its read fails, nothing of it is visible, and the writer
plans again from what is now there (`lakehouse.zones.commits`).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime

import polars as pl
from deltalake import DeltaTable

from lakehouse.errors import StorageError
from lakehouse.failpoints import failpoint
from lakehouse.source.schema import TABLES
from lakehouse.storage import Storage, opened_once
from lakehouse.transforms import changes as changes_t
from lakehouse.transforms import quality
from lakehouse.transforms import silver as transform
from lakehouse.transforms.partitions import in_part
from lakehouse.zones import silver_reads as reads
from lakehouse.zones import silver_writes as writes
from lakehouse.zones.commits import ConcurrentWriteError, commit_properties
from lakehouse.zones.datafiles import TableFiles
from lakehouse.zones.silver_context import Applicants, candidates, own_events, with_context
from lakehouse.zones.silver_state import (
    IDENTITY,
    TARGETS,
    Marks,
    Targets,
    at_marks,
    changes_upto,
    context_versions,
    target_name,
    wanted,
)

__all__ = [
    "TARGETS",
    "PromoteResult",
    "changes_progress",
    "changes_upto",
    "is_current",
    "progress",
    "promote",
    "target_name",
]

# Tries before a writer that keeps losing races gives up (it lands nothing extra).
ATTEMPTS = 8
# Lineage kept with every silver row: the bronze batch (or commit), the WAL position, and
# when the lakehouse saw the version.
_POSITION = ["_batch_id", "_lsn", "_seq", "_seen_at"]


@dataclass
class PromoteResult:
    """What one promotion wrote, per target table."""

    table: str
    upto_batch: int | None
    rows: dict[str, int] = field(default_factory=dict)
    rejects_by_rule: dict[str, int] = field(default_factory=dict)
    retries: int = 0


def progress(storage: Storage, table: str) -> dict[str, int | None]:
    """Return the last bronze batch each silver target of `table` has taken in."""
    targets = Targets.read(storage, table)
    return {t: (m.batch if m is not None else None) for t, m in targets.marks.items()}


def changes_progress(storage: Storage, table: str) -> dict[str, int | None]:
    """Return, per silver target, the LSN below which it has taken in every CDC change."""
    targets = Targets.read(storage, table)
    return {t: (m.changes if m is not None else None) for t, m in targets.marks.items()}


def is_current(storage: Storage, table: str) -> bool:
    """Tell whether every silver target of `table` has taken in all it can now (cheap).

    For loan applications, also that no application waits for an applicant that has
    arrived, or stays in silver after its applicant left.
    """
    targets = Targets.read(storage, table)
    settled = targets.settled
    if settled is None:
        return False
    end = wanted(storage, table, context_versions(storage, table))
    if (end.batch, end.changes) != (settled.batch, settled.changes):
        return False
    return end.context == settled.context or _found(storage, targets, end).height == 0


def _found(storage: Storage, targets: Targets, end: Marks) -> pl.DataFrame:
    return candidates(
        targets.tables["current"], targets.tables["rejected"], Applicants.at(storage, end.context)
    )


@dataclass
class _Plan:
    """One promotion: from the lagging targets' marks to `end`, for `pending` targets."""

    start: Marks | None
    end: Marks
    pending: list[str]
    tables: dict[str, DeltaTable | None]
    """Each target as read now: commits are checked against these versions."""
    prior: dict[str, DeltaTable | None]
    """Each target as of `start`: where the keys' prior state is read."""
    reconcile: bool


def promote(storage: Storage, table: str) -> PromoteResult:
    """Promote what the silver targets of `table` have not taken in yet.

    Finishes an interrupted promotion first, then takes in new bronze batches and CDC
    changes (and, for loan applications, applicants that came or went). A rerun with
    nothing new is a no-op. Losing a race to another writer is not an error: this one
    plans again from what the other landed.
    """
    result = PromoteResult(table, None)
    goal: Marks | None = None
    for attempt in range(ATTEMPTS):
        try:
            with opened_once():  # one snapshot of each table per attempt
                if goal is None:
                    goal = wanted(storage, table, context_versions(storage, table))
                plan = _plan(storage, table)
                if plan is None:
                    return result
                _run(storage, table, plan, result)
            if len(plan.pending) == len(TARGETS):
                return result
            # That finished an interrupted promotion; plan again for what is new.
        except ConcurrentWriteError:
            result.retries += 1
            # Beside a writer that commits more often than this one can (the stream's
            # speed layer), every new plan would lose again. What this call was asked
            # for is silver as of its start: once another writer has taken that in, done.
            if goal is not None and reached(storage, table, goal):
                return result
            if attempt == ATTEMPTS - 1:
                break
            time.sleep(random.uniform(0.05, 0.3) * (attempt + 1))  # noqa: S311 (jitter)
    msg = (
        f"silver `{table}`: other writers committed first {ATTEMPTS} times in a row; this "
        "writer stopped with nothing half-written: rerun (or run fewer writers at once)"
    )
    raise ConcurrentWriteError(msg)


def reached(storage: Storage, table: str, goal: Marks) -> bool:
    """Tell whether every silver target of `table` has taken in at least `goal`.

    The bronze batch, the CDC changes and (loan applications) the applicant tables'
    versions the rules were checked against: each at or past the goal's.
    """
    settled = Targets.read(storage, table).settled
    if settled is None:
        return False

    def covers(have: int | None, want: int | None) -> bool:
        return want is None or (have is not None and have >= want)

    def same(name: str, have: int | None, want: int) -> bool:
        # A table's identity is the same or not; a version is reached or not.
        return have == want if name.endswith(IDENTITY) else covers(have, want)

    context = dict(settled.context)
    return (
        covers(settled.batch, goal.batch)
        and covers(settled.changes, goal.changes)
        and all(same(name, context.get(name), version) for name, version in goal.context)
    )


def _plan(storage: Storage, table: str) -> _Plan | None:
    targets = Targets.read(storage, table)
    marks = targets.marks
    if all(m is None for m in marks.values()):
        end = wanted(storage, table, context_versions(storage, table))
        if end.batch is None and end.changes is None:
            return None
        return _Plan(None, end, list(TARGETS), targets.tables, dict.fromkeys(TARGETS), False)
    settled = targets.settled
    if settled is not None:
        end = wanted(storage, table, context_versions(storage, table))
        if end.batch is None:
            end = Marks(settled.batch, end.changes, end.context)
        moved = (end.batch, end.changes) != (settled.batch, settled.changes)
        reconcile = end.context != settled.context
        if not moved and (not reconcile or _found(storage, targets, end).height == 0):
            return None
        return _Plan(settled, end, list(TARGETS), targets.tables, targets.tables, reconcile)
    # Targets differ: finish the promotion the leading target recorded.
    leader = targets.leader
    assert leader is not None
    lagging = [t for t in TARGETS if marks[t] != leader]
    starts = {marks[t] for t in lagging}
    try:
        if len(starts) != 1:
            msg = (
                f"the silver tables of `{table}` are at three different points; rebuild "
                f"silver `{table}`: delete its three tables and `lakehouse run`"
            )
            raise StorageError(msg)
        start = next(iter(starts))
        prior: dict[str, DeltaTable | None] = {}
        for target in TARGETS:
            dt = targets.tables[target]
            if target in lagging or dt is None:
                prior[target] = dt
            elif start is None:
                prior[target] = None  # the lagging ones do not exist yet: nothing before
            else:
                prior[target] = at_marks(storage, table, target, dt, start)
    except StorageError:
        # A view no single writer leaves is one read while others committed: plan again.
        if targets.moved(storage):
            msg = f"other writers are promoting silver `{table}`"
            raise ConcurrentWriteError(msg) from None
        raise
    reconcile = start is not None and start.context != leader.context
    return _Plan(start, leader, lagging, targets.tables, prior, reconcile)


def _span(start: Marks | None, end: Marks) -> reads.Range:
    batch_from = -1 if start is None or start.batch is None else start.batch
    changes_from = 0 if start is None or start.changes is None else start.changes
    batches = None
    if end.batch is not None and batch_from < end.batch:
        batches = (batch_from, end.batch)
    changes = None
    if end.changes is not None and changes_from < end.changes:
        changes = (changes_from, end.changes)
    return reads.Range(batches, changes)


def _run(storage: Storage, table: str, plan: _Plan, result: PromoteResult) -> None:
    """Compute the plan's outcome, key partition by key partition; commit each target."""
    key = TABLES[table].key
    span = _span(plan.start, plan.end)
    loans = table == "loan_applications"
    applicants = Applicants.at(storage, plan.end.context) if loans else None
    found = pl.DataFrame(schema={key: pl.Int64})
    if plan.reconcile and applicants is not None:
        found = candidates(plan.prior["current"], plan.prior["rejected"], applicants)
    total = reads.count_input(storage, table, span)
    parts = max(1, -(-total // reads.PARTITION_ROWS))
    created = {
        t: TableFiles(storage, "silver", target_name(table, t))
        for t in plan.pending
        if plan.tables[t] is None
    }
    rejects: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    with writes.Spool(spill=parts > 1 and len(created) < len(plan.pending)) as spool:
        batches = reads.bronze_reader(
            storage, table, span, parts, spool.path("bronze") if parts > 1 else None
        )
        for part in range(parts):
            raw = reads.read_input(storage, table, span, (part, parts), batches)
            mine = found.filter(in_part(key, (part, parts)))
            mine = mine.filter(~pl.col(key).is_in(raw[key].implode()))
            outputs = _partition(table, raw, mine, plan, applicants, (part, parts))
            for target in plan.pending:
                frame = outputs[target]
                new = (
                    frame.filter(pl.col("_close_key").is_null())
                    if "_close_key" in frame.columns
                    else frame
                )
                if target == "rejected":
                    rejects.update(dict(new.group_by("_rule").len().iter_rows()))
                counts[target] += new.height
                if target in created:
                    created[target].add(frame)
                else:
                    spool.add(target, frame)
        for target in plan.pending:
            _commit(storage, table, target, plan, spool, created.get(target))
            # Counted once landed: a commit beaten by another writer counts nothing.
            name = target_name(table, target)
            result.rows[name] = result.rows.get(name, 0) + counts[target]
            if target == "rejected":
                merged = Counter(result.rejects_by_rule) + rejects
                result.rejects_by_rule = dict(sorted(merged.items()))
    result.upto_batch = plan.end.batch


def _partition(
    table: str,
    raw: pl.DataFrame,
    own: pl.DataFrame,
    plan: _Plan,
    applicants: Applicants | None,
    part: tuple[int, int],
) -> dict[str, pl.DataFrame]:
    """Compute one key partition's outcome: prior state, rules, WAL-ordered application."""
    key = TABLES[table].key
    columns = TABLES[table].column_names
    truncated = bool((raw["_op"] == "truncate").any())
    keys = None
    if not truncated:
        keys = pl.concat(
            [raw[key], raw["_old_key"].drop_nulls(), own[key]]
            if "_old_key" in raw.columns
            else [raw[key], own[key]]
        ).unique()
    prior = reads.read_prior(table, plan.prior, keys, part)
    if truncated:
        raw = transform.ordered(
            changes_t.expand_truncates(raw, key, reads.known_keys(prior, key)), key
        )
    raw = changes_t.carry_unchanged(raw, key, prior.raw)
    if own.height and applicants is not None:
        events = own_events(own, prior.good, prior.rejects, applicants, columns)
        if events.height:
            raw = transform.ordered(pl.concat([raw, events], how="diagonal_relaxed"), key)
    raw = raw.with_columns(_r=pl.int_range(pl.len(), dtype=pl.Int64))
    clean = quality.clean(raw, table)
    if applicants is not None:
        clean = with_context(clean, applicants)
    rules = quality.RULES[table]
    flags = quality.failed_flags(clean, rules)
    bad = flags.select(pl.any_horizontal(pl.all())).to_series()
    state = (
        pl.when(pl.col("_op") == "delete")
        .then(None)
        .when(bad)
        .then(pl.lit(transform.BAD))
        .otherwise(pl.lit(transform.GOOD))
    )
    rows = reads.with_image(clean.with_columns(_state=state), table)
    failed = quality.failed_rules(flags.filter(bad), rules).with_columns(_r=raw["_r"].filter(bad))
    rows = transform.drop_repeats(rows, prior.state, key)
    rows = transform.instants(rows, prior.state, key)
    out = transform.outcome(rows, prior.state, key)
    return _target_rows(table, plan, out, raw, failed)


def _target_rows(
    table: str,
    plan: _Plan,
    out: transform.Outcome,
    raw: pl.DataFrame,
    failed: pl.DataFrame,
) -> dict[str, pl.DataFrame]:
    """Shape a partition's outcome as each pending target's rows (new, and closings)."""
    key = TABLES[table].key
    columns = TABLES[table].column_names
    outputs: dict[str, pl.DataFrame] = {}
    silver_columns = [*columns, *_POSITION]
    if "current" in plan.pending:
        current = transform.to_silver_types(out.current, table).select(*silver_columns, "_op")
        outputs["current"] = (
            current.filter(pl.col("_op") == "upsert").drop("_op")
            if plan.tables["current"] is None
            else current
        )
    if "history" in plan.pending:
        versions = transform.to_silver_types(out.history, table).select(
            *silver_columns, "valid_from", "valid_to", "is_current"
        )
        outputs["history"] = _with_closings(
            versions, out.history_closings, key, exists=plan.tables["history"] is not None
        )
    if "rejected" in plan.pending:
        rejected = (
            out.rejects.select(
                "_r", *_POSITION, "_source_ts", "valid_from", "valid_to", "is_current"
            )
            .join(raw.select("_r", *columns, "_unrepresentable"), on="_r")
            .join(failed, on="_r")
            .select(
                *columns,
                *_POSITION,
                "_source_ts",
                "_unrepresentable",
                "valid_from",
                "valid_to",
                "is_current",
                "_rule",
                "_failed_rules",
                _rejected_at=pl.lit(datetime.now(UTC)).cast(pl.Datetime("us", "UTC")),
            )
        )
        outputs["rejected"] = _with_closings(
            rejected, out.reject_closings, key, exists=plan.tables["rejected"] is not None
        )
    return outputs


def _with_closings(
    rows: pl.DataFrame, closings: pl.DataFrame, key: str, *, exists: bool
) -> pl.DataFrame:
    """Return the new rows plus (for an existing table) the keys whose open row they close."""
    if not exists:
        return rows
    close = closings.select(pl.col(key).alias("_close_key"), pl.col("_close_at"))
    new = rows.with_columns(
        _close_key=pl.lit(None, pl.Int64), _close_at=pl.lit(None, pl.Datetime("us", "UTC"))
    )
    return pl.concat([new, close], how="diagonal_relaxed")


def _commit(
    storage: Storage,
    table: str,
    target: str,
    plan: _Plan,
    spool: writes.Spool,
    files: TableFiles | None,
) -> None:
    """Land one target's rows with the plan's end marks, against the version read."""
    name = target_name(table, target)
    start = plan.start
    progress = plan.end.progress(table, target)
    props = commit_properties(
        progress,
        operation=f"promote-{target}",
        metadata={
            "lakehouse.bronze_batch_from": str(start.batch if start else None),
            "lakehouse.bronze_batch_to": str(plan.end.batch),
            "lakehouse.bronze_lsn_from": str(start.changes if start else None),
            "lakehouse.bronze_lsn_to": str(plan.end.changes),
        },
    )
    failpoint_name = f"silver.{name}.mid-write"
    if files is not None:
        writes.create(files, props, failpoint_name=failpoint_name, guard=list(progress))
        return
    dt = plan.tables[target]
    assert dt is not None
    shape = spool.shape(target)
    if shape is not None and shape[0] == 0:  # nothing to write: the marks alone
        failpoint(failpoint_name)
        writes.mark(dt, props)
        return
    if target != "current" and shape is not None and shape[1] == 0:  # nothing to close
        rows = spool.reader(target, failpoint_name=failpoint_name, drop=("_close_key", "_close_at"))
        writes.append_rows(dt, rows, props)
        return
    source = spool.reader(target, failpoint_name=failpoint_name)
    key = TABLES[table].key
    if target == "current":
        writes.merge_current(dt, key, source, props)
        return
    # History closes the open version; rejects clear `is_current` on the current reject.
    writes.merge_closing(
        dt,
        key,
        source,
        props,
        open_column="t.valid_to IS NULL" if target == "history" else "t.is_current",
        closed={"valid_to": "s._close_at", "is_current": "false"},
    )
