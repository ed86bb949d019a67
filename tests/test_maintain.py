import re

import polars as pl
import pytest

from lakehouse import sql
from lakehouse.errors import TableNotFoundError
from lakehouse.maintain import maintain
from lakehouse.settings import Settings
from tests.helpers import churn, read, run_all, seeded


def test_maintain_compacts_and_keeps_time_travel(settings: Settings) -> None:
    storage = seeded(settings, rows=100)
    run_all(settings, storage, with_gold=False)
    for i in range(3):
        churn(settings, changes=60, seed_value=40 + i)
        run_all(settings, storage, with_gold=False)
    before = read(storage, "bronze", "applicants")
    files_before = len(storage.table("bronze", "applicants").file_uris())
    assert files_before == 4
    v0 = sql.run_query(
        settings, storage, "SELECT count(*) FROM bronze.applicants", as_of_version=0
    ).rows

    results = {r.table: r for r in maintain(storage, retention_hours=168)}

    bronze_result = results["bronze.applicants"]
    assert bronze_result.files_removed == 4 and bronze_result.files_added == 1
    after = read(storage, "bronze", "applicants")
    assert len(storage.table("bronze", "applicants").file_uris()) == 1
    key = ["_batch_id", "applicant_id", "_op"]
    assert after.sort(key).equals(before.sort(key))
    # Old versions are still readable: vacuum kept the files inside the retention window.
    assert (
        sql.run_query(
            settings, storage, "SELECT count(*) FROM bronze.applicants", as_of_version=0
        ).rows
        == v0
    )
    # Progress recorded in the log survives compaction: nothing is re-promoted.
    from lakehouse.zones import silver

    assert silver.is_current(storage, "applicants")
    assert (
        pl.read_delta(storage.uri("silver", "applicants"), storage_options=storage.options).height
        > 0
    )


def test_vacuum_with_zero_retention_removes_old_files(base_settings: Settings) -> None:
    storage = seeded(base_settings, rows=50)
    run_all(base_settings, storage, with_gold=False)
    churn(base_settings, changes=40)
    run_all(base_settings, storage, with_gold=False)
    results = {r.table: r for r in maintain(storage, retention_hours=0)}
    assert results["bronze.applicants"].vacuumed == 2  # the two pre-compaction files
    # Time travel to a version whose files are gone says so (issue 14: an IO Error).
    with pytest.raises(
        TableNotFoundError, match=re.escape("has no version 0: `lakehouse maintain`")
    ):
        sql.run_query(
            base_settings, storage, "SELECT count(*) FROM bronze.applicants", as_of_version=0
        )


def test_maintain_beside_pipeline_runs_loses_nothing(settings: Settings) -> None:
    """README: `lakehouse maintain` is safe beside running pipelines as long as the
    retention is longer than a run. It loops while `lakehouse run` (the Luigi pipeline:
    completion checks, ingest, promotions, gold, the run record) runs: every writer either
    lands or says it lost (nothing half-written), the run is recorded, and
    afterwards silver equals the source and gold is current."""
    from lakehouse import runs
    from lakehouse.errors import LakehouseError
    from lakehouse.transforms.gold import GOLD
    from lakehouse.zones import gold_marks
    from tests.test_ops import service
    from tests.zones.test_silver import assert_same_rows, expected

    storage = seeded(settings, rows=150)
    run_all(settings, storage)
    churn(settings, changes=60, seed_value=70)
    maintained = 0
    with service(settings, "run", "--no-ml") as runner:
        while runner.poll() is None:
            try:
                # An hour of retention keeps every file a running promotion may still read;
                # with 0, a vacuum removes them under it (Delta's reason for retention).
                maintain(storage, retention_hours=1)
                maintained += 1
            except LakehouseError as exc:
                assert "the table is unchanged: rerun `lakehouse maintain`" in str(exc), exc
        _, err = runner.communicate()
    assert maintained >= 1
    outcome = "ran" if runner.returncode == 0 else "failed"
    if runner.returncode != 0:  # a writer that lost a race says so, and what to do
        assert runner.returncode == 1, err
        assert "rerun" in err or "landed nothing" in err, err
    # The run is recorded, though maintain compacted `_meta.pipeline_runs` meanwhile.
    assert [r.outcome for r in runs.recent(storage)] == [outcome]
    run_all(settings, storage)  # what a lost race left behind, the next run takes in
    applicants, loans = expected(settings)
    assert_same_rows(read(storage, "silver", "applicants"), applicants, "applicant_id")
    assert_same_rows(read(storage, "silver", "loan_applications"), loans, "application_id")
    assert all(gold_marks.is_current(storage, name) for name in GOLD)
