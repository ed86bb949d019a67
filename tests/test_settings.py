import re
from dataclasses import fields
from pathlib import Path

import pytest

from lakehouse.errors import ConfigError
from lakehouse.settings import Secret, Settings


def test_defaults_need_no_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env({})
    assert settings.home == tmp_path / ".lakehouse"
    assert settings.warehouse == str(tmp_path / ".lakehouse" / "warehouse")
    assert settings.embedded_pg
    assert not settings.is_s3
    assert settings.batch_rows == 250_000


def test_reads_every_variable() -> None:
    settings = Settings.from_env(
        {
            "LAKEHOUSE_HOME": "/tmp/lh-home",
            "LAKEHOUSE_STORAGE_URI": "s3://bucket/prefix",
            "LAKEHOUSE_S3_ENDPOINT": "http://localhost:9000",
            "LAKEHOUSE_S3_REGION": "eu-west-1",
            "LAKEHOUSE_S3_ACCESS_KEY_ID": "key",
            "LAKEHOUSE_S3_SECRET_ACCESS_KEY": "secret",
            "LAKEHOUSE_PG_DSN": "postgresql://u:p@h:5432/db",
            "LAKEHOUSE_PG_SCHEMA": "lending2",
            "LAKEHOUSE_BATCH_ROWS": "10_000",
            "LAKEHOUSE_SEED": "7",
            "LAKEHOUSE_VACUUM_RETENTION_HOURS": "24",
            "LAKEHOUSE_DUCKDB_MEMORY": "512MB",
            "LAKEHOUSE_FEAST_ONLINE_STORE": "postgres",
            "LAKEHOUSE_FEAST_PG_DSN": "postgresql://features:fp@h:5432/db",
            "LAKEHOUSE_LOG_FORMAT": "json",
        }
    )
    assert settings.feast_pg_dsn.get() == "postgresql://features:fp@h:5432/db"
    assert settings.log_format == "json" and settings.feast_online_store == "postgres"
    assert settings.is_s3 and settings.s3_region == "eu-west-1"
    assert settings.pg_dsn.get() == "postgresql://u:p@h:5432/db"
    assert settings.batch_rows == 10_000 and settings.seed == 7
    assert settings.vacuum_retention_hours == 24 and settings.pg_schema == "lending2"
    assert settings.duckdb_memory == "512MB"


def test_secrets_never_show() -> None:
    settings = Settings(
        pg_dsn=Secret("postgresql://u:hunter2@h/db"), s3_secret_access_key=Secret("topsecret")
    )
    assert "hunter2" not in repr(settings)
    assert "topsecret" not in repr(settings)
    assert "hunter2" not in str(settings.pg_dsn)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"LAKEHOUSE_BATCH_ROWS": "lots"},
            "LAKEHOUSE_BATCH_ROWS is `lots`; it must be a whole number",
        ),
        ({"LAKEHOUSE_BATCH_ROWS": "0"}, "LAKEHOUSE_BATCH_ROWS is `0`; it must be at least 1"),
        ({"LAKEHOUSE_SEED": "-1"}, "LAKEHOUSE_SEED is `-1`; it must be at least 0"),
        (
            {"LAKEHOUSE_DUCKDB_MEMORY": "lots"},
            "LAKEHOUSE_DUCKDB_MEMORY is `lots`; give a size like `2GB` or `512MB`",
        ),
        ({"LAKEHOUSE_BATCH_SIZE": "1"}, "unknown setting `LAKEHOUSE_BATCH_SIZE`"),
        (
            {"LAKEHOUSE_STORAGE_URI": "gs://bucket/x"},
            "LAKEHOUSE_STORAGE_URI is `gs://bucket/x`; use a local folder or `s3://bucket/prefix`",
        ),
        (
            {"LAKEHOUSE_STORAGE_URI": "s3://bucket/x"},
            "LAKEHOUSE_STORAGE_URI is on S3 but LAKEHOUSE_S3_ACCESS_KEY_ID or "
            "LAKEHOUSE_S3_SECRET_ACCESS_KEY is not set",
        ),
        (
            {"LAKEHOUSE_S3_ENDPOINT": "localhost:9000"},
            "LAKEHOUSE_S3_ENDPOINT is `localhost:9000`; give a URL like `http://localhost:9000`",
        ),
        (
            {"LAKEHOUSE_S3_ENDPOINT": "http://127.0.0.1:99999"},  # a traceback before
            "LAKEHOUSE_S3_ENDPOINT is `http://127.0.0.1:99999`; give a URL like",
        ),
        (
            {"LAKEHOUSE_S3_ENDPOINT": "http://127.0.0.1:port"},
            "LAKEHOUSE_S3_ENDPOINT is `http://127.0.0.1:port`; give a URL like",
        ),
        ({"LAKEHOUSE_PG_DSN": "not a dsn"}, "LAKEHOUSE_PG_DSN is not a Postgres connection string"),
        (
            {"LAKEHOUSE_PG_SCHEMA": "drop table"},
            "LAKEHOUSE_PG_SCHEMA is `drop table`; use letters, digits and underscores only",
        ),
        ({"LAKEHOUSE_LOG_FORMAT": "xml"}, "LAKEHOUSE_LOG_FORMAT is `xml`; use `text` or `json`"),
        (
            {"LAKEHOUSE_FEAST_PG_DSN": "not a dsn", "LAKEHOUSE_FEAST_ONLINE_STORE": "postgres"},
            "LAKEHOUSE_FEAST_PG_DSN is not a Postgres connection string",
        ),
        (
            {"LAKEHOUSE_FEAST_PG_DSN": "postgresql://f:pw@h/db"},
            "LAKEHOUSE_FEAST_PG_DSN is set but LAKEHOUSE_FEAST_ONLINE_STORE is `sqlite`; set "
            "LAKEHOUSE_FEAST_ONLINE_STORE=postgres or unset the DSN",
        ),
        (
            {"LAKEHOUSE_PREDICTION_LOG_CAPACITY": "500"},
            "LAKEHOUSE_PREDICTION_LOG_RECORDS (10000) is more than "
            "LAKEHOUSE_PREDICTION_LOG_CAPACITY (500): a landing would never fill",
        ),
        (
            {"LAKEHOUSE_PREDICTION_LOG": "yes"},
            "LAKEHOUSE_PREDICTION_LOG is `yes`; use `on` or `off`",
        ),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Settings.from_env(env)


