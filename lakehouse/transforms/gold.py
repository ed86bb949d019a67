"""Gold transforms as DuckDB SQL over silver views; every feature is point-in-time correct.

The SQL reads three relations: `loan_applications` (current state), `applicants_history`
and `loan_applications_history` (SCD2, `valid_from` inclusive, `valid_to` exclusive).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl

from lakehouse.transforms.drift import FEATURE_DRIFT_DAILY
from lakehouse.transforms.segments import running_sum, segmented_scan, starts

# Per application: its loan attributes and the applicant as they were when it was made
# (the source's foreign key keeps an applicant alive while they have applications, so the
# version found is never one that a delete had closed).
# `rate_spread` compares the rate with the mean rate of the same intent over the 30 days
# before (every application ever submitted, withdrawn ones included, so later withdrawals
# cannot change a past feature).
# The first version of every application ever submitted (withdrawn ones too): the loan as
# it was applied for. (Its `updated_at` is at or after `applied_at`, so no version is in
# force *at* `applied_at`: the first one is the loan as of its event time. When batch
# extraction first saw an application after an edit, it is the earliest version known.)
SUBMITTED_COLUMNS = (
    "application_id",
    "applicant_id",
    "loan_amnt",
    "loan_intent",
    "loan_int_rate",
    "loan_percent_income",
    "applied_at",
)
SUBMITTED = f"""
SELECT {", ".join(SUBMITTED_COLUMNS)}
FROM loan_applications_history
QUALIFY row_number() OVER (PARTITION BY application_id ORDER BY valid_from) = 1
"""


def submitted_frame(
    sources: dict[str, pl.LazyFrame], columns: tuple[str, ...] = SUBMITTED_COLUMNS
) -> pl.DataFrame:
    """Compute `SUBMITTED` in Polars: each application's first version (3x faster at 10M).

    `columns` narrows it (they must include `application_id`). A key's `valid_from`
    strictly increase in WAL order (`transforms.silver.instants`), so the first is unique.
    """
    return (
        sources["loan_applications_history"]
        .select(*columns, "valid_from")
        .sort("application_id", "valid_from")
        .unique("application_id", keep="first", maintain_order=False)
        .drop("valid_from")
        .collect()
    )


_WINDOW_US = 30 * 86_400 * 1_000_000
_RATE_UNITS = 1_000_000_000
"""Rates are summed as whole nano-percent: exact integer sums (see intent_rate_30d)."""


MARKET_COLUMNS = ("application_id", "applicant_id", "loan_intent", "loan_int_rate", "applied_at")
"""What `intent_rate_30d` reads of each submission."""


def market_frame(sources: dict[str, pl.LazyFrame]) -> pl.DataFrame:
    """Return `SUBMITTED` narrowed to what the market rates read (every submission)."""
    return submitted_frame(sources, MARKET_COLUMNS)


def intent_rate_30d(submitted: pl.DataFrame) -> pl.DataFrame:
    """Mean rate of the same intent over the 30 days before each application.

    The window is [applied_at - 30 days, applied_at): applications made at the same
    instant are not in each other's window. Per intent, on times sorted once, the window
    of every row is two binary searches into prefix sums: linear memory, where a rolling
    aggregation (or a RANGE window in DuckDB) costs several times more at 10M rows. The
    rows are sorted by time, then stably by intent, and each intent is a slice of them
    (no copy): the market reads every submission ever made, so its working set is kept
    to one narrow copy plus one intent's arrays.

    The prefix sums are of integers (each rate rounded to a billionth of a percent), so a
    window's sum is exact and depends only on the rows in it: a float prefix sum would
    change in its last bits whenever any earlier application of the intent appears (a
    backfill years back), and the speed layer recomputing a few applications
    (`zones.gold_rows`) could not match the full build to the bit. Rates in silver are
    between 1 and 36 (quality rules), so the sums fit in int64 up to ~2.5e8 applications
    per intent; a rate that is not finite counts as unknown.
    """
    # By time, then stably by an integer code of the intent: about 4x faster in Polars
    # than one sort by (intent, time, id), whether led by the code or by the string.
    ordered = (
        submitted.select(MARKET_COLUMNS)
        .with_columns(_intent=pl.col("loan_intent").cast(pl.Categorical).to_physical())
        .sort("applied_at", "application_id")
        .sort("_intent", maintain_order=True)
    )
    intent = pl.col("_intent")  # null is one intent too, as in a group by
    first = intent.ne_missing(intent.shift(1)) | (pl.int_range(pl.len()) == 0)
    bounds = np.flatnonzero(ordered.select(first).to_series().to_numpy()).tolist()
    parts = []
    for lo_row, hi_row in zip(bounds, [*bounds[1:], ordered.height][: len(bounds)], strict=True):
        group = ordered.slice(lo_row, hi_row - lo_row)
        times = group["applied_at"].dt.epoch("us").to_numpy()
        rates = group["loan_int_rate"].cast(pl.Float64)
        known = (rates.is_not_null() & rates.is_finite()).to_numpy()
        values = np.where(known, rates.fill_null(0.0).fill_nan(0.0).to_numpy(), 0.0)
        if np.abs(values).max(initial=0.0) * len(values) >= 9e18 / _RATE_UNITS:
            msg = "loan_int_rate values too large to sum exactly (expected 1-36 percent)"
            raise ValueError(msg)
        sums = np.concatenate([[0], np.cumsum(np.rint(values * _RATE_UNITS).astype(np.int64))])
        counts = np.concatenate([[0], np.cumsum(known)])
        del values, known
        hi = np.searchsorted(times, times, side="left")
        lo = np.searchsorted(times, times - _WINDOW_US, side="left")
        n = counts[hi] - counts[lo]
        mean = (sums[hi] - sums[lo]) / np.maximum(n, 1) / _RATE_UNITS
        del sums, counts, hi, lo, times
        parts.append(
            pl.DataFrame(
                {
                    "application_id": group["application_id"],
                    "applicant_id": group["applicant_id"],  # to cut it in key partitions
                    "intent_rate_30d": pl.Series(mean).set(pl.Series(n == 0), None),
                }
            )
        )
    if not parts:
        schema = {"application_id": pl.Int64, "applicant_id": pl.Int64}
        return pl.DataFrame(schema=schema | {"intent_rate_30d": pl.Float64})
    return pl.concat(parts)


# Per application: its loan attributes and the applicant as they were when it was made
# (the source's foreign key keeps an applicant alive while they have applications, so the
# version found is never one that a delete had closed). `rate_spread` compares the rate
# with `market` (intent_rate_30d above), over every application ever submitted, withdrawn
# ones included, so later withdrawals cannot change a past feature. The applicant's
# history (`application_count` ... `days_since_last_application`) is `applicant_features`
# as of `applied_at`: applications submitted strictly before this one, decisions known
# then. So one online lookup by application_id serves exactly what training saw, and a
# new loan (not in the source) gets the same features from `applicant_features` now.
# Like the applicant's attributes, the history is null when no version of the applicant
# is known at applied_at (batch extraction first saw the applicant after a later update).
# The loan's own attributes are as submitted (`submitted`: its first version), never its
# current ones: later edits of the amount or the rate must not reach a training row dated
# `applied_at`. `loan_status` is the one label-time attribute: the decision as known now.
APPLICATION_FEATURES = """
WITH
joined AS (
    SELECT s.*, l.loan_status,
           h.* EXCLUDE (applicant_id, created_at, updated_at, _batch_id, _lsn, _seq, _seen_at,
                        is_current),
           m.intent_rate_30d,
           p.event_timestamp AS history_at,
           p.application_count, p.approved_count, p.rejected_count, p.mean_loan_amnt,
           p.days_since_last_application AS days_since_last_at_history
    FROM loan_applications l
    JOIN submitted s USING (application_id)
    ASOF LEFT JOIN applicants_history h
        ON s.applicant_id = h.applicant_id AND s.applied_at >= h.valid_from
    ASOF LEFT JOIN applicant_features p
        ON s.applicant_id = p.applicant_id AND s.applied_at >= p.event_timestamp
    LEFT JOIN market m USING (application_id)
)
SELECT
    application_id,
    applicant_id,
    applied_at AS event_timestamp,
    applied_at,
    loan_amnt,
    loan_intent,
    loan_int_rate,
    loan_percent_income,
    person_age,
    person_gender,
    person_education,
    person_income,
    person_emp_exp,
    person_home_ownership,
    cb_person_cred_hist_length,
    credit_score,
    previous_loan_defaults_on_file,
    loan_amnt / nullif(person_income, 0) AS loan_to_income,
    loan_int_rate - intent_rate_30d AS rate_spread,
    CASE
        WHEN credit_score IS NULL THEN NULL
        WHEN credit_score < 580 THEN 'poor'
        WHEN credit_score < 670 THEN 'fair'
        WHEN credit_score < 740 THEN 'good'
        WHEN credit_score < 800 THEN 'very_good'
        ELSE 'exceptional'
    END AS credit_score_band,
    application_count::BIGINT AS application_count,
    approved_count::BIGINT AS approved_count,
    rejected_count::BIGINT AS rejected_count,
    mean_loan_amnt,
    -- Microseconds apart, not `epoch(applied_at - history_at)`: subtracting two
    -- TIMESTAMPTZ goes through ICU's calendar, 50x slower (4 s per million rows).
    days_since_last_at_history + (epoch_us(applied_at) - epoch_us(history_at)) / 86400e6
        AS days_since_last_application,
    loan_status
