"""Materializing after `maintain` vacuumed the gold version the last materialization saw."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl
import pytest

from lakehouse.maintain import maintain
from lakehouse.ml import features
from lakehouse.ml import tasks as ml_tasks
from lakehouse.settings import Settings
from tests.helpers import insert_late_application, read, run_all, seeded

GOLD = ("application_features", "applicant_features")


@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_a_vacuumed_gold_version_reloads_the_online_store_in_full(settings: Settings) -> None:
    """README, *Materialization*: later runs write the entities whose gold rows changed
    since the last materialization, found by comparing each table with its version then;
    if that version was vacuumed, everything is reloaded. A row applied for long before the
    last window reaches gold after it; `maintain --retention-hours 0` removes the old
    version; the online store must then hold that row, and every application gold holds."""
    storage = seeded(settings, rows=50)
    run_all(settings, storage)
    ml_tasks.materialize(settings, storage)
    seen = {name: storage.table("gold", name).version() for name in GOLD}
    late = insert_late_application(settings)  # years before the last window
    run_all(settings, storage)
    maintain(storage, retention_hours=0)
    for name, version in seen.items():  # the versions the last materialization saw are gone
        assert storage.table("gold", name).version() > version
        with pytest.raises(Exception, match=r"(?i)not found|no such file"):
            pl.read_delta(storage.uri("gold", name), version=version)

    ml_tasks.materialize(settings, storage)

    gold = read(storage, "gold", "application_features")
    now = datetime.now(UTC).replace(tzinfo=None)
    due = gold.filter(pl.col("event_timestamp").dt.replace_time_zone(None) <= now)
    latest = due.sort("event_timestamp").group_by("application_id").last().sort("application_id")
    assert late in latest["application_id"].to_list()
    names = ["loan_amnt", "credit_score", "person_income"]
    store = features.feature_store(settings, storage)
    online = store.get_online_features(
        features=[f"application_features:{n}" for n in names],
        entity_rows=[{"application_id": int(i)} for i in latest["application_id"]],
    ).to_dict()
    assert online["application_id"] == latest["application_id"].to_list()
    for name in names:
        assert online[name] == latest[name].to_list(), name
    at = latest["application_id"].to_list().index(late)
    assert online["loan_amnt"][at] == 1234.5


def _online_rows(settings: Settings) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every online table (key, time, values), sorted.

    Not the silver state a row was written from: an entity an incremental run did not
    touch keeps the older one.
    """
    import sqlite3

    from lakehouse.ml import online

    with sqlite3.connect(online.sqlite_path(settings)) as conn:
        return {
            view: sorted(
                conn.execute(
                    f'SELECT entity_key, event_ts, "values" FROM "lakehouse__{view}"'
                ).fetchall()
            )
            for view in online.VIEWS
        }


def _changed(before: pl.DataFrame, after: pl.DataFrame, key: str) -> tuple[int, int]:
    """Count entities whose latest row differs, and entities with any row that differs."""

    def latest(frame: pl.DataFrame) -> pl.DataFrame:
        return frame.sort("event_timestamp").group_by(key).last()

    def keys(a: pl.DataFrame, b: pl.DataFrame) -> set[object]:
        return set(a.join(b, on=a.columns, how="anti", nulls_equal=True)[key].to_list())

    latest_changed = keys(latest(after), latest(before)) | keys(latest(before), latest(after))
    any_changed = keys(after, before) | keys(before, after)
    return len(latest_changed), len(any_changed)


@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_an_incremental_materialization_writes_only_the_entities_that_changed(
    settings: Settings,
) -> None:
    """Issue 16: after a few source changes, materialization rewrites the entities whose
    gold rows changed (at least those whose latest row did), not the store; it removes an
    application deleted in the source; and the store then equals a full reload."""
    import psycopg

    from lakehouse.ml import online

    storage = seeded(settings, rows=400)
    run_all(settings, storage)
    first = ml_tasks.materialize(settings, storage)
    assert all(w.full for w in first.views)
    total = {w.view: w.upserted for w in first.views}
    gold_before = {name: read(storage, "gold", name) for name in GOLD}

    late = insert_late_application(settings)
    with psycopg.connect(settings.pg_dsn.get(), autocommit=True) as conn:
        s = settings.pg_schema
        (gone,) = conn.execute(
            f'SELECT max(application_id) FROM "{s}".loan_applications WHERE application_id <> %s',
            (late,),
        ).fetchone()  # type: ignore[misc]
        conn.execute(f'DELETE FROM "{s}".loan_applications WHERE application_id = %s', (gone,))
        conn.execute(
            f'UPDATE "{s}".applicants SET person_income = person_income + 1, '
            f"updated_at = now() WHERE applicant_id IN (SELECT applicant_id FROM "
            f'"{s}".applicants ORDER BY applicant_id LIMIT 2)'
        )
    run_all(settings, storage)
    second = ml_tasks.materialize(settings, storage)
    written = {w.view: w for w in second.views}
    assert not any(w.full for w in second.views)

    apps_after = read(storage, "gold", "application_features")
    people_after = read(storage, "gold", "applicant_features")
    lo, hi = _changed(gold_before["application_features"], apps_after, "application_id")
    app = written["application_features"]
    assert lo - 1 <= app.upserted <= hi  # the deleted one is removed, not written
    assert app.deleted == 1 and gone not in apps_after["application_id"].to_list()
    assert 1 <= app.upserted < total["application_features"] / 10
    lo, hi = _changed(gold_before["applicant_features"], people_after, "applicant_id")
    for view in ("applicant_features", "applicant_profile"):
        assert 3 <= written[view].upserted <= hi, view  # two updated, one applied again
        assert written[view].upserted < total[view] / 10

    incremental = _online_rows(settings)
    assert gone not in {row[0] for row in incremental["application_features"]}
    assert late in {row[0] for row in incremental["application_features"]}
    path = online.sqlite_path(settings)
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    assert all(w.full for w in ml_tasks.materialize(settings, storage).views)
    assert _online_rows(settings) == incremental


@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_silver_made_anew_reloads_the_online_store(settings: Settings) -> None:
    """An online row carries the silver state it was computed from (a sum of silver
    versions), and never replaces a row from a newer state. Silver tables deleted and
    promoted again (Troubleshooting's advice) count their versions from 0: every row
    computed from them looks older than the rows the store holds. The materialization
    after must still leave exactly what a full load into an empty store does."""
    import shutil

    from lakehouse.ml import online
    from lakehouse.source import schema
    from lakehouse.storage import Storage
    from lakehouse.zones import bronze

    storage = seeded(settings, rows=50)

    def bump(where: str) -> None:
        with schema.connect(settings, autocommit=True) as conn:
            conn.execute(
                f'UPDATE "{settings.pg_schema}".applicants SET credit_score = credit_score + 1,'
                f" updated_at = now() WHERE {where}"
            )

    run_all(settings, storage)
    for i in range(4):  # the applicant tables reach higher versions
        bump(f"applicant_id % 4 = {i}")
        run_all(settings, storage)
    ml_tasks.materialize(settings, storage)
    bump("true")
    bronze.ingest(settings, storage, "applicants")
    for name in ("applicants", "applicants_history", "applicants_rejected"):
        shutil.rmtree(storage.uri("silver", name))
    again = Storage.from_settings(settings)
    run_all(settings, again)
    ml_tasks.materialize(settings, again)
    after = _online_rows(settings)

    path = online.sqlite_path(settings)
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    assert all(w.full for w in ml_tasks.materialize(settings, again).views)
    assert after == _online_rows(settings)
