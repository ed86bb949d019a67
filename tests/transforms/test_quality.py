from datetime import UTC, datetime

import polars as pl
import pytest

from lakehouse.transforms import quality

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = datetime(2026, 1, 2, tzinfo=UTC)

GOOD_APPLICANT = {
    "applicant_id": 1,
    "person_age": 30,
    "person_gender": "female",
    "person_education": "Master",
    "person_income": 50_000.0,
    "person_emp_exp": 5,
    "person_home_ownership": "RENT",
    "cb_person_cred_hist_length": 4,
    "credit_score": 650,
    "previous_loan_defaults_on_file": "No",
    "updated_at": T0,
    "_op": "upsert",
}
GOOD_LOAN = {
    "application_id": 1,
    "applicant_id": 1,
    "loan_amnt": 10_000.0,
    "loan_intent": "MEDICAL",
    "loan_int_rate": 11.5,
    "loan_percent_income": 0.2,
    "loan_status": None,
    "applied_at": T0,
    "updated_at": T1,
    "_op": "upsert",
}


def frame(row: dict[str, object]) -> pl.DataFrame:
    schema = {k: (pl.Int16 if k == "loan_status" else None) for k in row}
    return pl.DataFrame([row], schema_overrides={k: v for k, v in schema.items() if v})


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        ({"person_age": 144}, "age_range"),
        ({"person_age": 17, "person_emp_exp": 0}, "age_range"),
        ({"person_emp_exp": 20}, "experience_vs_age"),
        ({"person_emp_exp": -1}, "experience_vs_age"),
        ({"person_income": 0.0}, "income_positive"),
        ({"person_income": 20_000_000.0}, "income_range"),
        ({"cb_person_cred_hist_length": 90}, "credit_history_range"),
        ({"credit_score": 900}, "credit_score_range"),
        ({"person_gender": "unknown"}, "gender_known"),
        ({"person_education": "PhD"}, "education_known"),
        ({"person_home_ownership": "BOAT"}, "home_ownership_known"),
        ({"previous_loan_defaults_on_file": "Maybe"}, "previous_defaults_known"),
    ],
)
def test_each_applicant_rule_rejects_with_its_name(change: dict[str, object], rule: str) -> None:
    rows = frame({**GOOD_APPLICANT, **change})
    good, rejected = quality.validate(
        quality.clean(rows, "applicants"), quality.APPLICANT_RULES, raw=rows
    )
    assert good.height == 0
    assert rejected["_rule"].to_list() == [rule]
    assert rejected["_failed_rules"].to_list() == [[rule]]
    # The raw values travel with the rejected row.
    for column, value in change.items():
        assert rejected[column].to_list() == [value]


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        ({"loan_amnt": 0.0}, "amount_range"),
        ({"loan_amnt": 2_000_000.0}, "amount_range"),
        ({"loan_int_rate": 0.0}, "interest_rate_range"),
        ({"loan_int_rate": 150.0}, "interest_rate_range"),
        ({"loan_percent_income": 1.5}, "percent_income_range"),
        ({"loan_intent": "YACHT"}, "intent_known"),
        ({"loan_status": 2}, "status_known"),
        ({"applied_at": T1, "updated_at": T0}, "applied_before_update"),
    ],
)
def test_each_loan_rule_rejects_with_its_name(change: dict[str, object], rule: str) -> None:
    rows = frame({**GOOD_LOAN, **change})
    good, rejected = quality.validate(
        quality.clean(rows, "loan_applications"),
        quality.LOAN_RULES,
        known_keys=("applicant_id", pl.Series([1], dtype=pl.Int64)),
    )
    assert good.height == 0
    assert rejected["_rule"].to_list() == [rule]


def test_null_fails_every_rule_that_reads_it() -> None:
    rows = frame({**GOOD_APPLICANT, "person_age": None})
    rows = rows.with_columns(pl.col("person_age").cast(pl.Int32))
    _, rejected = quality.validate(rows, quality.APPLICANT_RULES)
    assert rejected["_failed_rules"].to_list() == [["age_range", "experience_vs_age"]]


def test_applicant_exists_rule() -> None:
    rows = frame({**GOOD_LOAN, "applicant_id": 99})
    good, rejected = quality.validate(
        rows, quality.LOAN_RULES, known_keys=("applicant_id", pl.Series([1], dtype=pl.Int64))
    )
    assert good.height == 0
    assert rejected["_rule"].to_list() == [quality.APPLICANT_EXISTS]


def test_good_rows_pass_and_all_failures_are_listed() -> None:
    rows = pl.concat(
        [
            frame(GOOD_APPLICANT),
            frame({**GOOD_APPLICANT, "applicant_id": 2, "person_age": 150, "credit_score": 10}),
        ]
    )
    good, rejected = quality.validate(rows, quality.APPLICANT_RULES)
    assert good["applicant_id"].to_list() == [1]
    assert rejected["_failed_rules"].to_list() == [["age_range", "credit_score_range"]]
    assert rejected["_rule"].to_list() == ["age_range"]


def test_deletes_are_never_rejected() -> None:
    tombstone = {k: None for k in GOOD_APPLICANT} | {"applicant_id": 5, "_op": "delete"}
    rows = pl.DataFrame([tombstone], schema=frame(GOOD_APPLICANT).schema)
    good, rejected = quality.validate(rows, quality.APPLICANT_RULES)
    assert good["applicant_id"].to_list() == [5]
    assert rejected.height == 0


def test_clean_normalises_categories() -> None:
    rows = frame(
        {
            **GOOD_APPLICANT,
            "person_gender": " Female ",
            "person_education": "high school",
            "person_home_ownership": "rent",
            "previous_loan_defaults_on_file": "yes",
        }
    )
    cleaned = quality.clean(rows, "applicants")
    assert cleaned["person_gender"].to_list() == ["female"]
    assert cleaned["person_education"].to_list() == ["High School"]
    assert cleaned["person_home_ownership"].to_list() == ["RENT"]
    assert cleaned["previous_loan_defaults_on_file"].to_list() == ["Yes"]
    good, _ = quality.validate(cleaned, quality.APPLICANT_RULES)
    assert good.height == 1
