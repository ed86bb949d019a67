"""Data-quality rules for silver: each is a named Polars expression that is true for a good row."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Rule:
    """A named check; `check` is true for rows that pass (null counts as failing)."""

    name: str
    description: str
    check: pl.Expr


def _between(col: str, low: float, high: float) -> pl.Expr:
    return pl.col(col).is_between(low, high)


APPLICANT_RULES: tuple[Rule, ...] = (
    Rule("age_range", "person_age is between 18 and 100", _between("person_age", 18, 100)),
    Rule(
        "experience_vs_age",
        "person_emp_exp is between 0 and person_age - 14",
        (pl.col("person_emp_exp") >= 0) & (pl.col("person_emp_exp") <= pl.col("person_age") - 14),
    ),
    Rule("income_positive", "person_income is above 0", pl.col("person_income") > 0),
    Rule(
        "income_range",
        "person_income is at most 10,000,000",
        pl.col("person_income") <= 10_000_000,
    ),
    Rule(
        "credit_history_range",
        "cb_person_cred_hist_length is between 0 and 80",
        _between("cb_person_cred_hist_length", 0, 80),
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
)

LOAN_RULES: tuple[Rule, ...] = (
    Rule(
        "amount_range", "loan_amnt is between 1 and 1,000,000", _between("loan_amnt", 1, 1_000_000)
    ),
    Rule(
        "interest_rate_range",
        "loan_int_rate is between 0 and 100 (percent)",
        (pl.col("loan_int_rate") > 0) & (pl.col("loan_int_rate") <= 100),
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
    Rule(
        "applied_before_update",
        "applied_at is set and not after updated_at",
        pl.col("applied_at") <= pl.col("updated_at"),
    ),
)

APPLICANT_EXISTS = "applicant_exists"

RULES = {"applicants": APPLICANT_RULES, "loan_applications": LOAN_RULES}


def clean(frame: pl.DataFrame, table: str) -> pl.DataFrame:
    """Normalise text before the rules: trim, and canonical case for categories."""
    strings = [c for c, t in frame.schema.items() if t == pl.Utf8 and not c.startswith("_")]
    frame = frame.with_columns(pl.col(strings).str.strip_chars())
    if table == "applicants":
        edu = {e.lower(): e for e in EDUCATION}
        frame = frame.with_columns(
            pl.col("person_gender").str.to_lowercase(),
            pl.col("person_home_ownership").str.to_uppercase(),
            pl.col("person_education").str.to_lowercase().replace(edu),
            pl.col("previous_loan_defaults_on_file").str.to_titlecase(),
        )
    else:
        frame = frame.with_columns(pl.col("loan_intent").str.to_uppercase())
    return frame


def validate(
    frame: pl.DataFrame,
    rules: tuple[Rule, ...],
    *,
    known_keys: tuple[str, pl.Series] | None = None,
    raw: pl.DataFrame | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split upserts into (good rows, rejected rows); deletes always pass.

    Rejected rows keep every input column and gain `_rule` (the first rule that failed)
    and `_failed_rules` (all of them). `known_keys=(column, keys)` adds the
    `applicant_exists` rule: `column` must be one of `keys`. With `raw` (the same rows
    before `clean`), rejected rows carry the raw values, as they arrived.
    """
    checks = [(r.name, r.check) for r in rules]
    if known_keys is not None:
        column, keys = known_keys
        checks.append((APPLICANT_EXISTS, pl.col(column).is_in(keys.implode())))
    is_upsert = pl.col("_op") == "upsert"
    # One boolean per rule; the list of rule names is built only for the (few) bad rows.
    flags = frame.select(
        [(is_upsert & ~check.fill_null(False)).alias(name) for name, check in checks]
    )
    bad = flags.select(pl.any_horizontal(pl.all())).to_series()
    good = frame.filter(~bad)
    source = frame if raw is None else raw
    failed = flags.filter(bad).select(
        _failed_rules=pl.concat_list(
            [pl.when(pl.col(name)).then(pl.lit(name)) for name, _ in checks]
        ).list.drop_nulls()
    )
    rejected = (
        source.filter(bad).hstack(failed).with_columns(_rule=pl.col("_failed_rules").list.first())
    )
    return good, rejected
