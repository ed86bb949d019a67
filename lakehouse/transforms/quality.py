"""Data-quality rules for silver: each is a named Polars expression that is true for a good row.

The rules are what a data engineer at a lender would check before a row may feed features
and a credit model: the value is possible at all (a key of at least 1, an age of 18 to
100, a rate a lender may charge), consistent with the row's other values (experience and
credit history fit the age, the loan's share of income fits amount and income), and
something every later stage can hold (timestamps from 2000 to 2099; Feast and pandas hold
years 1678 to 2261 only). A null fails every rule that reads it. Each rule is documented
in the README with its reason and tested at its boundaries (`tests/transforms`).

`clean` normalises only what is unambiguous: ASCII whitespace around text and ASCII case
of the categories. `CLEAN_SQL` is the same normalisation in SQL, which `lakehouse verify`
runs in Postgres and in DuckDB; a property test holds the two to each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import polars as pl

GENDERS = ("female", "male")
EDUCATION = ("High School", "Associate", "Bachelor", "Master", "Doctorate")
HOME_OWNERSHIP = ("RENT", "OWN", "MORTGAGE", "OTHER")
INTENTS = (
    "PERSONAL",
    "EDUCATION",
    "MEDICAL",
    "VENTURE",
    "HOMEIMPROVEMENT",
    "DEBTCONSOLIDATION",
)
YES_NO = ("Yes", "No")

# Every timestamp in silver lies in [EARLIEST, LATEST): the lender's records start in 2000,
# and later stages (pandas' nanosecond timestamps in Feast) hold nothing past 2262.
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(2100, 1, 1, tzinfo=UTC)
# loan_percent_income is loan_amnt / person_income rounded to 2 decimals: allow the
# rounding (0.005) and a little more.
PERCENT_TOLERANCE = 0.01
# ASCII whitespace: what `clean` trims (Unicode spaces are data, and fail the categories).
WHITESPACE = " \t\n\r\x0b\x0c"
_UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_LOWER = "abcdefghijklmnopqrstuvwxyz"

# When the lakehouse saw a version (its commit, or its extraction): `updated_at` may be
# ahead of it by a clock's drift at most.
SEEN_AT = "_seen_at"
CLOCK_DRIFT = timedelta(minutes=5)
# Columns added to loan rows before validation: what silver knows of the applicant.
APPLICANT_KNOWN = "_applicant_known"
APPLICANT_CREATED_AT = "_applicant_created_at"
APPLICANT_INCOME_AT = "_applicant_income_at"
CONTEXT = (APPLICANT_KNOWN, APPLICANT_CREATED_AT, APPLICANT_INCOME_AT)


@dataclass(frozen=True)
class Rule:
    """A named check; `check` is true for rows that pass (null counts as failing)."""

    name: str
    description: str
    check: pl.Expr


def _age() -> pl.Expr:
    """person_age in 64 bits: `age - 14` must not wrap around at the integer's edge."""
    return pl.col("person_age").cast(pl.Int64)


def _between(col: str, low: float, high: float) -> pl.Expr:
    return pl.col(col).is_between(low, high)


def _representable(col: str) -> Rule:
    return Rule(
        f"{col}_representable",
        f"{col} is a timestamp Arrow and Delta can hold (not infinity, BC, or past 9999)",
        ~pl.col("_unrepresentable").str.contains(f'"{col}":', literal=True).fill_null(False),
    )


def _in_years(col: str) -> Rule:
    return Rule(
        f"{col}_range",
        f"{col} is from {EARLIEST:%Y-%m-%d} to before {LATEST:%Y-%m-%d}",
        (pl.col(col) >= EARLIEST) & (pl.col(col) < LATEST),
    )


def _not_future() -> Rule:
    return Rule(
        "updated_at_not_future",
        f"updated_at is no later than {CLOCK_DRIFT.seconds // 60} minutes after the lakehouse "
        "saw the version (its commit, or its extraction)",
        pl.col(SEEN_AT).is_null() | (pl.col("updated_at") <= pl.col(SEEN_AT) + CLOCK_DRIFT),
    )


def _key(col: str) -> Rule:
    return Rule("key_positive", f"{col} is at least 1", pl.col(col) >= 1)


