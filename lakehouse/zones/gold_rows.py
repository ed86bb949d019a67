"""Gold feature rows of a few entities, exactly as a full gold build computes them.

The speed layer (`lakehouse stream --promote`) keeps online features fresh without
rebuilding gold: after silver changes, it asks which applicants and applications a
change can touch (`affected`) and recomputes their rows here, with the same transforms
over the same silver versions (`transforms.gold`). Gold itself stays the batch's; the next
build produces the same rows (tested value for value).

What a change touches, and why it is all recomputed:
- an applicant's `applicant_features` rows: every row of an applicant with a changed
  version or a changed application (running counts, their attributes);
- the features of every application of those applicants (they are taken as of each
  application's `applied_at`, and a late change can fall before it);
- `rate_spread` of applications of the same intent submitted in the 30 days after a new
  submission (its market rate window): normally none, since a new application is the
  latest; a backfilled one reaches them.
The market rates are computed over every submission, as the full build does, so the
floating-point sums are the same to the last bit.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from datetime import timedelta

import duckdb
import polars as pl

from lakehouse import duck
from lakehouse.errors import first_line
from lakehouse.settings import Settings
from lakehouse.storage import Storage
from lakehouse.transforms.gold import (
    GOLD,
    SUBMITTED_COLUMNS,
    applicant_features_frame,
    intent_rate_30d,
    submitted_frame,
    with_linked,
)

SOURCES = ("applicants_history", "loan_applications_history", "loan_applications")
"""The silver tables the feature tables are built from."""

_WINDOW = timedelta(days=30)

WATERMARK_SOURCES = {
    "application_features": SOURCES,
    "applicant_features": ("applicants_history", "loan_applications_history"),
}


def watermark(data_versions: dict[str, int], gold_table: str) -> int | None:
    """Return the silver state rows of a gold table come from, as one number.

    The sum of the data versions of the silver tables the table reads: each grows with
    every commit that changes its data, so rows from a later state carry a larger number
    (the online store keeps the newer of two writes, `ml.online.tables`). None if a
    version is unknown.
    """
    names = WATERMARK_SOURCES[gold_table]
    if any(name not in data_versions for name in names):
        return None
    return sum(data_versions[name] for name in names)


@dataclass(frozen=True)
class Affected:
    """Entities a silver change may touch, before widening (see the module)."""

    applicants: frozenset[int]
    applications: frozenset[int]
    submitted: frozenset[int]
    """Applications whose first version (their submission) is new."""


@dataclass(frozen=True)
class Rows:
    """The recomputed rows, and the entities they are complete for."""

    applicants: frozenset[int]
    """Every `applicant_features` row of these applicants is in `applicant_features`."""
    applications: frozenset[int]
    """Every `application_features` row of these applications is in `application_features`."""
    applicant_features: pl.DataFrame
    application_features: pl.DataFrame


def _scans(storage: Storage, versions: dict[str, int]) -> dict[str, pl.LazyFrame]:
    return {
        name: pl.scan_delta(storage.table("silver", name, version=versions[name]))
        for name in SOURCES
        if name in versions
    }


# The last few diffs, by what they compared: both feature tables of one run need the same.
_DIFFS: dict[tuple[object, ...], Affected] = {}
_KEEP_DIFFS = 4
_DIFFS_LOCK = threading.Lock()


def affected(
    storage: Storage,
    before: dict[str, int],
    now: dict[str, int],
) -> Affected:
    """Return the entities with a silver history row added, changed or removed in between.

    Kept for the next call that compares the same versions of the same tables (a table
    version of one table id never changes): a gold run updates `applicant_features` and
    then `application_features` from the same two states, and the diff reads both
    histories whole, twice.
    """
    key = tuple(
        (
            storage.uri("silver", name),
            storage.table("silver", name, version=now[name]).metadata().id,
            before[name],
            now[name],
        )
        for name in _DIFF_COLUMNS
    )
    with _DIFFS_LOCK:
        found = _DIFFS.get(key)
    if found is None:
        found = _affected(storage, before, now)
        with _DIFFS_LOCK:  # builders may run in threads (Luigi workers, tests)
            while len(_DIFFS) >= _KEEP_DIFFS:
                _DIFFS.pop(next(iter(_DIFFS)))
            _DIFFS[key] = found
    return found


def _affected(
    storage: Storage,
    before: dict[str, int],
    now: dict[str, int],
) -> Affected:
    """Compute `affected`.

    Compares the two versions of each history table on its keys and validity (a new
    version, a closed one, a delete): the rows of either version the other lacks, nulls
    equal, as SQL's EXCEPT both ways. In Polars over the snapshots the caller may have
    opened already (`opened_once`): DuckDB's `delta_scan` opened each table again, four
    times per table, and cost a speed-layer cycle 0.2 s. Raises `LookupError` when
    `before` can no longer be read (vacuumed).
    """
    applicants: set[int] = set()
    applications: set[int] = set()
    submitted: set[int] = set()
    for name in ("applicants_history", "loan_applications_history"):
        if before[name] == now[name]:
            continue
        columns = list(_DIFF_COLUMNS[name])
        new = pl.scan_delta(storage.table("silver", name, version=now[name]))
        try:
            old = pl.scan_delta(storage.table("silver", name, version=before[name]))
            old_rows = old.select(columns).collect()
        except Exception as exc:  # gone: vacuumed, or its log cleaned up
            msg = f"silver.{name} version {before[name]}: {first_line(exc)}"
            raise LookupError(msg) from None
        new_rows = new.select(columns).collect()
        differ = pl.concat(
            [
                new_rows.join(old_rows, on=columns, how="anti", nulls_equal=True),
                old_rows.join(new_rows, on=columns, how="anti", nulls_equal=True),
            ]
        )
        applicants.update(differ["applicant_id"].drop_nulls().to_list())
        if name == "applicants_history":
            continue
        applications.update(differ["application_id"].drop_nulls().to_list())
        # A first version (the submission) is new when nothing of the application in the
        # newer version starts before it (or the application is gone).
        firsts = new_rows.group_by("application_id").agg(_first=pl.col("valid_from").min())
        new_first = differ.join(firsts, on="application_id", how="left").filter(
            pl.col("_first").is_null() | (pl.col("valid_from") <= pl.col("_first"))
        )
        submitted.update(new_first["application_id"].drop_nulls().to_list())
    return Affected(frozenset(applicants), frozenset(applications), frozenset(submitted))


_DIFF_COLUMNS = {
    "applicants_history": ("applicant_id", "valid_from", "valid_to"),
    "loan_applications_history": ("applicant_id", "application_id", "valid_from", "valid_to"),
}


def rows_for(
    settings: Settings,
    storage: Storage,
    changed: Affected,
    versions: dict[str, int],
    con: duckdb.DuckDBPyConnection | None = None,
    *,
    applications: bool = True,
) -> Rows:
    """Recompute the gold feature rows of everything `changed` can touch (silver `versions`).

    Each silver table is read once: the application history whole (the market rates need
    every submission), in the columns the transforms use; the applicants' history and the
    current applications only for the entities concerned. Without `applications`, only
    the `applicant_features` rows (`versions` need not name `loan_applications`).
    """
    scans = _scans(storage, versions)
    used = [*SUBMITTED_COLUMNS, "loan_status", "valid_from"]
    scans["loan_applications_history"] = (
        scans["loan_applications_history"].select(used).collect().lazy()
    )
    history = scans["loan_applications_history"]
    # Widen: the applicants of changed applications, all their applications, and the
    # applications in the 30-day market window after a new submission.
    applicants = set(changed.applicants) | set(
        history.filter(pl.col("application_id").is_in(list(changed.applications)))
        .select("applicant_id")
        .unique()
        .collect()["applicant_id"]
        .to_list()
    )
    wanted: set[int] = set()
    inputs = applicants  # an applicant's rows read only its own versions and applications
    if applications:
        submitted = submitted_frame(scans)  # every submission: the market rates need them all
        wanted = set(changed.applications) | set(
            submitted.filter(pl.col("applicant_id").is_in(list(applicants)))["application_id"]
        )
        new = submitted.filter(pl.col("application_id").is_in(list(changed.submitted)))
        wanted |= _in_market_windows(submitted, new)
        # Applicants whose history the widened applications are joined with (unchanged
        # ones: their rows are inputs only).
        inputs = applicants | set(
            submitted.filter(pl.col("application_id").is_in(list(wanted)))["applicant_id"]
        )
    scans["applicants_history"] = (
        scans["applicants_history"].filter(pl.col("applicant_id").is_in(list(inputs))).collect()
    ).lazy()
    # As a partitioned full build does (`GoldTable.partition_whole`): every version of
    # an application one of these applicants ever held, the rows cut to them after.
    mine = pl.col("applicant_id").is_in(list(inputs))
    people = applicant_features_frame(
        {
            "applicants_history": scans["applicants_history"].filter(mine),
            "loan_applications_history": with_linked(
                scans["loan_applications_history"], mine, "application_id"
            ),
        }
    ).filter(mine)
    apps = (
        _application_features(scans, submitted, people, wanted, inputs, settings, storage, con)
        if applications
        else pl.DataFrame()
    )
    return Rows(
        frozenset(applicants),
        frozenset(wanted),
        people.filter(pl.col("applicant_id").is_in(list(applicants))),
        apps,
    )


def _in_market_windows(submitted: pl.DataFrame, new: pl.DataFrame) -> set[int]:
    """Return the submissions within 30 days after one of `new`'s, of the same intent.

    Their market rate (`intent_rate_30d`) counts the new submission. One as-of join, not
    a scan per new submission (that was most of a refresh's time at 200 changes/s): each
    submission is matched with the latest new one of its intent strictly before it,
    which is in the window if any is.
    """
    keys = ["loan_intent", "applied_at"]
    starts = (
        new.select(keys)
        .drop_nulls()
        .unique()
        .rename({"applied_at": "window_start"})
        .sort("window_start")
    )
    if starts.is_empty():
        return set()
    matched = (
        submitted.select("application_id", *keys)
        .drop_nulls(keys)
        .sort("applied_at")
        .join_asof(
            starts,
            left_on="applied_at",
            right_on="window_start",
            by="loan_intent",
            strategy="backward",
            allow_exact_matches=False,
            check_sortedness=False,  # sorted by time above, so within each intent too
        )
    )
    inside = matched.filter(pl.col("applied_at") <= pl.col("window_start") + _WINDOW)
    return set(inside["application_id"].to_list())


def _application_features(
    scans: dict[str, pl.LazyFrame],
    submitted: pl.DataFrame,
    people: pl.DataFrame,
    applications: set[int],
    applicants: set[int],
    settings: Settings,
    storage: Storage,
    con: duckdb.DuckDBPyConnection | None,
) -> pl.DataFrame:
    """Run gold's `application_features` SQL over the rows these applications read."""
    from lakehouse.zones.gold import _frame, _normalise

    ids = list(applications)
    relations = {
        "loan_applications": scans["loan_applications"]
        .filter(pl.col("application_id").is_in(ids))
        .collect(),
        "applicants_history": scans["applicants_history"]
        .filter(pl.col("applicant_id").is_in(list(applicants)))
        .collect(),
        "applicant_features": people,
        "submitted": submitted.filter(pl.col("application_id").is_in(ids)),
        "market": intent_rate_30d(submitted).filter(pl.col("application_id").is_in(ids)),
    }
    own = con is None
    con = duck.connect(settings, storage) if con is None else con
    try:
        for name, frame in relations.items():
            con.register(name, frame.to_arrow())
        reader = _normalise(con.execute(GOLD["application_features"].sql).to_arrow_reader())
        result = _frame(reader.read_all())
    finally:
        for name in relations:
            con.unregister(name)
        if own:
            con.close()
    return result
