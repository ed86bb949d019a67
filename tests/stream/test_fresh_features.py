"""`lakehouse stream --promote` keeps the online features fresh, equal to the batch's.

Issue 16: every micro-batch that changes silver also recomputes the gold feature rows of
the entities it touches and writes them to the online store. Gold stays the batch's: after
the stream has run, the next batch run and a full materialization into an empty store
must give exactly the rows the stream left (every view, every entity, value for value).
"""

from __future__ import annotations

import sqlite3
from dataclasses import replace

import psycopg
import pytest

from lakehouse.ml import features, fresh
from lakehouse.ml import online as online_store
from lakehouse.ml import status as ml_status
from lakehouse.ml import tasks as ml_tasks
from lakehouse.settings import Settings
from lakehouse.source import schema
from lakehouse.source.simulate import simulate
from stream import setup
from tests.helpers import insert_late_application, run_all, seeded
from tests.stream.helpers import stream_settings, stream_while


def _online_rows(settings: Settings) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every view, as stored (SQLite file, or the Postgres schema)."""
    query = 'SELECT entity_key, event_ts, "values" FROM {}'
    if settings.feast_online_store == "postgres":
        with psycopg.connect(settings.pg_dsn.get()) as pg:
            return {
                view: sorted(
                    pg.execute(
                        query.format(f'"{_online_schema(settings)}"."lakehouse__{view}"')
                    ).fetchall()
                )
                for view in online_store.VIEWS
            }
    with sqlite3.connect(online_store.sqlite_path(settings)) as conn:
        return {
            view: sorted(conn.execute(query.format(f'"lakehouse__{view}"')).fetchall())
            for view in online_store.VIEWS
        }


def _online_schema(settings: Settings) -> str:
    return f"{settings.pg_schema}_online"


def _empty_online_store(settings: Settings) -> None:
    if settings.feast_online_store == "postgres":
        with psycopg.connect(settings.pg_dsn.get(), autocommit=True) as pg:
            pg.execute(f'DROP SCHEMA IF EXISTS "{_online_schema(settings)}" CASCADE')
        return
    path = online_store.sqlite_path(settings)
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)


@pytest.mark.parametrize("settings", ["local"], indirect=True)
@pytest.mark.parametrize("online", ["sqlite", "postgres"])
def test_online_rows_written_by_the_stream_equal_the_batch_materialization(
    settings: Settings, online: str
) -> None:
    settings = replace(stream_settings(settings), feast_online_store=online)
    try:
        _stream_then_batch(settings)
    finally:
        if online == "postgres":
            _empty_online_store(settings)


def _stream_then_batch(settings: Settings) -> None:
    storage = seeded(settings, rows=300)
    run_all(settings, storage)
    ml_tasks.materialize(settings, storage)
    before = _online_rows(settings)
    setup.setup(settings, storage)
    s = settings.pg_schema
    late: list[int] = []

    def work() -> None:
        with schema.connect(settings, autocommit=True) as conn:
            simulate(conn, s, changes=120, batch_size=10, seed=21)
            conn.execute(
                f'UPDATE "{s}".applicants SET credit_score = credit_score + 1, updated_at = now() '
                f'WHERE applicant_id IN (SELECT applicant_id FROM "{s}".applicants '
                "ORDER BY applicant_id LIMIT 3)"
            )
            conn.execute(
                f'DELETE FROM "{s}".loan_applications WHERE application_id = '
                f'(SELECT max(application_id) FROM "{s}".loan_applications)'
            )
        late.append(insert_late_application(settings, loan_amnt=4321.0))  # a backfill

    stream_while(settings, storage, work, promote=True)
    refreshed = fresh.last(settings)
    assert refreshed is not None
    freshness = ml_status.online_freshness(settings, storage, materialized=False)
    assert freshness["online_current_with_silver"], freshness
    assert freshness["online_behind_silver_seconds"] == 0
    streamed = _online_rows(settings)
    assert streamed != before
    # Read through Feast: the backfilled application, written by the stream only.
    store = features.feature_store(settings, storage)
    online = store.get_online_features(
        features=["application_features:loan_amnt"], entity_rows=[{"application_id": late[0]}]
    ).to_dict()
    assert online["loan_amnt"] == [4321.0]

    # The batch: gold built whole from the same silver, then a full load into an empty store.
    run_all(settings, storage, full_gold=True)
    assert ml_status.online_freshness(settings, storage, materialized=False)[
        "online_current_with_silver"
    ]  # the batch run found nothing new in silver
    _empty_online_store(settings)
    assert all(w.full for w in ml_tasks.materialize(settings, storage).views)
    batch = _online_rows(settings)
    for view in online_store.VIEWS:
        assert len(streamed[view]) == len(batch[view]), view
        assert streamed[view] == batch[view], view

    # Changes the stream lands without --promote, promoted by the batch: silver moves on
    # without a refresh, and status says how far behind the online store is.
    def more() -> None:
        with schema.connect(settings, autocommit=True) as conn:
            simulate(conn, s, changes=10, batch_size=10, seed=22)

    stream_while(settings, storage, more)
    run_all(settings, storage, with_gold=False)
    freshness = ml_status.online_freshness(settings, storage, materialized=False)
    assert not freshness["online_current_with_silver"]
    assert freshness["online_behind_silver_seconds"] > 0


@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_a_refresh_between_any_two_commits_of_a_promotion_misses_nothing(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The speed layer refreshes in its own thread while the next promotion commits its
    targets one by one (rejected, history, current). A refresh after any of those commits
    must not take half a promotion for a state (a new application in history but not yet
    in current), record it as reflected, and never come back to it: here a refresh runs
    after every single commit of two promotions, and the online store must end exactly
    as a full materialization of the same silver."""
    from lakehouse.zones import bronze, silver

    settings = stream_settings(settings)
    storage = seeded(settings, rows=200)
    run_all(settings, storage)
    ml_tasks.materialize(settings, storage)
    refresher = fresh.Refresher(settings, storage)
    assert refresher.refresh() is None  # starts from what gold was built from
    real_commit = silver._commit
    commits: list[str] = []

    def commit_then_refresh(*args: object, **kwargs: object) -> None:
        real_commit(*args, **kwargs)  # type: ignore[arg-type]
        commits.append(f"{args[1]}.{args[2]}")
        refresher.refresh()

    monkeypatch.setattr(silver, "_commit", commit_then_refresh)
    simulate_changes = 40
    with schema.connect(settings, autocommit=True) as conn:
        simulate(conn, settings.pg_schema, changes=simulate_changes, batch_size=10, seed=5)
    late = insert_late_application(settings, loan_amnt=2468.0)
    for table in ("applicants", "loan_applications"):
        bronze.ingest(settings, storage, table)
        silver.promote(storage, table)
    assert "loan_applications.history" in commits and "loan_applications.current" in commits
    refresher.refresh()
    streamed = _online_rows(settings)

    monkeypatch.setattr(silver, "_commit", real_commit)
    run_all(settings, storage, full_gold=True)  # gold from the same silver (nothing new to promote)
    _empty_online_store(settings)
    assert all(w.full for w in ml_tasks.materialize(settings, storage).views)
    batch = _online_rows(settings)
    assert any(row[0] == late for row in batch["application_features"])
    for view in online_store.VIEWS:
        assert streamed[view] == batch[view], view


