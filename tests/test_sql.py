import json
import re
from pathlib import Path

import duckdb
import pytest

from lakehouse import sql
from lakehouse.errors import SqlError, TableNotFoundError
from lakehouse.settings import Settings
from lakehouse.storage import Storage
from tests.helpers import churn, read, run_all, seeded


@pytest.fixture
def lake(settings: Settings) -> Storage:
    storage = seeded(settings, rows=120)
    run_all(settings, storage)
    return storage


def test_views_over_every_zone(settings: Settings, lake: Storage) -> None:
    result = sql.run_query(
        settings,
        lake,
        "SELECT (SELECT count(*) FROM bronze.applicants) AS b,"
        " (SELECT count(*) FROM silver.applicants) AS s,"
        " (SELECT count(*) FROM gold.application_features) AS g",
    )
    assert result.columns == ["b", "s", "g"]
    assert result.rows == [
        (
            read(lake, "bronze", "applicants").height,
            read(lake, "silver", "applicants").height,
            read(lake, "gold", "application_features").height,
        )
    ]


def test_time_travel_reads_an_old_version(settings: Settings, lake: Storage) -> None:
    before = read(lake, "silver", "loan_applications").height
    churn(settings, changes=200)
    run_all(settings, lake)
    assert lake.table("silver", "loan_applications").version() >= 2
    # Version 0 is the table's creation (empty), version 1 its first load.
    empty = sql.run_query(
        settings, lake, "SELECT count(*) FROM silver.loan_applications", as_of_version=0
    )
    assert empty.rows == [(0,)]
    old = sql.run_query(
        settings, lake, "SELECT count(*) FROM silver.loan_applications", as_of_version=1
    )
    new = sql.run_query(settings, lake, "SELECT count(*) FROM silver.loan_applications")
    assert old.rows == [(before,)]
    assert new.rows == [(read(lake, "silver", "loan_applications").height,)]
    assert old.rows != new.rows


def test_time_travel_to_a_missing_version(settings: Settings, lake: Storage) -> None:
    with pytest.raises(
        TableNotFoundError,
        match=re.escape("table `silver.applicants` has no version 9: its latest version is 1"),
    ):
        sql.run_query(settings, lake, "SELECT * FROM silver.applicants", as_of_version=9)


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO silver.applicants SELECT * FROM silver.applicants",
        "DELETE FROM silver.applicants",
        "UPDATE silver.applicants SET credit_score = 0",
        "CREATE TABLE x AS SELECT 1",
        "DROP VIEW silver.applicants",
        "COPY (SELECT 1) TO '/tmp/lakehouse-should-not-exist.csv'",
        "ATTACH '/tmp/other.duckdb'",
        "INSTALL spatial",
        "SET threads = 1",
        # EXPLAIN ANALYZE runs what it explains (issue 14: it wrote a file, and a forged
        # Delta log entry emptied a gold table).
        "EXPLAIN ANALYZE COPY (SELECT 42) TO 'x.csv'",
        "EXPLAIN ANALYSE DELETE FROM silver.applicants",
        "explain /* c */ analyze COPY (SELECT 42) TO 'x.csv'",
        "EXPLAIN COPY (SELECT 42) TO 'x.csv'",
        "CHECKPOINT",
        "PIVOT silver.applicants ON person_gender USING count(*); DROP VIEW silver.applicants",
    ],
)
def test_writes_are_refused(statement: str) -> None:
    with pytest.raises(
        SqlError,
        match=r"^(`lakehouse sql` is read-only: a \w+ statement is not allowed|give exactly one)",
    ):
        sql.check_read_only(statement)


def test_the_connection_reads_the_warehouse_and_nothing_else(
    settings: Settings, lake: Storage, tmp_path: Path
) -> None:
    """Read-only by construction: even a statement the check let through could not read
    or write a file outside the warehouse, load an extension or unlock the settings."""
    secret = tmp_path / "secret.txt"
    secret.write_text("password\n")
    con, _ = sql.open_views(settings, lake)
    try:
        for statement in (
            f"SELECT * FROM read_csv('{secret}')",
            "SELECT * FROM read_text('/etc/passwd')",
            "SELECT * FROM glob('/etc/*')",
            f"COPY (SELECT 42) TO '{tmp_path / 'out.csv'}'",
            "SET enable_external_access = true",
            "SET lock_configuration = false",
            "INSTALL json",
        ):
            with pytest.raises(duckdb.Error):
                con.execute(statement).fetchall()
        assert con.execute("SELECT count(*) FROM silver.applicants").fetchone()[0] > 0  # type: ignore[index]
    finally:
        con.close()
    assert not (tmp_path / "out.csv").exists()


