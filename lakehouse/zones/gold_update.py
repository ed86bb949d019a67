"""Bring a gold feature table up to date by recomputing only the entities a change touches.

A full build of `application_features` or `applicant_features` computes every row again:
at 10M rows it is most of a run after a few thousand source changes. The speed layer
already recomputes exactly the rows a silver change can touch, bit for bit as the full
build does (`lakehouse.zones.gold_rows`, tested against it). Here those rows replace the
table's rows of the same entities: each data file of the table as it is read is read
once, the touched entities' rows left out, and written again beside the new rows, all in
one commit checked like a rebuild's (`TableFiles.commit`: the build's progress marks
guard it). Delta rewrites files, not rows (delta-rs writes no deletion vectors), so this
still reads and writes the whole table; what it saves is computing it.

`update` declines (the caller then builds in full) whenever it could not be exact: a
table built by another definition, inputs it cannot diff (a version vacuumed), an
`application_features` whose `applicant_features` is not at the same silver state (the
full build reads that gold table), or a change touching a large share of the table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import polars as pl
from deltalake import DeltaTable

from lakehouse.settings import Settings
from lakehouse.storage import Storage
from lakehouse.zones import gold_rows
from lakehouse.zones.datafiles import TableFiles

# Above this share of the table's rows in changed entities, a full build is as cheap.
MAX_CHANGED_SHARE = 0.2


@dataclass(frozen=True)
class _Updatable:
    key: str
    rows: Callable[[gold_rows.Rows], tuple[frozenset[int], pl.DataFrame]]
    applications: bool


UPDATABLE = {
    "applicant_features": _Updatable(
        "applicant_id", lambda r: (r.applicants, r.applicant_features), applications=False
    ),
    "application_features": _Updatable(
        "application_id", lambda r: (r.applications, r.application_features), applications=True
    ),
}
"""The gold tables the speed layer recomputes rows of, by the key those rows are complete for."""


def update(
    settings: Settings,
    storage: Storage,
    name: str,
    existing: DeltaTable,
    before: dict[str, int],
    reads: dict[str, int],
    *,
    rows_now: int,
    people_from: dict[str, int] | None,
    versions: dict[str, int],
) -> tuple[TableFiles, int] | None:
    """Write `gold.<name>`'s rows as of the silver `reads`, from `existing`'s.

    `existing` is the table as read, of the current definition, built from the silver
    data versions `before`; `versions` are the data versions now and `reads` the versions
    to read; `rows_now` is `existing`'s row count. For `application_features`,
    `people_from` is the silver data versions gold.applicant_features was built from.
    Returns the files to commit (nothing is visible yet) and how many entities were
    recomputed, or None when only a full build is exact (see the module).
    """
    spec = UPDATABLE.get(name)
    if spec is None or any(h not in before or h not in versions for h in _HISTORIES):
        return None
    # The full build reads gold.applicant_features; recomputed rows read silver.
    if spec.applications and (
        people_from is None or any(people_from.get(h) != versions[h] for h in _HISTORIES)
    ):
        return None
    silver = {t: reads[t] for t in gold_rows.SOURCES if t in reads}
    try:
        changed = gold_rows.affected(storage, before, silver)
    except LookupError:
        return None
    if len(changed.applicants) + len(changed.applications) > MAX_CHANGED_SHARE * rows_now:
        return None
    recomputed = gold_rows.rows_for(
        settings, storage, changed, silver, applications=spec.applications
    )
    entities, new = spec.rows(recomputed)
    files = TableFiles(storage, "gold", name)
    files.add(new.clear())  # first: the full build's types; the kept rows are cast to them
    drop = pl.Series(spec.key, sorted(entities), dtype=pl.Int64).implode()
    pending: pl.DataFrame | None = new
    for fragment in existing.to_pyarrow_dataset().get_fragments():
        try:
            read = pl.from_arrow(fragment.to_table())
        except Exception:  # a file vacuumed meanwhile: build whole
            return None  # what was written is never committed (vacuum removes it)
        assert isinstance(read, pl.DataFrame)
        kept = read.filter(~pl.col(spec.key).is_in(drop)).select(new.columns).cast(new.schema)
        del read
        if pending is not None:  # into the first file: as many files as before, not one more
            kept, pending = pl.concat([pending, kept]), None
        files.add(kept)
        del kept  # one file's rows at a time
    if pending is not None:
        files.add(pending)
    return files, len(entities)


_HISTORIES = ("applicants_history", "loan_applications_history")
