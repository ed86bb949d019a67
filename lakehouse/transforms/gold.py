"""Gold transforms as DuckDB SQL over silver views; every feature is point-in-time correct.

The SQL reads three relations: `loan_applications` (current state), `applicants_history`
and `loan_applications_history` (SCD2, `valid_from` inclusive, `valid_to` exclusive).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import polars as pl

# Per application: its loan attributes and the applicant as they were when it was made
# (the source's foreign key keeps an applicant alive while they have applications, so the
# version found is never one that a delete had closed).
# `rate_spread` compares the rate with the mean rate of the same intent over the 30 days
# before (every application ever submitted, withdrawn ones included, so later withdrawals
# cannot change a past feature).
# The first version of every application ever submitted (withdrawn ones too).
SUBMITTED = """
SELECT application_id, loan_intent, loan_int_rate, applied_at
FROM loan_applications_history
QUALIFY row_number() OVER (PARTITION BY application_id ORDER BY valid_from) = 1
"""


def intent_rate_30d(submitted: pl.DataFrame) -> pl.DataFrame:
    """Mean rate of the same intent over the 30 days before each application.

    The window is [applied_at - 30 days, applied_at): applications made at the same
    instant are not in each other's window. Polars' rolling windows do this in one pass
    (a RANGE window frame in DuckDB costs several times more with six large partitions).
    """
    rates = (
        submitted.sort("applied_at")
        .rolling(index_column="applied_at", period="30d", closed="left", group_by="loan_intent")
        .agg(intent_rate_30d=pl.col("loan_int_rate").mean())
        .unique(["loan_intent", "applied_at"])
    )
    return submitted.join(rates, on=["loan_intent", "applied_at"], how="left").select(
        "application_id", "intent_rate_30d"
    )


# Per application: its loan attributes and the applicant as they were when it was made
# (the source's foreign key keeps an applicant alive while they have applications, so the
# version found is never one that a delete had closed). `rate_spread` compares the rate
# with `market` (intent_rate_30d above), over every application ever submitted, withdrawn
# ones included, so later withdrawals cannot change a past feature.
APPLICATION_FEATURES = """
WITH
joined AS (
    SELECT l.*, h.* EXCLUDE (applicant_id, updated_at, _batch_id, is_current),
           m.intent_rate_30d
    FROM loan_applications l
    ASOF LEFT JOIN applicants_history h
        ON l.applicant_id = h.applicant_id AND l.applied_at >= h.valid_from
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


@dataclass(frozen=True)
class Derived:
    """A relation the gold SQL reads, computed in Polars from the result of `sql`."""

    name: str
    sql: str
    transform: Callable[[pl.DataFrame], pl.DataFrame]


@dataclass(frozen=True)
class GoldTable:
    """A gold table: its SQL, the silver tables it reads, and relations derived first."""

    sql: str
    sources: tuple[str, ...]
    derived: tuple[Derived, ...] = ()
    partition_key: str | None = None
    """A column of every source such that rows of different keys never meet: a large
    build may then run one key partition at a time."""


GOLD = {
    "application_features": GoldTable(
        APPLICATION_FEATURES,
        ("loan_applications", "applicants_history", "loan_applications_history"),
        (Derived("market", SUBMITTED, intent_rate_30d),),
    ),
    "applicant_features": GoldTable(
        APPLICANT_FEATURES,
        ("applicants_history", "loan_applications_history"),
        partition_key="applicant_id",
    ),
    "approval_rate_daily": GoldTable(APPROVAL_RATE_DAILY, ("loan_applications",)),
}
