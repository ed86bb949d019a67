import polars as pl
import psycopg
import pytest

from lakehouse.settings import Settings
from lakehouse.storage import Storage
from lakehouse.zones import bronze, silver, silver_reads
from tests.helpers import churn, read, run_all, seeded, source_frame

# The rules, written again independently in SQL: the rows silver must hold. (The seeded and
# simulated data is already clean; loan_percent_income always matches the income the
# applicant had when applying, so `percent_income_consistent` passes and is left out.)
VALID_APPLICANTS = """
SELECT * FROM {s}.applicants
WHERE applicant_id >= 1
  AND person_age BETWEEN 18 AND 100
  AND person_emp_exp BETWEEN 0 AND person_age - 14
  AND person_income BETWEEN 1000 AND 10000000
  AND cb_person_cred_hist_length BETWEEN 0 AND 80
  AND cb_person_cred_hist_length <= person_age - 16
  AND credit_score BETWEEN 300 AND 850
  AND person_gender IN ('female', 'male')
  AND person_education IN ('High School', 'Associate', 'Bachelor', 'Master', 'Doctorate')
  AND person_home_ownership IN ('RENT', 'OWN', 'MORTGAGE', 'OTHER')
  AND previous_loan_defaults_on_file IN ('Yes', 'No')
  AND created_at >= '2000-01-01 00:00+00' AND created_at < '2100-01-01 00:00+00'
  AND updated_at >= '2000-01-01 00:00+00' AND updated_at < '2100-01-01 00:00+00'
  AND created_at <= updated_at
"""
VALID_LOANS = """
SELECT l.* FROM {s}.loan_applications l
JOIN ({valid}) a USING (applicant_id)
WHERE l.application_id >= 1
  AND loan_amnt BETWEEN 100 AND 1000000
  AND loan_int_rate BETWEEN 1 AND 36
  AND loan_percent_income BETWEEN 0 AND 1
  AND loan_intent IN ('PERSONAL', 'EDUCATION', 'MEDICAL', 'VENTURE', 'HOMEIMPROVEMENT',
                      'DEBTCONSOLIDATION')
  AND (loan_status IS NULL OR loan_status IN (0, 1))
  AND applied_at >= '2000-01-01 00:00+00' AND applied_at < '2100-01-01 00:00+00'
  AND l.updated_at >= '2000-01-01 00:00+00' AND l.updated_at < '2100-01-01 00:00+00'
  AND applied_at <= l.updated_at
  AND applied_at >= a.created_at
"""


def expected(settings: Settings) -> tuple[pl.DataFrame, pl.DataFrame]:
    s = f'"{settings.pg_schema}"'
    applicants = (
        source_frame(settings, VALID_APPLICANTS.format(s=s))
        .with_columns(pl.col("previous_loan_defaults_on_file") == "Yes")
        .drop("updated_xid")
    )
    loans = source_frame(
        settings, VALID_LOANS.format(s=s, valid=VALID_APPLICANTS.format(s=s))
    ).drop("updated_xid")
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


# Local disk only (CI time): promotion bookkeeping, storage-independent; S3 promotions run in the
# scd2 and equality tests.
@pytest.mark.parametrize("settings", ["local"], indirect=True)
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


# Local disk only (CI time): promotion bookkeeping, storage-independent; S3 promotions run in the
# scd2 and equality tests.
@pytest.mark.parametrize("settings", ["local"], indirect=True)
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


# Local disk only (CI time): promotion bookkeeping, storage-independent; S3 promotions run in the
# scd2 and equality tests.
@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_promotion_reads_only_new_batches(settings: Settings) -> None:
    storage = seeded(settings, rows=500)
    run_all(settings, storage, with_gold=False)
    churn(settings, changes=40)
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
    monkeypatch.setattr(silver_reads, "PARTITION_ROWS", 70)  # 400 rows -> 6 partitions
    storage = seeded(settings, rows=400)
    run_all(settings, storage, with_gold=False)
    execute(settings, "TRUNCATE {s}.loan_applications")  # a truncate, in every partition
    churn(settings, changes=300, seed_value=3)
    run_all(settings, storage, with_gold=False)
    applicants, loans = expected(settings)
    assert_same_rows(read(storage, "silver", "applicants"), applicants, "applicant_id")
    assert_same_rows(read(storage, "silver", "loan_applications"), loans, "application_id")
    history = read(storage, "silver", "applicants_history")
    assert history.filter(pl.col("valid_to").is_null())["applicant_id"].is_unique().all()
    # One commit per target and run, however many partitions (version 0: created empty).
    assert storage.table("silver", "applicants").version() == 2


