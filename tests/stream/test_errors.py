"""The stream's errors: one line naming the problem and the fix, non-zero exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace

import psycopg
import pytest

from lakehouse.settings import Secret, Settings
from lakehouse.source import schema
from stream import setup
from tests.conftest import embedded_cluster, env_for
from tests.helpers import seeded
from tests.stream.helpers import stream_settings
from tests.stream.test_cdc import lakehouse_stream, wait_active


def run(settings: Settings, *args: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "lakehouse.cli", "stream", *args],
        env={**os.environ, **env_for(settings)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, done.stderr


def assert_one_line(code: int, err: str, message: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert message in lines[0], lines[0]


def test_stream_before_setup(base_settings: Settings) -> None:
    settings = stream_settings(base_settings)
    seeded(settings, rows=20)
    code, err = run(settings)
    assert_one_line(code, err, "does not exist; run `lakehouse stream setup` first")


def test_slot_in_use_by_another_consumer(base_settings: Settings) -> None:
    settings = stream_settings(base_settings)
    storage = seeded(settings, rows=20)
    setup.setup(settings, storage)
    first = lakehouse_stream(settings)
    try:
        wait_active(settings, active=True)
        code, err = run(settings)
        assert_one_line(code, err, "is in use by another consumer; stop the other")
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0


def test_role_without_replication(base_settings: Settings) -> None:
    settings = stream_settings(base_settings)
    seeded(settings, rows=20)
    role = f"norepl_{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    s = settings.pg_schema
    with psycopg.connect(settings.pg_dsn.get(), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        conn.execute(f'GRANT USAGE ON SCHEMA "{s}" TO {role}')
        conn.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA "{s}" TO {role}')
    info = psycopg.conninfo.conninfo_to_dict(settings.pg_dsn.get())
    info.update(user=role, password=password)
    limited = replace(settings, pg_dsn=Secret(psycopg.conninfo.make_conninfo(**info)))
    try:
        code, err = run(limited, "setup")
        assert_one_line(code, err, "may not use replication; `ALTER ROLE <user> WITH REPLICATION`")
        assert password not in err
    finally:
        with psycopg.connect(settings.pg_dsn.get(), autocommit=True) as conn:
            conn.execute(f'REVOKE ALL ON ALL TABLES IN SCHEMA "{s}" FROM {role}')
            conn.execute(f'REVOKE ALL ON SCHEMA "{s}" FROM {role}')
            conn.execute(f"DROP ROLE {role}")


@pytest.fixture(scope="module")
def small_wal_server() -> Iterator[str]:
    """A cluster that invalidates a slot once it holds back more than 1 MB of WAL."""
    with embedded_cluster(
        "lakehouse-smallwal-", max_slot_wal_keep_size="1MB", fsync="off", min_wal_size="32MB"
    ) as dsn:
        yield dsn


def test_slot_that_lost_its_wal(small_wal_server: str, base_settings: Settings) -> None:
    settings = stream_settings(replace(base_settings, pg_dsn=Secret(small_wal_server)))
    storage = seeded(settings, rows=20)
    setup.setup(settings, storage)
    with schema.connect(settings, autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS filler (x text)")
        for _ in range(4):  # WAL the slot would have to keep, then a checkpoint drops it
            conn.execute(
                "INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 3000)"
            )
            conn.execute("SELECT pg_switch_wal()")
        conn.execute("CHECKPOINT")
        status = conn.execute(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name LIKE %s",
            (f"lakehouse_{settings.pg_schema}_%",),
        ).fetchall()
    assert {s for (s,) in status} == {"lost"}
    code, err = run(settings)
    assert_one_line(code, err, "lost WAL it needed")
    assert "lakehouse stream teardown" in err


@pytest.fixture(scope="module")
def replica_server() -> Iterator[str]:
    """A cluster that cannot decode logically (wal_level=replica)."""
    with embedded_cluster("lakehouse-replica-stream-", wal_level="replica") as dsn:
        yield dsn


@pytest.mark.parametrize("action", ["setup", "run"])
def test_wal_level_not_logical(replica_server: str, base_settings: Settings, action: str) -> None:
    settings = stream_settings(replace(base_settings, pg_dsn=Secret(replica_server)))
    seeded(settings, rows=20)
    code, err = run(settings, action)
    assert_one_line(code, err, "CDC needs wal_level=logical")
