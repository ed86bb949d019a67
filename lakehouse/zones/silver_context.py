"""What a loan application's rules read about its applicant, and silver's own events.

A loan application passes `applicant_exists` only while its applicant is in silver, so
silver itself must act when an applicant comes or goes, even if the application did not
change: an application held back because its applicant had not arrived yet (a first
start, a batch that extracted the applications a moment after the applicants) is
promoted when the applicant arrives, and one whose applicant's current version fails
the rules leaves silver until the applicant is fixed. These are *silver's own events*,
made at the position of the application's current version and dated when the
applicant arrived or left; they go through the same rules and the same writes as
source changes.

The applicant tables are read at pinned versions (recorded with every loan promotion),
so a promotion that has to be finished later reads exactly what it first read.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
from deltalake import DeltaTable

from lakehouse.storage import Storage
from lakehouse.transforms import quality

KEY = "application_id"
PARENT = "applicant_id"
_TS = pl.Datetime("us", "UTC")


@dataclass(frozen=True)
class Applicants:
    """The applicant tables at pinned versions (None where a table does not exist)."""

    history: DeltaTable | None
    rejected: DeltaTable | None

    @classmethod
    def at(cls, storage: Storage, versions: tuple[tuple[str, int], ...]) -> Applicants:
        """Open the applicant tables at the recorded versions."""
        pinned = dict(versions)

        def table(name: str) -> DeltaTable | None:
            if name not in pinned:
                return None
            return storage.table("silver", name, version=pinned[name])

        return cls(table("applicants_history"), table("applicants_rejected"))

    def in_silver(self, ids: pl.Series | None = None) -> pl.DataFrame:
        """Return the applicants in silver, as their open history version says.

        (applicant_id, created_at, person_income, valid_from): the open version equals
        the applicant's current row, and says since when it holds.
        """
        if self.history is None:
            return pl.DataFrame(
                schema={
                    PARENT: pl.Int64,
                    "created_at": _TS,
                    "person_income": pl.Float64,
                    "valid_from": _TS,
                }
            )
        lazy = (
            pl.scan_delta(self.history)
            .filter(pl.col("valid_to").is_null())
            .select(PARENT, "created_at", "person_income", "valid_from")
        )
        if ids is not None:
            lazy = lazy.filter(pl.col(PARENT).is_in(ids.implode()))
        return lazy.collect()

    def left_at(self, ids: pl.Series) -> pl.DataFrame:
        """(applicant_id, _left_at): when each applicant stopped being in silver."""
        frames = [pl.DataFrame(schema={PARENT: pl.Int64, "_t": _TS})]
        if self.rejected is not None:
            frames.append(
                pl.scan_delta(self.rejected)
                .filter(pl.col("is_current") & pl.col(PARENT).is_in(ids.implode()))
                .select(PARENT, _t=pl.col("valid_from"))
                .collect()
            )
        if self.history is not None:
            frames.append(
                pl.scan_delta(self.history)
                .filter(pl.col(PARENT).is_in(ids.implode()))
                .select(PARENT, _t=pl.col("valid_to"))
                .collect()
            )
        return pl.concat(frames).group_by(PARENT).agg(_left_at=pl.col("_t").max())


def with_context(rows: pl.DataFrame, applicants: Applicants) -> pl.DataFrame:
    """Add what the rules read about each row's applicant (`quality.CONTEXT`).

    `_applicant_known`: the applicant is in silver; `_applicant_created_at`: its
    created_at; `_applicant_income_at`: its income when that is the income it had at
    the application's applied_at, i.e. when its current version started no later than
    applied_at. Otherwise (it changed since, and an earlier version may have been missed
    by batch extraction) the income is unknown and the rule is not checked: a rule that
    cannot be sure never rejects.
    """
    return join_context(rows, applicants.in_silver(rows[PARENT].drop_nulls().unique()))


def join_context(rows: pl.DataFrame, in_silver: pl.DataFrame) -> pl.DataFrame:
    """Add the rule context from the applicants in silver (`Applicants.in_silver`)."""
    known = in_silver.select(
        PARENT,
        pl.lit(True).alias(quality.APPLICANT_KNOWN),
        pl.col("created_at").alias(quality.APPLICANT_CREATED_AT),
        pl.col("person_income").alias("_income"),
        pl.col("valid_from").alias("_since"),
    )
    return (
        rows.join(known, on=PARENT, how="left", maintain_order="left")
        .with_columns(
            pl.col(quality.APPLICANT_KNOWN).fill_null(False),
            pl.when(pl.col("_since") <= pl.col("applied_at"))
            .then(pl.col("_income"))
            .alias(quality.APPLICANT_INCOME_AT),
        )
        .drop("_income", "_since")
    )


def candidates(
    loans_current: DeltaTable | None,
    loans_rejected: DeltaTable | None,
    applicants: Applicants,
) -> pl.DataFrame:
    """Applications silver must re-check because their applicant came or went.

    (application_id, applicant_id, `_reason`): `left` for an application in silver whose
    applicant no longer is; `arrived` for one held back by `applicant_exists` whose
    applicant now is; `gone` for one rejected for other rules whose applicant left too
    (its current reject then lists `applicant_exists` as well).
    """
    empty = pl.DataFrame(schema={KEY: pl.Int64, PARENT: pl.Int64, "_reason": pl.Utf8})
    known = applicants.in_silver()[PARENT]
    frames = [empty]
    if loans_current is not None:
        frames.append(
            pl.scan_delta(loans_current)
            .select(KEY, PARENT)
            .filter(~pl.col(PARENT).is_in(known.implode()))
            .with_columns(_reason=pl.lit("left"))
            .collect()
        )
    if loans_rejected is not None:
        held = pl.col("_failed_rules").list.contains(quality.APPLICANT_EXISTS)
        present = pl.col(PARENT).is_in(known.implode())
        frames.append(
            pl.scan_delta(loans_rejected)
            .filter(pl.col("is_current") & (held == present))
            .select(
                KEY,
                PARENT,
                _reason=pl.when(present).then(pl.lit("arrived")).otherwise(pl.lit("gone")),
            )
            .collect()
        )
    return pl.concat(frames, how="vertical_relaxed").unique(KEY)


def own_events(
    found: pl.DataFrame,
    current: pl.DataFrame,
    rejects: pl.DataFrame,
    applicants: Applicants,
    columns: list[str],
) -> pl.DataFrame:
    """Silver's own events for the applications in `found` (see `candidates`).

    An application that leaves carries its silver values, dated when its applicant left;
    a rejected one carries its rejected (raw) values, dated when its applicant arrived or
    left (or its own rejection, if later). All keep the position of the version they
    repeat.
    """
    frames = []
    position = ["_lsn", "_seq", "_batch_id", "_seen_at"]
    left = found.filter(pl.col("_reason") == "left")
    if left.height:
        when = applicants.left_at(left[PARENT].unique())
        frames.append(
            current.join(left.select(KEY), on=KEY)
            .join(when, on=PARENT, how="left")
            .select(*columns, *position, _source_ts=pl.col("_left_at"))
        )
    arrived = found.filter(pl.col("_reason") != "left")
    if arrived.height:
        ids = arrived[PARENT].unique()
        opened = (
            pl.concat(
                [
                    applicants.in_silver(ids).select(PARENT, _since=pl.col("valid_from")),
                    applicants.left_at(ids).select(PARENT, _since=pl.col("_left_at")),
                ]
            )
            .group_by(PARENT)
            .agg(pl.col("_since").max())
        )
        frames.append(
            rejects.join(arrived.select(KEY), on=KEY)
            .join(opened, on=PARENT, how="left")
            .select(
                *[c for c in (*columns, "_unrepresentable") if c in rejects.columns],
                *position,
                _source_ts=pl.max_horizontal("valid_from", "_since"),
            )
        )
    if not frames:
        return pl.DataFrame()
    return pl.concat(frames, how="diagonal_relaxed").with_columns(
        _op=pl.lit("upsert"),
        _stream=pl.lit(False),
        _repair=pl.lit(False),
        _synthetic=pl.lit(True),
    )