def run_silver(settings: Settings, storage: Storage) -> None:
    """A pipeline run's bronze and silver steps, in the pipeline's order."""
    for table in ("loan_applications", "applicants"):
        bronze.ingest(settings, storage, table)
    for table in ("applicants", "loan_applications"):
        silver.promote(storage, table)


def execute(settings: Settings, statement: str, *args: object) -> None:
    with psycopg.connect(settings.pg_dsn.get(), autocommit=True) as conn:
        conn.execute(statement.format(s=f'"{settings.pg_schema}"'), args or None)


# Rule and ordering semantics, the same on any storage: local disk only (CI time).
@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_rows_dated_far_back_or_ahead_reach_silver_or_its_rejects(settings: Settings) -> None:
    """Reproduction 6: batches chose rows by `updated_at`; a 2020 row never arrived, and a
    2100 row kept every run from finishing."""
    storage = seeded(settings, rows=50)
    run_silver(settings, storage)
    execute(
        settings,
        "INSERT INTO {s}.applicants (applicant_id, person_age, person_gender, person_education,"
        " person_income, person_emp_exp, person_home_ownership, cb_person_cred_hist_length,"
        " credit_score, previous_loan_defaults_on_file, created_at, updated_at) VALUES"
        " (901, 40, 'male', 'Master', 60000, 10, 'OWN', 10, 700, 'No', %s, %s),"
        " (902, 40, 'male', 'Master', 60000, 10, 'OWN', 10, 700, 'No', %s, %s)",
        "2020-01-01 00:00+00",
        "2020-01-01 00:00+00",
        "2020-01-01 00:00+00",
        "2100-01-01 00:00+00",
    )
    run_silver(settings, storage)
    assert 901 in read(storage, "silver", "applicants")["applicant_id"].to_list()
    rejected = read(storage, "silver", "applicants_rejected").filter(pl.col("applicant_id") == 902)
    assert rejected["_rule"].to_list() == ["updated_at_range"]
    assert bronze.is_current(settings, storage, "applicants")
    assert silver.is_current(storage, "applicants")


# Rule and ordering semantics, the same on any storage: local disk only (CI time).
@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_an_application_held_for_its_applicant_arrives_when_the_applicant_is_fixed(
    settings: Settings,
) -> None:
    """Reproduction 7: rejected by `applicant_exists`, never reconsidered."""
    storage = seeded(settings, rows=2000)  # ages above 100 among the first rows
    run_silver(settings, storage)
    waiting = read(storage, "silver", "loan_applications_rejected")
    assert set(waiting["_rule"]) == {"applicant_exists"}
    applicant = int(waiting["applicant_id"][0])
    execute(
        settings,
        "UPDATE {s}.applicants SET person_age = 40, person_emp_exp = 10,"
        " cb_person_cred_hist_length = 5 WHERE applicant_id = %s",
        applicant,
    )
    run_silver(settings, storage)
    loans = read(storage, "silver", "loan_applications")
    assert applicant in loans["applicant_id"].to_list()
    held = read(storage, "silver", "loan_applications_rejected").filter(
        pl.col("applicant_id") == applicant
    )
    assert held["is_current"].to_list() == [False]  # the rejection stays, as history
    assert held["valid_to"].null_count() == 0
    _, expected_loans = expected(settings)
    assert_same_rows(loans, expected_loans, "application_id")
    assert silver.is_current(storage, "loan_applications")