# Local disk only (CI time): the SQL front end (statement checks, errors, rendering) is the same
# whatever the storage; S3 reads are the views and time-travel tests.
@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_read_only_queries_that_are_not_plain_selects(settings: Settings, lake: Storage) -> None:
    pivot = sql.run_query(
        settings,
        lake,
        "PIVOT (SELECT person_gender FROM silver.applicants) ON person_gender USING count(*)",
    )
    assert sorted(pivot.columns) == ["female", "male"]
    assert sum(pivot.rows[0]) == read(lake, "silver", "applicants").height
    plan = sql.run_query(
        settings, lake, "EXPLAIN ANALYZE SELECT count(*) FROM gold.applicant_features"
    )
    assert plan.rows
    with pytest.raises(SqlError, match="Permission Error"):
        sql.run_query(settings, lake, "SELECT * FROM read_csv('/etc/passwd')")


# Local disk only (CI time): the SQL front end (statement checks, errors, rendering) is the same
# whatever the storage; S3 reads are the views and time-travel tests.
@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_writes_are_refused_before_touching_tables(settings: Settings, lake: Storage) -> None:
    version = lake.table("silver", "applicants").version()
    with pytest.raises(
        SqlError,
        match=re.escape(
            "`lakehouse sql` is read-only: a DELETE statement is not allowed; use SELECT"
        ),
    ):
        sql.run_query(settings, lake, "DELETE FROM silver.applicants")
    with pytest.raises(SqlError, match=re.escape("give exactly one statement, not 2")):
        sql.run_query(settings, lake, "SELECT 1; DELETE FROM silver.applicants")
    assert lake.table("silver", "applicants").version() == version
    assert read(lake, "silver", "applicants").height > 0


# Local disk only (CI time): the SQL front end (statement checks, errors, rendering) is the same
# whatever the storage; S3 reads are the views and time-travel tests.
@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_syntax_and_unknown_table_errors(settings: Settings, lake: Storage) -> None:
    with pytest.raises(SqlError, match=re.escape("SQL error: Binder Error")):
        sql.run_query(settings, lake, "SELECT no_such_column FROM silver.applicants")
    with pytest.raises(
        SqlError, match=re.escape('SQL syntax error: Parser Error: syntax error at or near "SELEC"')
    ):
        sql.run_query(settings, lake, "SELEC 1")
    with pytest.raises(
        TableNotFoundError,
        match=re.escape(
            "unknown table `silver.nope`; tables are named zone.table (bronze., silver., gold.)"
        ),
    ):
        sql.run_query(settings, lake, "SELECT * FROM silver.nope")


# Local disk only (CI time): the SQL front end (statement checks, errors, rendering) is the same
# whatever the storage; S3 reads are the views and time-travel tests.
@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_render_formats(settings: Settings, lake: Storage) -> None:
    result = sql.run_query(
        settings,
        lake,
        "SELECT applicant_id, person_gender, updated_at "
        "FROM silver.applicants ORDER BY applicant_id LIMIT 2",
    )
    table = sql.render(result)
    lines = table.splitlines()
    assert lines[0].split(" | ")[0].strip() == "applicant_id"
    assert lines[-1] == "(2 rows)"
    assert len({len(line) for line in lines[2:4]}) == 1  # aligned
    csv = sql.render(result, "csv").splitlines()
    assert csv[0] == "applicant_id,person_gender,updated_at"
    assert len(csv) == 3
    records = [json.loads(line) for line in sql.render(result, "json").splitlines()]
    assert [r["applicant_id"] for r in records] == [row[0] for row in result.rows]
    assert records[0]["updated_at"].endswith("+00:00")
    assert sql.render(result, max_rows=1).splitlines()[-1] == "(2 rows, 1 shown)"


# Local disk only (CI time): the SQL front end (statement checks, errors, rendering) is the same
# whatever the storage; S3 reads are the views and time-travel tests.
@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_json_needs_distinct_column_names(settings: Settings, lake: Storage) -> None:
    result = sql.run_query(settings, lake, "SELECT 1 AS a, 2 AS a")
    assert sql.render(result, "csv") == "a,a\n1,2\n"
    with pytest.raises(SqlError, match=re.escape("column `a` appears twice in the result")):
        sql.render(result, "json")
