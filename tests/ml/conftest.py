"""The ML tests' lake: seeded, changed, built to gold and applied, once per storage.

Package-scoped: the modules of `tests/ml` that need a whole lake share one per storage
(CI time). Tests change it (churn, edge rows, model versions, predictions); each starts
from whatever state it finds (`served_model`).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import psycopg
import pytest

from lakehouse.ml import features, models
from lakehouse.ml import tasks as ml_tasks
from lakehouse.settings import Secret, Settings
from lakehouse.source import schema
from lakehouse.storage import Storage
from tests.conftest import S3_KEY, S3_SECRET, _empty_bucket, shared_tmp
from tests.helpers import churn, run_all, seeded


@dataclass
class Lake:
    settings: Settings
    storage: Storage
    store: object


@pytest.fixture(scope="package", params=["local", "s3"])
def lake(request: pytest.FixtureRequest, pg_server: str) -> Iterator[Lake]:
    """One lakehouse per storage for the package: seeded, changed, built to gold, applied."""
    home = shared_tmp("lakehouse-ml-")
    pg_schema = "t_" + uuid.uuid4().hex[:10]
    settings = Settings(
        home=home / "home",
        storage_uri=str(home / "warehouse"),
        pg_dsn=Secret(pg_server),
        pg_schema=pg_schema,
        batch_rows=2000,
    )
    if request.param == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        settings = replace(
            settings,
            storage_uri=f"s3://lh-{uuid.uuid4().hex[:12]}/lakehouse",
            s3_endpoint=endpoint,
            s3_access_key_id=S3_KEY,
            s3_secret_access_key=Secret(S3_SECRET),
        )
    storage = seeded(settings, rows=1500)
    run_all(settings, storage)
    churn(settings, changes=400, seed_value=3)
    run_all(settings, storage)
    store = features.feature_store(settings, storage)
    features.apply(store)
    try:
        yield Lake(settings, storage, store)
    finally:
        with psycopg.connect(pg_server, autocommit=True) as conn:
            schema.drop_schema(conn, pg_schema)
        if settings.is_s3:
            _empty_bucket(settings)


@pytest.fixture
def clients() -> Iterator[Any]:
    """Make `TestClient`s that run the app's lifespan, ended with the test: each app's
    prediction log lands what it holds in the lake before the next test changes it."""
    from fastapi.testclient import TestClient

    with contextlib.ExitStack() as stack:
        yield lambda app, **options: stack.enter_context(TestClient(app, **options))


def served_model(lake: Lake) -> str:
    """Make the served model one trained on the lake's data as it is now; return it.

    Tests share the package's lake and change it (churn, edge rows, new versions): a test
    that needs a model starts from this state whatever ran before it, or nothing did.
    """
    if not ml_tasks.trained(lake.settings, lake.storage):
        return ml_tasks.train(lake.settings, lake.storage).version
    return models.Registry(lake.storage).latest()