# Rule and ordering semantics, the same on any storage: local disk only (CI time).
@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_a_row_whose_current_version_fails_leaves_silver(settings: Settings) -> None:
    """Reproduction 8: silver kept the last good version as current."""
    storage = seeded(settings, rows=100)
    run_silver(settings, storage)
    execute(settings, "UPDATE {s}.applicants SET credit_score = 7 WHERE applicant_id = 5")
    run_silver(settings, storage)
    assert 5 not in read(storage, "silver", "applicants")["applicant_id"].to_list()
    history = read(storage, "silver", "applicants_history").filter(pl.col("applicant_id") == 5)
    assert history["valid_to"].null_count() == 0  # the last good version is closed
    current = read(storage, "silver", "applicants_rejected").filter(
        (pl.col("applicant_id") == 5) & pl.col("is_current")
    )
    assert current["credit_score"].to_list() == [7]
    assert current["_rule"].to_list() == ["credit_score_range"]
    assert current["valid_from"].to_list() == history["valid_to"].to_list()
    # Its application is no longer in silver either: its applicant is not.
    gone = read(storage, "silver", "loan_applications").filter(pl.col("applicant_id") == 5)
    assert gone.height == 0
    held = read(storage, "silver", "loan_applications_rejected").filter(
        (pl.col("applicant_id") == 5) & pl.col("is_current")
    )
    assert held["_rule"].to_list() == ["applicant_exists"]
    applicants, loans = expected(settings)
    assert_same_rows(read(storage, "silver", "applicants"), applicants, "applicant_id")
    assert_same_rows(read(storage, "silver", "loan_applications"), loans, "application_id")
    # Fixed again: both come back.
    execute(settings, "UPDATE {s}.applicants SET credit_score = 700 WHERE applicant_id = 5")
    run_silver(settings, storage)
    assert 5 in read(storage, "silver", "loan_applications")["applicant_id"].to_list()
    applicants, loans = expected(settings)
    assert_same_rows(read(storage, "silver", "loan_applications"), loans, "application_id")


# Rule and ordering semantics, the same on any storage: local disk only (CI time).
@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_a_truncate_reaches_silver_through_batch_extraction(settings: Settings) -> None:
    """TRUNCATE fires no row trigger: a statement trigger leaves a marker batch runs see."""
    storage = seeded(settings, rows=80)
    run_silver(settings, storage)
    execute(settings, "TRUNCATE {s}.loan_applications")
    churn(settings, changes=60, seed_value=4)  # new applications after it
    run_silver(settings, storage)
    tombstones = read(storage, "bronze", "loan_applications").filter(pl.col("_op") == "truncate")
    assert tombstones.height == 1
    _, loans = expected(settings)
    assert_same_rows(read(storage, "silver", "loan_applications"), loans, "application_id")
    history = read(storage, "silver", "loan_applications_history")
    seeded_keys = history.filter(pl.col("application_id") <= 80)
    assert seeded_keys["valid_to"].null_count() == 0  # every version before it is closed


# Rule and ordering semantics, the same on any storage: local disk only (CI time).
@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_a_key_change_removes_the_old_key_in_batch_runs(settings: Settings) -> None:
    """An UPDATE of the key fires no delete trigger: a key trigger leaves the tombstone."""
    storage = seeded(settings, rows=300)
    run_silver(settings, storage)
    rejected = read(storage, "silver", "applicants_rejected")["applicant_id"].to_list()
    execute(
        settings,
        "DELETE FROM {s}.loan_applications WHERE applicant_id IN (%s, %s)"
        " OR applicant_id = ANY(%s)",
        290,
        291,
        rejected,
    )
    execute(
        settings,
        "UPDATE {s}.applicants SET applicant_id = applicant_id + 100000"
        " WHERE applicant_id IN (%s, %s) OR applicant_id = ANY(%s)",
        290,
        291,
        rejected,
    )
    run_silver(settings, storage)
    applicants, _ = expected(settings)
    assert_same_rows(read(storage, "silver", "applicants"), applicants, "applicant_id")
    now = read(storage, "silver", "applicants_rejected").filter(pl.col("is_current"))
    assert sorted(now["applicant_id"]) == sorted(k + 100000 for k in rejected)


@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_applicant_tables_made_anew_are_a_new_context(settings: Settings) -> None:
    """Troubleshooting's advice, deleting a table's three silver tables and running
    again, starts their versions over. Loan applications record the applicant tables'
    versions their rules were checked against: the same numbers on the new tables must
    not pass for the same state. Here an applicant turns bad while its tables are made
    anew; its applications must leave silver."""
    import shutil

    storage = seeded(settings, rows=100)
    run_silver(settings, storage)
    execute(settings, "UPDATE {s}.applicants SET credit_score = 7 WHERE applicant_id = 5")
    bronze.ingest(settings, storage, "applicants")
    for name in ("applicants", "applicants_history", "applicants_rejected"):
        shutil.rmtree(storage.uri("silver", name))
    run_silver(settings, Storage.from_settings(settings))
    gone = read(storage, "silver", "loan_applications").filter(pl.col("applicant_id") == 5)
    assert gone.height == 0
    applicants, loans = expected(settings)
    assert_same_rows(read(storage, "silver", "applicants"), applicants, "applicant_id")
    assert_same_rows(read(storage, "silver", "loan_applications"), loans, "application_id")
