import polars as pl
import psycopg
import pytest

from lakehouse.settings import Settings
from lakehouse.zones import silver
from tests.helpers import churn, read, run_all, seeded, source_frame

# The rules, written again independently in SQL: the rows silver must hold.
VALID_APPLICANTS = """
SELECT * FROM {s}.applicants
WHERE person_age BETWEEN 18 AND 100
  AND person_emp_exp BETWEEN 0 AND person_age - 14
  AND person_income > 0 AND person_income <= 10000000
  AND cb_person_cred_hist_length BETWEEN 0 AND 80
  AND credit_score BETWEEN 300 AND 850
  AND person_gender IN ('female', 'male')
  AND person_education IN ('High School', 'Associate', 'Bachelor', 'Master', 'Doctorate')
  AND person_home_ownership IN ('RENT', 'OWN', 'MORTGAGE', 'OTHER')
  AND previous_loan_defaults_on_file IN ('Yes', 'No')
"""
VALID_LOANS = """
SELECT l.* FROM {s}.loan_applications l
JOIN ({valid}) a USING (applicant_id)
WHERE loan_amnt BETWEEN 1 AND 1000000
  AND loan_int_rate > 0 AND loan_int_rate <= 100
  AND loan_percent_income BETWEEN 0 AND 1
  AND loan_intent IN ('PERSONAL', 'EDUCATION', 'MEDICAL', 'VENTURE', 'HOMEIMPROVEMENT',
                      'DEBTCONSOLIDATION')
  AND (loan_status IS NULL OR loan_status IN (0, 1))
"""


def expected(settings: Settings) -> tuple[pl.DataFrame, pl.DataFrame]:
    s = f'"{settings.pg_schema}"'
    applicants = source_frame(settings, VALID_APPLICANTS.format(s=s)).with_columns(
        pl.col("previous_loan_defaults_on_file") == "Yes"
    )
    loans = source_frame(settings, VALID_LOANS.format(s=s, valid=VALID_APPLICANTS.format(s=s)))
    return applicants, loans


def assert_same_rows(actual: pl.DataFrame, wanted: pl.DataFrame, key: str) -> None:
    cols = wanted.columns
    got = actual.select(cols).sort(key)
    want = wanted.sort(key).cast(dict(got.schema))
    assert got.height == want.height
    assert got.equals(want), got.join(want, on=key, how="anti")


def test_silver_equals_source_after_changes_and_incremental_runs(settings: Settings) -> None:
    storage = seeded(settings, rows=400)
    run_all(settings, storage, with_gold=False)
    for round_ in range(3):
        churn(settings, changes=250, seed_value=round_)
        run_all(settings, storage, with_gold=False)
    applicants, loans = expected(settings)
    assert_same_rows(read(storage, "silver", "applicants"), applicants, "applicant_id")
    assert_same_rows(read(storage, "silver", "loan_applications"), loans, "application_id")


def test_rejects_hold_rule_and_raw_values(settings: Settings) -> None:
    storage = seeded(settings, rows=2000)  # the dataset has ages above 100 in its first rows
    run_all(settings, storage, with_gold=False)
    rejected = read(storage, "silver", "applicants_rejected")
    src = source_frame(
        settings,
        f'SELECT applicant_id, person_age FROM "{settings.pg_schema}".applicants '
        "WHERE person_age > 100",
    )
    assert rejected.height == src.height > 0
    assert set(rejected["_rule"]) == {"age_range"}
    assert (
        rejected.sort("applicant_id")["person_age"].to_list()
        == src.sort("applicant_id")["person_age"].to_list()
    )
    # Their applications are rejected too, since their applicant never reached silver.
    loans = read(storage, "silver", "loan_applications_rejected")
    assert sorted(loans["applicant_id"]) == sorted(src["applicant_id"])
    assert set(loans["_rule"]) == {"applicant_exists"}
    # Nothing is dropped: every source row is in silver or in the rejects.
    total = read(storage, "silver", "applicants").height + rejected.height
    assert total == 2000


