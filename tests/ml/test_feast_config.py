"""The Postgres online store's configuration, as the lakehouse exports it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from lakehouse import environment
from lakehouse.ml import features
from lakehouse.settings import Secret, Settings


@pytest.mark.parametrize("password", ["123456", "yes", "it's", ""])
def test_postgres_online_store_settings_survive_the_yaml(
    password: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Feast expands ${VAR} in the YAML text, then parses it: a password that looks like a
    number or a boolean, holds a quote or is empty must still arrive as that string."""
    from lakehouse.ml.online.store import LakehousePostgresOnlineStoreConfig

    quoted = password.replace("'", "%27")
    settings = Settings(
        home=tmp_path,
        pg_dsn=Secret(f"postgresql://app:{quoted}@db.internal:5433/lending?sslmode=require"),
        feast_online_store="postgres",
    )
    for name, value in environment.feast_env(settings).items():
        monkeypatch.setenv(name, value)
    text = (features.repo_path() / "feature_store.postgres.yaml").read_text()
    config = LakehousePostgresOnlineStoreConfig(
        **yaml.safe_load(os.path.expandvars(text))["online_store"]
    )
    assert config.password == password
    assert (config.host, config.port, config.database, config.user) == (
        "db.internal",
        5433,
        "lending",
        "app",
    )
    assert config.sslmode == "require"  # the DSN's, not a hard-coded `disable`
    assert config.db_schema == "lending_online"