@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_the_speed_layer_starts_afresh_after_silver_was_made_anew(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """The speed layer's first diff starts from the silver versions gold was built from.
    Silver tables deleted and promoted again count their versions anew: those numbers
    name states of the new tables, and a diff from them would miss what changed. It
    starts from now instead, and says the next batch run rebuilds gold."""
    import shutil

    from lakehouse.storage import Storage
    from lakehouse.zones import bronze, silver

    settings = stream_settings(settings)
    storage = seeded(settings, rows=100)
    run_all(settings, storage)
    ml_tasks.materialize(settings, storage)

    def bump(where: str) -> None:
        with schema.connect(settings, autocommit=True) as conn:
            conn.execute(
                f'UPDATE "{settings.pg_schema}".applicants SET credit_score = credit_score + 1,'
                f" updated_at = now() WHERE {where}"
            )
        bronze.ingest(settings, storage, "applicants")

    bump("applicant_id % 3 = 0")
    for name in ("applicants", "applicants_history", "applicants_rejected"):
        shutil.rmtree(storage.uri("silver", name))
    again = Storage.from_settings(settings)
    silver.promote(again, "applicants")
    bump("applicant_id = 2")  # the new tables move past the versions gold recorded
    silver.promote(again, "applicants")
    silver.promote(again, "loan_applications")
    refresher = fresh.Refresher(settings, again)
    with caplog.at_level("WARNING"):
        assert refresher.refresh() is None
    assert "made anew" in caplog.text

    # The batch rebuilds gold on the new tables and reloads the store; silver moves on
    # meanwhile. The refresher diffs again from gold's state: it writes what changed
    # since over the reloaded rows, and ends where a full load of the same silver does.
    run_all(settings, again)
    bump("applicant_id = 3")
    silver.promote(again, "applicants")
    refresher.refresh()
    ml_tasks.materialize(settings, again)
    assert refresher.refresh() is not None
    streamed = _online_rows(settings)
    run_all(settings, again, full_gold=True)
    _empty_online_store(settings)
    assert all(w.full for w in ml_tasks.materialize(settings, again).views)
    assert streamed == _online_rows(settings)