def test_dsn_with_password_is_not_echoed_in_errors() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.from_env({"LAKEHOUSE_PG_DSN": "mysql://u:hunter2@h/db"})
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("where", ["/etc/passwd", "/proc/lakehouse-x"])
@pytest.mark.parametrize("variable", ["LAKEHOUSE_STORAGE_URI", "LAKEHOUSE_HOME"])
def test_an_unusable_folder_is_one_line_naming_the_settings(variable: str, where: str) -> None:
    """Issue 14: a file or /proc as the home or warehouse printed a traceback."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKEHOUSE_")}
    done = subprocess.run(
        [sys.executable, "-m", "lakehouse.cli", "tables"],
        env={**env, variable: where},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith(f"error: the warehouse folder `{where}")
    assert "set LAKEHOUSE_STORAGE_URI (or LAKEHOUSE_HOME)" in lines[0]


def test_every_setting_arrives_as_its_declared_type() -> None:
    """A field added without its own parser would arrive as a string: each is read back typed.

    The expected types are written here from the README's settings table, not taken from
    the code's parsers.
    """
    expected = {
        "home": Path,
        "storage_uri": str,
        "s3_endpoint": str,
        "s3_region": str,
        "s3_access_key_id": str,
        "s3_secret_access_key": Secret,
        "pg_dsn": Secret,
        "pg_schema": str,
        "pg_bin": str,
        "batch_rows": int,
        "seed": int,
        "vacuum_retention_hours": int,
        "duckdb_memory": str,
        "feast_online_store": str,
        "feast_pg_dsn": Secret,
        "model_threshold": float,
        "prediction_log": str,
        "prediction_log_seconds": float,
        "prediction_log_records": int,
        "prediction_log_capacity": int,
        "drift_psi": float,
        "drift_js": float,
        "drift_missing": float,
        "quality_auc_margin": float,
        "monitor_min_count": int,
        "stream_batch_rows": int,
        "stream_batch_seconds": float,
        "stream_quiet_seconds": float,
        "stream_heartbeat_seconds": float,
        "log_format": str,
    }
    samples = {
        "pg_dsn": "postgresql://u@h/db",
        "feast_pg_dsn": "postgresql://u@h/db",
        "storage_uri": "/tmp/w",
        "s3_endpoint": "http://h:9000",
        "duckdb_memory": "1GB",
        "feast_online_store": "postgres",
        "log_format": "json",
        "prediction_log": "off",
        "prediction_log_capacity": "20000",
    }
    assert {f.name for f in fields(Settings)} == set(expected)
    for name, kind in expected.items():
        var = f"LAKEHOUSE_{name.upper()}"
        text = samples.get(name, {int: "3", float: "0.25", Path: "/tmp/x"}.get(kind, "x"))
        env = {var: text}
        if name == "feast_pg_dsn":
            env["LAKEHOUSE_FEAST_ONLINE_STORE"] = "postgres"
        value = getattr(Settings.from_env(env), name)
        assert type(value) is kind or isinstance(value, kind), (var, value)


def test_seed_unset_means_a_new_mix_but_a_repeatable_dataset() -> None:
    unset = Settings.from_env({})
    assert unset.seed is None and unset.repeatable_seed == 42
    fixed = Settings.from_env({"LAKEHOUSE_SEED": "0"})
    assert fixed.seed == 0 and fixed.repeatable_seed == 0