FROM joined
"""

# Per applicant, one row at each instant its features change. With t an event time:
#   attributes          the applicant's version valid at t (valid_from <= t < valid_to);
#   application_count   applications submitted strictly before t (withdrawn ones too);
#   approved/rejected   of those, decided so as known at t (from application history);
#   mean_loan_amnt      mean amount of those applications;
#   days_since_last_application   t minus the latest of their `applied_at`.
# An application submitted at s counts from s + 1µs; a version stamped v counts from v.
# So a lookup "as of t" (latest row with event_timestamp <= t) never sees an application
# made at t or later, nor a decision made after t: no leakage into training rows.
APPLICANT_FEATURES = """
WITH versions AS (
    SELECT applicant_id, applied_at, loan_amnt, loan_status, valid_from,
           lag(loan_amnt) OVER w AS prev_amnt,
           lag(loan_status) OVER w AS prev_status,
           row_number() OVER w AS n
    FROM loan_applications_history
    WINDOW w AS (PARTITION BY application_id ORDER BY valid_from)
),
deltas AS (
    SELECT applicant_id,
           greatest(valid_from, applied_at + INTERVAL 1 MICROSECOND) AS ts,
           CASE WHEN n = 1 THEN 1 ELSE 0 END AS d_count,
           loan_amnt - coalesce(prev_amnt, 0) AS d_amount,
           coalesce((loan_status = 1)::INT, 0) - coalesce((prev_status = 1)::INT, 0) AS d_approved,
           coalesce((loan_status = 0)::INT, 0) - coalesce((prev_status = 0)::INT, 0) AS d_rejected,
           CASE WHEN n = 1 THEN applied_at END AS submitted_at
    FROM versions
),
-- One stream per applicant: application deltas and applicant versions, in time order.
-- A single window pass then gives, at every instant, the running aggregates and the
-- version in force (the last one started), without a join per feature.
stream AS (
    SELECT * FROM deltas
    UNION ALL BY NAME
    SELECT applicant_id, valid_from AS ts, person_age, person_gender, person_education,
           person_income, person_emp_exp, person_home_ownership, cb_person_cred_hist_length,
           credit_score, previous_loan_defaults_on_file,
           coalesce(valid_to, 'infinity'::TIMESTAMPTZ) AS version_end
    FROM applicants_history
),
state AS (
    SELECT applicant_id, ts,
           sum(d_count) OVER w AS application_count,
           sum(d_amount) OVER w AS amount_sum,
           sum(d_approved) OVER w AS approved_count,
           sum(d_rejected) OVER w AS rejected_count,
           max(submitted_at) OVER w AS last_applied_at,
           last_value(person_age IGNORE NULLS) OVER w AS person_age,
           last_value(person_gender IGNORE NULLS) OVER w AS person_gender,
           last_value(person_education IGNORE NULLS) OVER w AS person_education,
           last_value(person_income IGNORE NULLS) OVER w AS person_income,
           last_value(person_emp_exp IGNORE NULLS) OVER w AS person_emp_exp,
           last_value(person_home_ownership IGNORE NULLS) OVER w AS person_home_ownership,
           last_value(cb_person_cred_hist_length IGNORE NULLS) OVER w AS cb_person_cred_hist_length,
           last_value(credit_score IGNORE NULLS) OVER w AS credit_score,
           last_value(previous_loan_defaults_on_file IGNORE NULLS) OVER w
               AS previous_loan_defaults_on_file,
           last_value(version_end IGNORE NULLS) OVER w AS version_end
    FROM stream
    WINDOW w AS (PARTITION BY applicant_id ORDER BY ts
                 RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
),
joined AS (
    -- Rows at the same instant are peers with equal values: keep one. No version in
    -- force (before the first, or after a delete) means no row.
    SELECT DISTINCT ON (applicant_id, ts) *
    FROM state
    WHERE version_end > ts
)
SELECT
    applicant_id,
    ts AS event_timestamp,
    person_age,
    person_gender,
    person_education,
    person_income,
    person_emp_exp,
    person_home_ownership,
    cb_person_cred_hist_length,
    credit_score,
    previous_loan_defaults_on_file,
    coalesce(application_count, 0)::BIGINT AS application_count,
    coalesce(approved_count, 0)::BIGINT AS approved_count,
    coalesce(rejected_count, 0)::BIGINT AS rejected_count,
    amount_sum / nullif(application_count, 0) AS mean_loan_amnt,
    epoch(ts - last_applied_at) / 86400.0 AS days_since_last_application
FROM joined
"""

# Analytics mart: per day (UTC) of application and loan intent, how many were decided
# and approved, over the applications that currently exist.
APPROVAL_RATE_DAILY = """
SELECT
    CAST(applied_at AS DATE) AS day,
    loan_intent,
    count(*) AS applications,
    count(loan_status) AS decided,
    count(*) FILTER (WHERE loan_status = 1) AS approved,
    count(*) FILTER (WHERE loan_status = 1) / nullif(count(loan_status), 0) AS approval_rate,
    max(applied_at) AS event_timestamp
FROM loan_applications
GROUP BY ALL
ORDER BY day, loan_intent
"""


# The production loop's marts, over the API's inference log (`bronze.predictions`,
# `lakehouse.ml.monitor.inference_log`): each prediction made for an application, joined
# to that application's decision once it is in silver (from the batch or the stream).
# A prediction for a loan not in the source (by applicant and loan attributes) has no
# application to wait for and no outcome. A withdrawn application has none either.
PREDICTION_OUTCOMES = """
SELECT
    p.request_id,
    p.served_at,
    CAST(p.served_at AS DATE) AS day,
    p.model_version,
    p.application_id,
    p.probability,
    p.decision,
    p.threshold,
    a.loan_status = 1 AS approved,
    (p.decision = 'approve') = (a.loan_status = 1) AS correct,
    p.served_at AS event_timestamp
FROM predictions AS p
JOIN loan_applications AS a USING (application_id)
WHERE a.loan_status IS NOT NULL
ORDER BY p.served_at, p.request_id
"""

# Per model version and day of serving: the predictions made (all of them), and how those
# with an outcome so far scored (null until the first outcome). ROC
# AUC from ranks (the Mann-Whitney statistic, tied probabilities at their mean rank; null
# without both outcomes), the Brier score, and calibration in ten bins of predicted
# probability ([0, 0.1), ..., [0.9, 1]): per bin the mean prediction, the observed
# approval rate and the count, as lists in bin order (null where a bin is empty).
MODEL_QUALITY_DAILY = """
WITH served AS (
    SELECT model_version, CAST(served_at AS DATE) AS day, count(*) AS predictions
    FROM predictions
    GROUP BY ALL
),
ranked AS (
    SELECT
        model_version, day, probability, decision, approved::INTEGER AS y,
        rank() OVER (PARTITION BY model_version, day ORDER BY probability)
            + (count(*) OVER (PARTITION BY model_version, day, probability) - 1) / 2.0
            AS r,
        least(floor(probability * 10), 9)::INTEGER AS bin
    FROM prediction_outcomes
),
quality AS (
    SELECT
        model_version, day,
        count(*) AS with_outcome,
        sum(y) AS approved,
        CASE WHEN sum(y) > 0 AND sum(y) < count(*) THEN
            (sum(r * y) - sum(y) * (sum(y) + 1) / 2.0) / (sum(y) * (count(*) - sum(y)))
        END AS roc_auc,
        avg((probability - y) * (probability - y)) AS brier,
        avg((decision = 'approve')::INTEGER) AS approval_rate_predicted,
        avg(y) AS approval_rate_actual
    FROM ranked
    GROUP BY ALL
),
bins AS (
    SELECT model_version, day, bin,
           avg(probability) AS predicted, avg(y) AS observed, count(*) AS n
    FROM ranked
    GROUP BY ALL
),
calibration AS (
    SELECT
        q.model_version, q.day,
        list(b.predicted ORDER BY g.bin) AS calibration_predicted,
        list(b.observed ORDER BY g.bin) AS calibration_observed,
        list(coalesce(b.n, 0) ORDER BY g.bin) AS calibration_count
    FROM quality AS q
    CROSS JOIN range(10) AS g(bin)
    LEFT JOIN bins AS b
        ON b.model_version = q.model_version AND b.day = q.day AND b.bin = g.bin
    GROUP BY ALL
)
SELECT
    s.model_version, s.day, s.predictions,
    q.with_outcome, q.approved, q.roc_auc, q.brier,
    q.approval_rate_predicted, q.approval_rate_actual,
    c.calibration_predicted, c.calibration_observed, c.calibration_count,
    CAST(s.day AS TIMESTAMPTZ) AS event_timestamp
FROM served AS s
LEFT JOIN quality AS q USING (model_version, day)
LEFT JOIN calibration AS c USING (model_version, day)
ORDER BY s.model_version, s.day
"""


@dataclass(frozen=True)
class Derived:
    """A relation the gold SQL reads, computed in Polars from the result of `sql`."""

    name: str
    sql: str
    transform: Callable[[pl.DataFrame], pl.DataFrame]
    frame: Callable[[dict[str, pl.LazyFrame]], pl.DataFrame] | None = None
    """The result of `sql` computed with Polars from the sources (used when set; `sql`
    stays as the specification the tests hold it to)."""
    partition_via: tuple[str, str, str] | None = None
    """(source, column, derived relation), with `frame`: in a build by key partitions,
    the relation is computed in each part by `frame` from that source's rows whose
    `column` the other relation's part holds, so no part holds it whole. Unset: computed
    once over every row, then cut (a market-wide aggregate needs every row)."""


def _as_is(frame: pl.DataFrame) -> pl.DataFrame:
    return frame


@dataclass(frozen=True)
class GoldTable:
    """A gold table: its SQL, the silver tables it reads, and relations derived first."""

    sql: str
    sources: tuple[str, ...]
    """Tables read, at pinned versions: silver by name, another gold table as `gold.name`."""
    derived: tuple[Derived, ...] = ()
    partition_key: str | None = None
    """A column of every source such that rows of different keys never meet: a large
    build may then run one key partition at a time."""
    frame: Callable[[dict[str, pl.LazyFrame]], pl.DataFrame] | None = None
    """The same table computed with Polars from the sources (used instead of `sql` when
    set; `sql` stays as the specification the tests hold it to)."""
    references: str | None = None
    """A relation `sql` reads that is not a lake table (the drift references, from the
    model registry), registered by the side that provides it in
    `lakehouse.zones.gold.REFERENCES` under this name."""
    partition_whole: tuple[tuple[str, str], ...] = ()
    """(source, column) of a Polars-built table: in a key partition, that source's rows
    also include every row sharing `column` with one of the part's rows, and the result
    is cut to the part's keys. An application's versions then stay together when one of
    them moved it to an applicant of another part (its running counts need them all)."""
    partition_via: tuple[tuple[str, str, str], ...] = ()
    """(source, column, derived relation): in a key partition, that source's rows are
    those whose `column` the relation's partition holds, not those of its own key. A
    loan is joined by its applicant as submitted (`submitted`); its current applicant
    may differ (an application moved to another applicant) and fall in another part."""


_ATTRIBUTES = [
    "person_age",
    "person_gender",
    "person_education",
    "person_income",
    "person_emp_exp",
    "person_home_ownership",
    "cb_person_cred_hist_length",
    "credit_score",
    "previous_loan_defaults_on_file",
]


_NEVER = pl.datetime(1, 1, 1, time_zone="UTC")
_PER_DAY_US = 1 / 86_400_000_000


def with_linked(scan: pl.LazyFrame, selected: pl.Expr, column: str) -> pl.LazyFrame:
    """Return the rows `selected` picks, and every row sharing `column` with one of them.

    An application moved to another applicant has versions under both: the running
    counts of either (`applicant_features_frame`) need all of its versions, in order.
    The linking values are collected first, so the filter reaches the scan.
    """
    values = scan.filter(selected).select(column).unique().collect()[column]
    return scan.filter(pl.col(column).is_in(values.implode()))


def applicant_features_frame(sources: dict[str, pl.LazyFrame]) -> pl.DataFrame:
    """`APPLICANT_FEATURES` in Polars: the same stream of deltas and versions, one sort.

    Sorting once by (applicant, time) turns every per-applicant window into a global
    running operation corrected at each applicant's first row, which avoids a window
    over millions of tiny partitions.
    """
    versions = (
        sources["loan_applications_history"]
        .select(
            "application_id", "applicant_id", "applied_at", "loan_amnt", "loan_status", "valid_from"
        )
        .sort("application_id", "valid_from")
        .with_columns(first=starts("application_id"))
    )
    approved = (pl.col("loan_status") == 1).cast(pl.Int64).fill_null(0)
    rejected = (pl.col("loan_status") == 0).cast(pl.Int64).fill_null(0)
    deltas = versions.select(
        "applicant_id",
        ts=pl.max_horizontal("valid_from", pl.col("applied_at") + pl.duration(microseconds=1)),
        d_count=pl.col("first").cast(pl.Int64),
        d_amount=pl.col("loan_amnt")
        - pl.when("first").then(0.0).otherwise(pl.col("loan_amnt").shift(1)),
        d_approved=approved - pl.when("first").then(0).otherwise(approved.shift(1)),
        d_rejected=rejected - pl.when("first").then(0).otherwise(rejected.shift(1)),
        submitted_at=pl.when("first").then(pl.col("applied_at")),
    )
    people = sources["applicants_history"].select(
        "applicant_id",
        pl.col("valid_from").alias("ts"),
        *_ATTRIBUTES,
        version_end=pl.col("valid_to").fill_null(pl.datetime(9999, 12, 31, time_zone="UTC")),
    )
    stream = (
        pl.concat([deltas, people], how="diagonal_relaxed")
        .sort("applicant_id", "ts")
        .with_columns(pl.col("d_count", "d_amount", "d_approved", "d_rejected").fill_null(0))
    )
    # The version in force: the last version row so far, if it is this applicant's own.
    is_version = pl.col("version_end").is_not_null()
    last_version = pl.when(is_version).then(pl.int_range(pl.len())).forward_fill()
    own = pl.col("applicant_id").gather(last_version.fill_null(0)) == pl.col("applicant_id")
    rows = stream.with_columns(
        pl.col("submitted_at").fill_null(_NEVER).alias("last_applied_at"),
        pl.col("d_amount").alias("amount_sum"),
    ).collect()
    # Floats: a segmented scan (a global running sum would lose precision).
    rows = segmented_scan(rows, "amount_sum", "applicant_id", "sum")
    rows = segmented_scan(rows, "last_applied_at", "applicant_id", "max")
    state = (
        rows.lazy()
        .with_columns(
            application_count=running_sum("d_count", "applicant_id"),
            approved_count=running_sum("d_approved", "applicant_id"),
            rejected_count=running_sum("d_rejected", "applicant_id"),
            _own=own & last_version.is_not_null(),
            **{
                c: pl.col(c).gather(last_version.fill_null(0))
                for c in [*_ATTRIBUTES, "version_end"]
            },
        )
        .with_columns(
            [pl.when("_own").then(pl.col(c)).alias(c) for c in [*_ATTRIBUTES, "version_end"]]
        )
    )
    # Rows at one instant are peers (SQL's RANGE frame): the last of them holds them all.
    joined = state.filter(
        (pl.col("applicant_id") != pl.col("applicant_id").shift(-1))
        | (pl.col("ts") != pl.col("ts").shift(-1))
        | pl.col("ts").shift(-1).is_null()
    ).filter(pl.col("version_end") > pl.col("ts"))
    count = pl.col("application_count")
    return joined.select(
        "applicant_id",
        pl.col("ts").alias("event_timestamp"),
        *_ATTRIBUTES,
        count.cast(pl.Int64),
        pl.col("approved_count").cast(pl.Int64),
        pl.col("rejected_count").cast(pl.Int64),
        mean_loan_amnt=pl.when(count > 0).then(pl.col("amount_sum") / count),
        # A product, not `/ 86_400_000_000`: Polars divides a chunk by a scalar as a
        # product with the reciprocal but a one-row chunk by true division, so a quotient
        # would depend on the chunk layout (the speed layer's subset vs the full build).
        days_since_last_application=pl.when(pl.col("last_applied_at") != _NEVER).then(
            (pl.col("ts") - pl.col("last_applied_at")).dt.total_microseconds() * _PER_DAY_US
        ),
    ).collect()


GOLD = {
    "applicant_features": GoldTable(
        APPLICANT_FEATURES,
        ("applicants_history", "loan_applications_history"),
        partition_key="applicant_id",
        frame=applicant_features_frame,
        partition_whole=(("loan_applications_history", "application_id"),),
    ),
    "application_features": GoldTable(
        APPLICATION_FEATURES,
        (
            "loan_applications",
            "applicants_history",
            "loan_applications_history",
            "gold.applicant_features",
        ),
        (
            Derived("market", SUBMITTED, intent_rate_30d, frame=market_frame),
            # A part's submissions are those the market cut to it (by the applicant of
            # each first version, which later versions may move to another applicant):
            # every version of those applications, whichever applicant it names.
            Derived(
                "submitted",
                SUBMITTED,
                _as_is,
                frame=submitted_frame,
                partition_via=("loan_applications_history", "application_id", "market"),
            ),
        ),
        partition_key="applicant_id",
        partition_via=(("loan_applications", "application_id", "submitted"),),
    ),
    "approval_rate_daily": GoldTable(APPROVAL_RATE_DAILY, ("loan_applications",)),
}
"""The gold tables built from silver alone."""


MONITORING = {
    "prediction_outcomes": GoldTable(
        PREDICTION_OUTCOMES, ("bronze.predictions", "loan_applications")
    ),
    "model_quality_daily": GoldTable(
        MODEL_QUALITY_DAILY, ("bronze.predictions", "gold.prediction_outcomes")
    ),
    "feature_drift_daily": GoldTable(
        FEATURE_DRIFT_DAILY, ("bronze.predictions",), references="drift_reference"
    ),
}
"""Marts over the API's inference log: built with the ML side of the pipeline, as the same
gold tables (pinned input versions recorded in the commit, one writer at a time)."""

ALL_GOLD = {**GOLD, **MONITORING}