APPLICANT_RULES: tuple[Rule, ...] = (
    _representable("created_at"),
    _representable("updated_at"),
    _key("applicant_id"),
    Rule("age_range", "person_age is between 18 and 100", _between("person_age", 18, 100)),
    Rule(
        "experience_vs_age",
        "person_emp_exp is between 0 and person_age - 14",
        (pl.col("person_emp_exp") >= 0) & (pl.col("person_emp_exp") <= _age() - 14),
    ),
    Rule(
        "income_range",
        "person_income is between 1,000 and 10,000,000 a year",
        _between("person_income", 1_000, 10_000_000),
    ),
    Rule(
        "credit_history_range",
        "cb_person_cred_hist_length is between 0 and 80",
        _between("cb_person_cred_hist_length", 0, 80),
    ),
    Rule(
        "credit_history_vs_age",
        "cb_person_cred_hist_length is at most person_age - 16 (no credit file before 16)",
        pl.col("cb_person_cred_hist_length") <= _age() - 16,
    ),
    Rule(
        "credit_score_range",
        "credit_score is between 300 and 850",
        _between("credit_score", 300, 850),
    ),
    Rule(
        "gender_known", f"person_gender is one of {GENDERS}", pl.col("person_gender").is_in(GENDERS)
    ),
    Rule(
        "education_known",
        f"person_education is one of {EDUCATION}",
        pl.col("person_education").is_in(EDUCATION),
    ),
    Rule(
        "home_ownership_known",
        f"person_home_ownership is one of {HOME_OWNERSHIP}",
        pl.col("person_home_ownership").is_in(HOME_OWNERSHIP),
    ),
    Rule(
        "previous_defaults_known",
        "previous_loan_defaults_on_file is Yes or No",
        pl.col("previous_loan_defaults_on_file").is_in(YES_NO),
    ),
    _in_years("created_at"),
    _in_years("updated_at"),
    _not_future(),
    Rule(
        "created_before_update",
        "created_at is not after updated_at",
        pl.col("created_at") <= pl.col("updated_at"),
    ),
)

APPLICANT_EXISTS = "applicant_exists"

LOAN_RULES: tuple[Rule, ...] = (
    _representable("applied_at"),
    _representable("updated_at"),
    _key("application_id"),
    Rule(
        "amount_range",
        "loan_amnt is between 100 and 1,000,000",
        _between("loan_amnt", 100, 1_000_000),
    ),
    Rule(
        "interest_rate_range",
        "loan_int_rate is between 1 and 36 (percent a year; 36 is the usual usury cap)",
        _between("loan_int_rate", 1, 36),
    ),
    Rule(
        "percent_income_range",
        "loan_percent_income is between 0 and 1",
        _between("loan_percent_income", 0, 1),
    ),
    Rule("intent_known", f"loan_intent is one of {INTENTS}", pl.col("loan_intent").is_in(INTENTS)),
    Rule(
        "status_known",
        "loan_status is empty (pending), 0 or 1",
        pl.col("loan_status").is_null() | pl.col("loan_status").is_in((0, 1)),
    ),
    _in_years("applied_at"),
    _in_years("updated_at"),
    _not_future(),
    Rule(
        "applied_before_update",
        "applied_at is not after updated_at",
        pl.col("applied_at") <= pl.col("updated_at"),
    ),
    Rule(
        APPLICANT_EXISTS,
        "the applicant is in silver (its current version passes the applicant rules)",
        pl.col(APPLICANT_KNOWN).fill_null(False),
    ),
    Rule(
        "applied_after_applicant_created",
        "applied_at is not before the applicant's created_at (checked when the applicant is known)",
        pl.col(APPLICANT_CREATED_AT).is_null()
        | (pl.col("applied_at") >= pl.col(APPLICANT_CREATED_AT)),
    ),
    Rule(
        "percent_income_consistent",
        f"loan_percent_income is loan_amnt / person_income within {PERCENT_TOLERANCE} (checked "
        "while the applicant's current version dates from no later than applied_at)",
        pl.col(APPLICANT_INCOME_AT).is_null()
        | (
            (
                pl.col("loan_percent_income") - pl.col("loan_amnt") / pl.col(APPLICANT_INCOME_AT)
            ).abs()
            <= PERCENT_TOLERANCE
        ),
    ),
)

