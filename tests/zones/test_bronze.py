import polars as pl
import psycopg
import pytest
from psycopg import sql

from lakehouse.errors import SourceError
from lakehouse.settings import Settings
from lakehouse.zones import bronze
from tests.helpers import churn, read, seeded, source_frame


def test_snapshot_carries_lineage(settings: Settings) -> None:
    storage = seeded(settings, rows=250)
    result = bronze.ingest(settings, storage, "applicants")
    assert (result.mode, result.rows, result.deletes) == ("snapshot", 250, 0)
    rows = read(storage, "bronze", "applicants")
    assert rows.height == 250
    assert rows["_op"].unique().to_list() == ["upsert"]
    assert rows["_batch_id"].unique().to_list() == [result.batch_id]
    assert rows["_extract_mode"].unique().to_list() == ["snapshot"]
    assert rows["_ingested_at"].null_count() == 0
    # The batch id is the WAL position of the extraction's snapshot; the watermark is the
    # snapshot's xmin, above every transaction that wrote a row of the batch.
    assert rows["_source_lsn"].unique().to_list() == [result.batch_id]
    assert bronze.last_batch(storage, "applicants") == result.batch_id
    watermark = bronze.watermark(storage, "applicants")
    assert watermark is not None
    assert (rows["_source_xid"] < watermark).all()
    # The values are the source's, column by column.
    src = source_frame(settings, f'SELECT * FROM "{settings.pg_schema}".applicants')
    cols = [c for c in src.columns if c != "updated_xid"]
    assert (
        rows.select(cols)
        .sort("applicant_id")
        .equals(src.select(cols).sort("applicant_id").cast(dict(rows.select(cols).schema)))
    )


def test_incremental_takes_updates_inserts_and_deletes_once(settings: Settings) -> None:
    storage = seeded(settings, rows=200)
    bronze.ingest(settings, storage, "loan_applications")
    first = bronze.watermark(storage, "loan_applications")
    assert first is not None
    churn(settings, changes=300)
    second = bronze.ingest(settings, storage, "loan_applications")
    assert second.mode == "incremental"
    assert second.rows > 0 and second.deletes > 0
    rows = read(storage, "bronze", "loan_applications")
    new = rows.filter(pl.col("_batch_id") == second.batch_id)
    assert new.height == second.rows + second.deletes
    assert new["_source_xid"].min() >= first  # type: ignore[operator]
    # Every delete in the source shows up once, as a key-only tombstone.
    deleted = source_frame(
        settings,
        f'SELECT row_id FROM "{settings.pg_schema}".deleted_rows '
        "WHERE table_name = 'loan_applications'",
    )
    tombstones = new.filter(pl.col("_op") == "delete")
    assert sorted(tombstones["application_id"].to_list()) == sorted(deleted["row_id"].to_list())
    assert tombstones["loan_amnt"].null_count() == tombstones.height
    # Nothing new: no commit, same version.
    version = storage.table("bronze", "loan_applications").version()
    assert bronze.is_current(settings, storage, "loan_applications")
    assert bronze.ingest(settings, storage, "loan_applications").batch_id is None
    assert storage.table("bronze", "loan_applications").version() == version


def test_open_transaction_is_not_skipped_by_the_watermark(settings: Settings) -> None:
    """A row written before the fence but committed after it must still arrive, once."""
    storage = seeded(settings, rows=50)
    bronze.ingest(settings, storage, "applicants")
    table = sql.Identifier(settings.pg_schema, "applicants")
    with psycopg.connect(settings.pg_dsn.get()) as writer:
        writer.execute(
            sql.SQL("UPDATE {} SET credit_score = 701 WHERE applicant_id = 1").format(table)
        )
        # Uncommitted: the ingest must not move its watermark past this row's timestamp.
        churn(settings, changes=50)
        during = bronze.ingest(settings, storage, "applicants")
        writer.commit()
    after = bronze.ingest(settings, storage, "applicants")
    rows = read(storage, "bronze", "applicants")
    updates = rows.filter((pl.col("applicant_id") == 1) & (pl.col("credit_score") == 701))
    assert updates.height == 1
    assert updates["_batch_id"].to_list() == [after.batch_id]
    assert during.batch_id is None or during.batch_id < after.batch_id


