"""Each data-quality rule at its boundaries: the last value that passes, the first that fails."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import duckdb
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lakehouse.transforms import quality

T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = datetime(2026, 1, 2, tzinfo=UTC)
US = timedelta(microseconds=1)
EXAMPLES = int(os.environ.get("LAKEHOUSE_HYPOTHESIS_EXAMPLES", "200"))

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
    "created_at": T0,
    "updated_at": T0,
    "_unrepresentable": None,
    quality.SEEN_AT: T1,
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
    "_unrepresentable": None,
    quality.SEEN_AT: T1,
    "_op": "upsert",
    quality.APPLICANT_KNOWN: True,
    quality.APPLICANT_CREATED_AT: T0 - timedelta(days=30),
    quality.APPLICANT_INCOME_AT: 50_000.0,
}
TYPES = {
    "loan_status": pl.Int16,
    "person_age": pl.Int32,
    "person_emp_exp": pl.Int32,
    "cb_person_cred_hist_length": pl.Int32,
    "credit_score": pl.Int32,
    "_unrepresentable": pl.Utf8,
    quality.APPLICANT_INCOME_AT: pl.Float64,
    quality.APPLICANT_CREATED_AT: pl.Datetime("us", "UTC"),
    quality.SEEN_AT: pl.Datetime("us", "UTC"),
}


def frame(row: dict[str, object]) -> pl.DataFrame:
    return pl.DataFrame([row], schema_overrides={k: v for k, v in TYPES.items() if k in row})


def failed(row: dict[str, object], table: str) -> list[str]:
    rows = frame(row)
    _, rejected = quality.validate(quality.clean(rows, table), quality.RULES[table], raw=rows)
    return rejected["_failed_rules"].to_list()[0] if rejected.height else []


def test_the_good_rows_pass() -> None:
    assert failed(GOOD_APPLICANT, "applicants") == []
    assert failed(GOOD_LOAN, "loan_applications") == []


# (change that still passes, change that fails, the rule)
APPLICANT_EDGES = [
    ({"applicant_id": 1}, {"applicant_id": 0}, "key_positive"),
    (
        {"person_age": 18, "person_emp_exp": 0, "cb_person_cred_hist_length": 2},
        {"person_age": 17, "person_emp_exp": 0, "cb_person_cred_hist_length": 1},
        "age_range",
    ),
    ({"person_age": 100}, {"person_age": 101}, "age_range"),
    ({"person_emp_exp": 16}, {"person_emp_exp": 17}, "experience_vs_age"),
    ({"person_emp_exp": 0}, {"person_emp_exp": -1}, "experience_vs_age"),
    ({"person_income": 1_000.0}, {"person_income": 999.99}, "income_range"),
    ({"person_income": 10_000_000.0}, {"person_income": 10_000_000.01}, "income_range"),
    ({"person_income": 1_000.0}, {"person_income": 1e-300}, "income_range"),
    ({"person_income": 1_000.0}, {"person_income": float("nan")}, "income_range"),
    ({"person_income": 1_000.0}, {"person_income": float("inf")}, "income_range"),
    (
        {"person_age": 96, "cb_person_cred_hist_length": 80},
        {"person_age": 100, "cb_person_cred_hist_length": 81},
        "credit_history_range",
    ),
    (
        {"cb_person_cred_hist_length": 14},
        {"cb_person_cred_hist_length": 15},
        "credit_history_vs_age",
    ),
    ({"credit_score": 300}, {"credit_score": 299}, "credit_score_range"),
    ({"credit_score": 850}, {"credit_score": 851}, "credit_score_range"),
    ({"person_gender": " MALE\t"}, {"person_gender": "unknown"}, "gender_known"),
    ({"person_education": "high school"}, {"person_education": "PhD"}, "education_known"),
    (
        {"person_home_ownership": "mortgage"},
        {"person_home_ownership": "BOAT"},
        "home_ownership_known",
    ),
    (
        {"previous_loan_defaults_on_file": "yes"},
        {"previous_loan_defaults_on_file": "Maybe"},
        "previous_defaults_known",
    ),
    (
        {"created_at": quality.EARLIEST},
        {"created_at": quality.EARLIEST - US},
        "created_at_range",
    ),
    (
        {"created_at": quality.LATEST - US, "updated_at": quality.LATEST - US},
        {"created_at": quality.LATEST, "updated_at": quality.LATEST},
        "created_at_range",
    ),
    (
        {"updated_at": quality.LATEST - US, quality.SEEN_AT: quality.LATEST},
        {"updated_at": quality.LATEST},
        "updated_at_range",
    ),
    (
        {"updated_at": T1 + quality.CLOCK_DRIFT},
        {"updated_at": T1 + quality.CLOCK_DRIFT + US},
        "updated_at_not_future",
    ),
    ({"updated_at": T1, quality.SEEN_AT: None}, {quality.SEEN_AT: T0}, "updated_at_not_future"),
    (
        {"created_at": T0, "updated_at": T0},
        {"created_at": T0 + US, "updated_at": T0},
        "created_before_update",
    ),
    (
        {"_unrepresentable": '{"other": "x"}'},
        {"updated_at": None, "_unrepresentable": '{"updated_at": "infinity"}'},
        "updated_at_representable",
    ),
    (
        {"_unrepresentable": None},
        {"created_at": None, "_unrepresentable": '{"created_at": "0001-01-01 00:00:00+00 BC"}'},
        "created_at_representable",
    ),
]

LOAN_EDGES = [
    ({"application_id": 1}, {"application_id": -1}, "key_positive"),
    ({"loan_amnt": 100.0}, {"loan_amnt": 99.99}, "amount_range"),
    (
        {
            "loan_amnt": 1_000_000.0,
            "loan_percent_income": 1.0,
            quality.APPLICANT_INCOME_AT: 1_000_000.0,
        },
        {"loan_amnt": 1_000_000.01},
        "amount_range",
    ),
    ({"loan_int_rate": 1.0}, {"loan_int_rate": 1e-9}, "interest_rate_range"),
    ({"loan_int_rate": 36.0}, {"loan_int_rate": 100.0}, "interest_rate_range"),
    (
        {"loan_percent_income": 0.2},
        {"loan_percent_income": 1.01, quality.APPLICANT_INCOME_AT: None},
        "percent_income_range",
    ),
    ({"loan_percent_income": 0.2099}, {"loan_percent_income": 0.2101}, "percent_income_consistent"),
    ({"loan_percent_income": 0.1901}, {"loan_percent_income": 0.0}, "percent_income_consistent"),
    (
        {"loan_percent_income": 0.0, quality.APPLICANT_INCOME_AT: None},
        {quality.APPLICANT_INCOME_AT: 50_000.0},
        "percent_income_consistent",
    ),
    ({"loan_intent": " debtconsolidation "}, {"loan_intent": "YACHT"}, "intent_known"),
    ({"loan_status": 1}, {"loan_status": 2}, "status_known"),
    ({"applied_at": quality.EARLIEST}, {"applied_at": quality.EARLIEST - US}, "applied_at_range"),
    (
        {"applied_at": quality.EARLIEST},
        {"applied_at": datetime(1900, 1, 1, tzinfo=UTC)},
        "applied_at_range",
    ),
    (
        {"applied_at": quality.EARLIEST},
        {"applied_at": datetime(1677, 9, 22, tzinfo=UTC)},
        "applied_at_range",
    ),
    (
        {"applied_at": quality.EARLIEST},
        {"applied_at": datetime(1, 1, 1, tzinfo=UTC)},
        "applied_at_range",
    ),
    (
        {"updated_at": quality.LATEST - US, quality.SEEN_AT: quality.LATEST},
        {"updated_at": quality.LATEST},
        "updated_at_range",
    ),
    (
        {"applied_at": T0, "updated_at": T0},
        {"updated_at": datetime(2030, 1, 1, tzinfo=UTC)},
        "updated_at_not_future",
    ),
    (
        {"applied_at": T1, "updated_at": T1},
        {"applied_at": T1 + US, "updated_at": T1},
        "applied_before_update",
    ),
    (
        {quality.APPLICANT_CREATED_AT: T0},
        {quality.APPLICANT_CREATED_AT: T0 + US},
        "applied_after_applicant_created",
    ),
    ({quality.APPLICANT_KNOWN: True}, {quality.APPLICANT_KNOWN: False}, quality.APPLICANT_EXISTS),
    (
        {"_unrepresentable": None},
        {"applied_at": None, "_unrepresentable": '{"applied_at": "-infinity"}'},
        "applied_at_representable",
    ),
]


@pytest.mark.parametrize(("passes", "fails", "rule"), APPLICANT_EDGES)
def test_applicant_rules_at_their_boundaries(
    passes: dict[str, object], fails: dict[str, object], rule: str
) -> None:
    assert rule not in failed({**GOOD_APPLICANT, **passes}, "applicants")
    assert rule in failed({**GOOD_APPLICANT, **passes, **fails}, "applicants")


@pytest.mark.parametrize(("passes", "fails", "rule"), LOAN_EDGES)
def test_loan_rules_at_their_boundaries(
    passes: dict[str, object], fails: dict[str, object], rule: str
) -> None:
    assert rule not in failed({**GOOD_LOAN, **passes}, "loan_applications")
    assert rule in failed({**GOOD_LOAN, **passes, **fails}, "loan_applications")


def test_every_rule_is_tested_at_a_boundary() -> None:
    named = {r.name for r in quality.APPLICANT_RULES} | {r.name for r in quality.LOAN_RULES}
    tested = {rule for *_, rule in APPLICANT_EDGES + LOAN_EDGES}
    assert named == tested


def test_rejected_rows_keep_their_raw_values_and_every_failed_rule() -> None:
    row = {**GOOD_APPLICANT, "person_age": 150, "credit_score": 10, "person_gender": " X "}
    rows = frame(row)
    _, rejected = quality.validate(
        quality.clean(rows, "applicants"), quality.APPLICANT_RULES, raw=rows
    )
    assert rejected["person_gender"].to_list() == [" X "]
    assert rejected["_failed_rules"].to_list() == [
        ["age_range", "credit_score_range", "gender_known"]
    ]
    assert rejected["_rule"].to_list() == ["age_range"]


def test_null_fails_every_rule_that_reads_it() -> None:
    rows = frame({**GOOD_APPLICANT, "person_age": None})
    _, rejected = quality.validate(rows, quality.APPLICANT_RULES)
    assert rejected["_failed_rules"].to_list() == [
        ["age_range", "experience_vs_age", "credit_history_vs_age"]
    ]


def test_deletes_are_never_rejected() -> None:
    tombstone = {k: None for k in GOOD_APPLICANT} | {"applicant_id": 5, "_op": "delete"}
    rows = pl.DataFrame([tombstone], schema=frame(GOOD_APPLICANT).schema)
    good, rejected = quality.validate(rows, quality.APPLICANT_RULES)
    assert good["applicant_id"].to_list() == [5]
    assert rejected.height == 0


def test_clean_folds_only_ascii() -> None:
    rows = frame(
        {
            **GOOD_APPLICANT,
            "person_gender": " Female\n",
            "person_education": "HIGH SCHOOL",
            "person_home_ownership": "rent",
            "previous_loan_defaults_on_file": "yEs",
        }
    )
    cleaned = quality.clean(rows, "applicants")
    assert cleaned["person_gender"].to_list() == ["female"]
    assert cleaned["person_education"].to_list() == ["High School"]
    assert cleaned["person_home_ownership"].to_list() == ["RENT"]
    assert cleaned["previous_loan_defaults_on_file"].to_list() == ["Yes"]
    # The long s upper-cases to `S` in Unicode: it must not make a known category.
    odd = quality.clean(
        frame({**GOOD_LOAN, "loan_intent": "debtconſolidation"}), "loan_applications"
    )
    assert odd["loan_intent"].to_list() == ["DEBTCONſOLIDATION"]


CATEGORY_COLUMNS = [
    ("applicants", "person_gender"),
    ("applicants", "person_education"),
    ("applicants", "person_home_ownership"),
    ("applicants", "previous_loan_defaults_on_file"),
    ("loan_applications", "loan_intent"),
    ("applicants", "person_age_text"),  # any other text column: trimmed only
]
WORDS = st.sampled_from(
    [*quality.GENDERS, *quality.EDUCATION, *quality.HOME_OWNERSHIP, *quality.INTENTS, "yes", "No"]
)
TEXT = st.one_of(
    WORDS.map(str.lower),
    WORDS.map(str.upper),
    st.builds(
        lambda a, w, b: a + w + b,
        st.text(quality.WHITESPACE + " \u00a0\u2003", max_size=3),
        WORDS,
        st.text(quality.WHITESPACE + " \u00a0", max_size=3),
    ),
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12),
)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.sampled_from(CATEGORY_COLUMNS), st.lists(TEXT, min_size=1, max_size=20))
def test_clean_in_sql_equals_clean_in_polars(column: tuple[str, str], values: list[str]) -> None:
    """`lakehouse verify` cleans in SQL, silver in Polars: they must agree on any text."""
    table, name = column
    base = GOOD_APPLICANT if table == "applicants" else GOOD_LOAN
    rows = pl.concat([frame({**base, name: v}) for v in values])
    want = quality.clean(rows, table)[name].to_list()
    con = duckdb.connect()
    con.register("t", rows.select(name).to_arrow())
    got = [
        r[0]
        for r in con.execute(f"SELECT {quality.clean_sql(table, name, name)} FROM t").fetchall()
    ]
    assert got == want


# Strings where engines tend to differ: every ASCII and Unicode space, case mappings that
# leave ASCII, and plain categories with noise around them.
NASTY = [
    *[f"{c}male{c}" for c in quality.WHITESPACE + "\u00a0\u1680\u2000\u2028\u3000\ufeff"],
    "debtconſolidation",
    "HİGH SCHOOL",
    "ﬁ",
    "MORTGAGE\x00".replace("\x00", ""),
    "",
    " ",
    "Yes ",
    "nO",
    "Ⓜale",
    "MÅLE",
]


def test_clean_in_postgres_equals_clean_in_polars(pg_server: str) -> None:
    import psycopg

    with psycopg.connect(pg_server) as conn:
        for table, name in CATEGORY_COLUMNS:
            base = GOOD_APPLICANT if table == "applicants" else GOOD_LOAN
            rows = pl.concat([frame({**base, name: v}) for v in NASTY])
            want = quality.clean(rows, table)[name].to_list()
            expr = quality.clean_sql(table, name, "v")
            got = [
                r[0]
                for r in conn.execute(
                    f"SELECT {expr} FROM unnest(%s::text[]) WITH ORDINALITY AS x(v, i) ORDER BY i",
                    (NASTY,),
                ).fetchall()
            ]
            assert got == want, (table, name)
