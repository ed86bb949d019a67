"""`lakehouse stream --promote` keeps the online features fresh, equal to the batch's.

Issue 16: every micro-batch that changes silver also recomputes the gold feature rows of
the entities it touches and writes them to the online store. Gold stays the batch's: after
the stream has run, the next batch run and a full materialization into an empty store
must give exactly the rows the stream left (every view, every entity, value for value).
"""

from __future__ import annotations

import sqlite3

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
    with sqlite3.connect(online_store.sqlite_path(settings)) as conn:
        return {
            view: sorted(
                conn.execute(
                    f'SELECT entity_key, event_ts, "values" FROM "lakehouse__{view}"'
                ).fetchall()
            )
            for view in online_store.VIEWS
        }


@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_online_rows_written_by_the_stream_equal_the_batch_materialization(
    settings: Settings,
) -> None:
    settings = stream_settings(settings)
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

    # The batch: gold rebuilt from the same silver, then a full load into an empty store.
    run_all(settings, storage)
    assert ml_status.online_freshness(settings, storage, materialized=False)[
        "online_current_with_silver"
    ]  # the batch run found nothing new in silver
    path = online_store.sqlite_path(settings)
    for suffix in ("", "-wal", "-shm"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
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