def test_rows_dated_in_the_past_or_future_are_taken_once(settings: Settings) -> None:
    """Issue 13, reproduction 6: batches were chosen by `updated_at`.

    A row inserted with an old `updated_at` was never extracted; one dated 2100 was never
    extracted either, and kept every run from reaching "nothing to do".
    """
    storage = seeded(settings, rows=20)
    bronze.ingest(settings, storage, "applicants")
    table = sql.Identifier(settings.pg_schema, "applicants")
    with psycopg.connect(settings.pg_dsn.get(), autocommit=True) as conn:
        for key, when in ((901, "2020-01-01 00:00+00"), (902, "2100-01-01 00:00+00")):
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (applicant_id, person_age, updated_at) VALUES (%s, 30, %s)"
                ).format(table),
                (key, when),
            )
    assert not bronze.is_current(settings, storage, "applicants")
    taken = bronze.ingest(settings, storage, "applicants")
    assert taken.rows == 2
    assert bronze.is_current(settings, storage, "applicants")
    assert bronze.ingest(settings, storage, "applicants").batch_id is None
    rows = read(storage, "bronze", "applicants")
    assert sorted(rows.filter(pl.col("applicant_id") > 900)["applicant_id"]) == [901, 902]


def test_a_second_ingest_waits_for_the_first(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = seeded(settings, rows=20)
    monkeypatch.setattr(bronze, "LOCK_WAIT_SECONDS", 1.0)
    with psycopg.connect(settings.pg_dsn.get(), autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(hashtext('lakehouse.bronze.applicants'))")
        with pytest.raises(
            SourceError,
            match="another ingest of `applicants` has been running for over 1s; wait for it",
        ):
            bronze.ingest(settings, storage, "applicants")
    # Released: the ingest goes through.
    assert bronze.ingest(settings, storage, "applicants").rows == 20


def test_extraction_streams_in_bounded_batches(base_settings: Settings) -> None:
    from dataclasses import replace

    from lakehouse.source import extract, schema

    settings = replace(base_settings, batch_rows=1)  # smallest buffer: many slices
    seeded(settings, rows=3000)
    with schema.connect(settings) as conn, extract.snapshot(conn) as snap:
        sizes = [
            f.num_rows
            for f in extract.extract_batches(
                conn,
                settings.pg_schema,
                schema.TABLES["applicants"],
                extract.Window(None, snap.xmin),
                batch_rows=settings.batch_rows,
                lsn=snap.lsn,
            )
        ]
    assert sum(sizes) == 3000
    assert len(sizes) > 3 and max(sizes) < 3000


def test_a_write_that_fails_mid_extraction_stops_the_read_ahead_and_lands_nothing(
    base_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The COPY is read ahead in a thread; a writer that fails part way must leave no
    thread reading the connection past its snapshot, and the next run takes every row."""
    import threading
    from dataclasses import replace

    settings = replace(base_settings, batch_rows=1)  # many slices: the COPY is mid-way
    storage = seeded(settings, rows=3000)
    real_append = bronze._append

    def failing_append(*args: object, **kwargs: object) -> None:
        batches = args[3]
        next(batches)  # type: ignore[call-overload]
        raise RuntimeError("the disk is full")

    monkeypatch.setattr(bronze, "_append", failing_append)
    with pytest.raises(RuntimeError, match="disk is full"):
        bronze.ingest(settings, storage, "applicants")
    assert not [t for t in threading.enumerate() if t.name == "read-ahead"]
    assert storage.table_or_none("bronze", "applicants") is None
    monkeypatch.setattr(bronze, "_append", real_append)
    result = bronze.ingest(settings, storage, "applicants")
    assert (result.mode, result.rows) == ("snapshot", 3000)
    assert read(storage, "bronze", "applicants")["applicant_id"].n_unique() == 3000


def test_text_with_quotes_and_newlines_survives(base_settings: Settings) -> None:
    storage = seeded(base_settings, rows=5)
    weird = 'a "quoted",\nmulti-line value'
    with psycopg.connect(base_settings.pg_dsn.get(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("UPDATE {} SET person_education = %s WHERE applicant_id = 2").format(
                sql.Identifier(base_settings.pg_schema, "applicants")
            ),
            (weird,),
        )
        conn.execute(
            sql.SQL("UPDATE {} SET person_gender = '' WHERE applicant_id = 3").format(
                sql.Identifier(base_settings.pg_schema, "applicants")
            )
        )
    bronze.ingest(base_settings, storage, "applicants")
    rows = read(storage, "bronze", "applicants").sort("applicant_id")
    assert rows.filter(pl.col("applicant_id") == 2)["person_education"].to_list() == [weird]
    assert rows.filter(pl.col("applicant_id") == 3)["person_gender"].to_list() == [""]
