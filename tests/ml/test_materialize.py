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
    """README, *Incremental materialization*: the window follows the gold rows changed
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
