"""Session services (a real Postgres with wal_level=logical, a real S3 server) and isolation."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import fields, replace
from pathlib import Path

import psycopg
import pytest

from lakehouse import environment
from lakehouse.settings import PREFIX, Secret, Settings
from lakehouse.source import schema
from lakehouse.source.embedded import EmbeddedPostgres, free_port

S3_KEY = "lakehouse-test-key"
S3_SECRET = "lakehouse-test-secret"


def shared_tmp(prefix: str) -> Path:
    """A temp dir that the `postgres` OS user can traverse (pytest's tmp_path is private).

    Removed when the test process exits: a lake per run would otherwise fill /tmp.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


# The S3 server's address is fixed before any test runs: the environment below holds it.
S3_PORT = free_port()


def _session_environment() -> dict[str, str]:
    """Every variable the library or a test sets in this process, present from the start.

    Tests then only replace values, never add a variable: adding one while a native thread
    reads the environment can crash the process (`lakehouse.environment` says why; it
    segfaulted this suite twice). An empty `LAKEHOUSE_*` value means unset to `Settings`.
    """
    env = {PREFIX + f.name.upper(): "" for f in fields(Settings)}
    env |= {PREFIX + "FAILPOINT": "", PREFIX + "FAILPOINT_PAUSE": ""}
    online = Settings(feast_online_store="postgres", feast_pg_dsn=Secret("postgresql://h/db"))
    env |= {key: "" for key in environment.feast_env(online)}
    s3 = Settings(
        storage_uri="s3://bucket/lakehouse",
        s3_endpoint=f"http://127.0.0.1:{S3_PORT}",
        s3_access_key_id=S3_KEY,
        s3_secret_access_key=Secret(S3_SECRET),
    )
    # The values every S3 test exports for Feast: exporting them again changes nothing.
    return env | environment.s3_options(s3)


os.environ.update(_session_environment())  # also drops a developer's LAKEHOUSE_* values


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings never read a developer's shell nor an earlier test's exports: every
    `LAKEHOUSE_*` variable is empty (unset) when a test starts."""
    for key in list(os.environ):
        if key.startswith(PREFIX) and os.environ[key]:
            monkeypatch.setenv(key, "")


@contextlib.contextmanager
def embedded_cluster(prefix: str, **options: str) -> Iterator[str]:
    """A throw-away Postgres cluster with extra server options; yields its DSN."""
    home = shared_tmp(prefix)
    pg = EmbeddedPostgres(Settings(home=home), extra_options=options)
    pg.start()
    try:
        yield pg.dsn()
    finally:
        pg.destroy()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A Postgres cluster for the session (fsync off: it is thrown away); yields its DSN."""
    home = shared_tmp("lakehouse-pg-")
    pg = EmbeddedPostgres(
        Settings(home=home),
        extra_options={"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"},
    )
    pg.start()
    try:
        yield pg.dsn()
    finally:
        pg.stop()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3-compatible server over HTTP (moto in server mode) for the session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = S3_PORT
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    wait_for_port(port)
    try:
        yield endpoint
    finally:
        server.stop()


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


@pytest.fixture
def pg_schema(pg_server: str) -> Iterator[str]:
    """A fresh Postgres schema name for one test, dropped afterwards."""
    name = "t_" + uuid.uuid4().hex[:10]
    yield name
    with psycopg.connect(pg_server, autocommit=True) as conn:
        drop_stream_objects(conn, name)
        schema.drop_schema(conn, name)


def drop_stream_objects(conn: psycopg.Connection, pg_schema: str) -> None:
    """Drop a test's replication slots and publications (a slot left behind keeps WAL)."""
    pattern = f"%{pg_schema}%"
    for _ in range(50):
        try:
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE slot_name LIKE %s",
                (pattern,),
            )
            break
        except psycopg.errors.ObjectInUse:
            time.sleep(0.2)  # a killed consumer's walsender is still exiting
    for (pub,) in conn.execute(
        "SELECT pubname FROM pg_publication WHERE pubname LIKE %s", (pattern,)
    ).fetchall():
        conn.execute(f'DROP PUBLICATION "{pub}"')


@pytest.fixture
def base_settings(pg_server: str, pg_schema: str, tmp_path: Path) -> Settings:
    """Settings for local storage under tmp_path and this test's own source schema."""
    return Settings(
        home=tmp_path / "home",
        storage_uri=str(tmp_path / "warehouse"),
        pg_dsn=Secret(pg_server),
        pg_schema=pg_schema,
        batch_rows=1000,
    )


def s3_settings(base: Settings, endpoint: str) -> Settings:
    """The same settings with tables on the session's S3 server, in a bucket of their own."""
    bucket = "lh-" + uuid.uuid4().hex[:12]
    return replace(
        base,
        storage_uri=f"s3://{bucket}/lakehouse",
        s3_endpoint=endpoint,
        s3_access_key_id=S3_KEY,
        s3_secret_access_key=Secret(S3_SECRET),
    )


@pytest.fixture(params=["local", "s3"])
def settings(request: pytest.FixtureRequest, base_settings: Settings) -> Iterator[Settings]:
    """Every storage-touching test runs on local disk and on S3."""
    if request.param == "local":
        yield base_settings
        return
    endpoint = request.getfixturevalue("s3_endpoint")
    s3 = s3_settings(base_settings, endpoint)
    yield s3
    _empty_bucket(s3)


def _empty_bucket(settings: Settings) -> None:
    from lakehouse.storage import Storage, _split_s3, minio_client

    storage = Storage.from_settings(settings)
    client = minio_client(storage.s3, storage.options)
    bucket, _ = _split_s3(storage.root)
    if client.bucket_exists(bucket):
        for obj in client.list_objects(bucket, recursive=True):
            client.remove_object(bucket, obj.object_name)
        client.remove_bucket(bucket)


def env_for(settings: Settings) -> dict[str, str]:
    """Return the LAKEHOUSE_* variables that reproduce `settings` (for CLI and Luigi runs)."""
    env = {
        "LAKEHOUSE_HOME": str(settings.home),
        "LAKEHOUSE_STORAGE_URI": settings.warehouse,
        "LAKEHOUSE_PG_DSN": settings.pg_dsn.get(),
        "LAKEHOUSE_PG_SCHEMA": settings.pg_schema,
        "LAKEHOUSE_BATCH_ROWS": str(settings.batch_rows),
        "LAKEHOUSE_STREAM_BATCH_ROWS": str(settings.stream_batch_rows),
        "LAKEHOUSE_STREAM_BATCH_SECONDS": str(settings.stream_batch_seconds),
        "LAKEHOUSE_STREAM_HEARTBEAT_SECONDS": str(settings.stream_heartbeat_seconds),
        "LAKEHOUSE_PREDICTION_LOG": settings.prediction_log,
        "LAKEHOUSE_PREDICTION_LOG_SECONDS": str(settings.prediction_log_seconds),
        "LAKEHOUSE_PREDICTION_LOG_RECORDS": str(settings.prediction_log_records),
    }
    if settings.is_s3:
        env |= {
            "LAKEHOUSE_S3_ENDPOINT": settings.s3_endpoint,
            "LAKEHOUSE_S3_ACCESS_KEY_ID": settings.s3_access_key_id,
            "LAKEHOUSE_S3_SECRET_ACCESS_KEY": settings.s3_secret_access_key.get(),
        }
    return env