RULES = {"applicants": APPLICANT_RULES, "loan_applications": LOAN_RULES}


def _ascii_lower(expr: pl.Expr) -> pl.Expr:
    return expr.str.replace_many(list(_UPPER), list(_LOWER))


def _ascii_upper(expr: pl.Expr) -> pl.Expr:
    return expr.str.replace_many(list(_LOWER), list(_UPPER))


def clean(frame: pl.DataFrame, table: str) -> pl.DataFrame:
    """Normalise text before the rules: trim ASCII whitespace, ASCII case for categories.

    Only ASCII is folded, so that no other character can be turned into a valid
    category (Unicode folds some letters into ASCII ones) and SQL can do the same.
    """
    strings = [c for c, t in frame.schema.items() if t == pl.Utf8 and not c.startswith("_")]
    frame = frame.with_columns(pl.col(strings).str.strip_chars(WHITESPACE))
    if table == "applicants":
        edu = {e.lower(): e for e in EDUCATION}
        frame = frame.with_columns(
            _ascii_lower(pl.col("person_gender")),
            _ascii_upper(pl.col("person_home_ownership")),
            _ascii_lower(pl.col("person_education")).replace(edu),
            _ascii_lower(pl.col("previous_loan_defaults_on_file")).replace(
                {"yes": "Yes", "no": "No"}
            ),
        )
    else:
        frame = frame.with_columns(_ascii_upper(pl.col("loan_intent")))
    return frame


def clean_sql(table: str, column: str, expr: str) -> str:
    """Return `clean` for one text column as SQL that Postgres and DuckDB both run."""
    trimmed = f"trim({expr}, {_sql_chars(WHITESPACE)})"
    lower = f"translate({trimmed}, '{_UPPER}', '{_LOWER}')"
    upper = f"translate({trimmed}, '{_LOWER}', '{_UPPER}')"
    if table == "applicants" and column == "person_gender":
        return lower
    if table == "applicants" and column == "person_home_ownership":
        return upper
    if table == "applicants" and column == "person_education":
        cases = " ".join(f"WHEN '{e.lower()}' THEN '{e}'" for e in EDUCATION)
        return f"(CASE {lower} {cases} ELSE {lower} END)"
    if table == "applicants" and column == "previous_loan_defaults_on_file":
        return f"(CASE {lower} WHEN 'yes' THEN 'Yes' WHEN 'no' THEN 'No' ELSE {lower} END)"
    if table == "loan_applications" and column == "loan_intent":
        return upper
    return trimmed


def _sql_chars(chars: str) -> str:
    return " || ".join(f"chr({ord(c)})" for c in chars)


def validate(
    frame: pl.DataFrame,
    rules: tuple[Rule, ...],
    *,
    raw: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split upserts into (good rows, rejected rows); deletes always pass.

    Rejected rows keep every input column and gain `_rule` (the first rule that failed)
    and `_failed_rules` (all of them). With `raw` (the same rows before `clean`),
    rejected rows carry the raw values, as they arrived.
    """
    flags = failed_flags(frame, rules)
    bad = flags.select(pl.any_horizontal(pl.all())).to_series()
    good = frame.filter(~bad)
    source = frame if raw is None else raw
    rejected = source.filter(bad).hstack(failed_rules(flags.filter(bad), rules))
    return good, rejected


def failed_flags(frame: pl.DataFrame, rules: tuple[Rule, ...]) -> pl.DataFrame:
    """One boolean column per rule: true where an upsert fails it."""
    is_upsert = pl.col("_op") == "upsert"
    return frame.select([(is_upsert & ~r.check.fill_null(False)).alias(r.name) for r in rules])


def failed_rules(flags: pl.DataFrame, rules: tuple[Rule, ...]) -> pl.DataFrame:
    """`_failed_rules` (every failed rule, in rule order) and `_rule` (the first)."""
    failed = flags.select(
        _failed_rules=pl.concat_list(
            [pl.when(pl.col(r.name)).then(pl.lit(r.name)) for r in rules]
        ).list.drop_nulls()
    )
    return failed.with_columns(_rule=pl.col("_failed_rules").list.first())