def test_history_is_a_consistent_scd2(settings: Settings) -> None:
    storage = seeded(settings, rows=300)
    run_all(settings, storage, with_gold=False)
    for round_ in range(3):
        churn(settings, changes=300, seed_value=10 + round_)
        run_all(settings, storage, with_gold=False)
    with psycopg.connect(settings.pg_dsn.get(), autocommit=True) as conn:
        conn.execute(
            f'DELETE FROM "{settings.pg_schema}".loan_applications '
            "WHERE application_id IN (10, 11, 12)"
        )
    run_all(settings, storage, with_gold=False)
    for table, key in (("applicants", "applicant_id"), ("loan_applications", "application_id")):
        history = read(storage, "silver", f"{table}_history").sort(key, "valid_from")
        current = read(storage, "silver", table)
        # Versions of a key are contiguous: each ends where the next begins.
        gaps = history.with_columns(next_from=pl.col("valid_from").shift(-1).over(key)).filter(
            pl.col("next_from").is_not_null() & (pl.col("valid_to") != pl.col("next_from"))
        )
        assert gaps.height == 0
        assert (
            history.filter(pl.col("valid_to").is_not_null())
            .filter(pl.col("valid_to") <= pl.col("valid_from"))
            .height
            == 0
        )
        # Exactly one open version per live key, and it equals the current row.
        open_ = history.filter(pl.col("valid_to").is_null())
        assert open_[key].is_unique().all()
        assert sorted(open_[key]) == sorted(current[key])
        assert open_["is_current"].all()
        cols = [c for c in current.columns if c != "_batch_id"]
        assert open_.select(cols).sort(key).equals(current.select(cols).sort(key))
        # Deleted keys have history that is closed.
        if table == "loan_applications":
            gone = set(history[key]) - set(current[key])
            assert {10, 11, 12} <= gone
            assert history.filter(pl.col(key).is_in(list(gone)))["valid_to"].null_count() == 0


def test_rerun_is_a_no_op(settings: Settings) -> None:
    storage = seeded(settings, rows=100)
    run_all(settings, storage, with_gold=False)
    versions = {
        t: storage.table("silver", t).version()
        for t in ("applicants", "applicants_history", "applicants_rejected")
    }
    assert silver.is_current(storage, "applicants")
    result = silver.promote(storage, "applicants")
    assert result.rows == {}
    assert {t: storage.table("silver", t).version() for t in versions} == versions


def test_promotion_reads_only_new_batches(settings: Settings) -> None:
    storage = seeded(settings, rows=500)
    run_all(settings, storage, with_gold=False)
    churn(settings, changes=40)
    from lakehouse.zones import bronze

    new = bronze.ingest(settings, storage, "applicants")
    result = silver.promote(storage, "applicants")
    assert result.upto_batch == new.batch_id
    # Only the new batch's rows were merged, not the 500 seeded ones again.
    assert 0 < result.rows["applicants"] <= new.rows
    progress = silver.progress(storage, "applicants")
    assert set(progress.values()) == {new.batch_id}


def test_large_backlogs_are_promoted_in_partitions(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spilled key partitions give the same silver as one in-memory pass."""
    monkeypatch.setattr(silver, "_PARTITION_ROWS", 70)  # 400 rows -> 6 partitions
    storage = seeded(settings, rows=400)
    run_all(settings, storage, with_gold=False)
    churn(settings, changes=300, seed_value=3)
    run_all(settings, storage, with_gold=False)
    applicants, loans = expected(settings)
    assert_same_rows(read(storage, "silver", "applicants"), applicants, "applicant_id")
    assert_same_rows(read(storage, "silver", "loan_applications"), loans, "application_id")
    history = read(storage, "silver", "applicants_history")
    assert history.filter(pl.col("valid_to").is_null())["applicant_id"].is_unique().all()
    # One commit per target, however many partitions.
    assert storage.table("silver", "applicants").version() == 1
