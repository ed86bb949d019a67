"""The process environment Feast reads, exported once when a process starts.

Feast learns where the lakehouse is from the environment: its `feature_store.yaml` expands
`${LAKEHOUSE_HOME}` (and the Postgres online store's `${LAKEHOUSE_FEAST_PG_*}`), the
repository's sources read `LAKEHOUSE_STORAGE_URI`, and on S3 it infers Delta schemas with
delta-rs, which reads the `AWS_*` options from the environment.

Why once, early: glibc's `getenv` takes no lock, and a `setenv` that *adds* a variable
reallocates the environment under any thread reading it. Native libraries read it from
their own threads; Polars' cloud reader, once it has read from S3, polls it every 100 ms
for the life of the process. Adding a variable after that crashed a process with a
segfault inside `getenv` (seen twice in CI). So every command exports this environment
before it does any work, and later calls only rewrite values that differ (a replaced
value is safe: glibc never frees a string it handed out).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace

from lakehouse.errors import LakehouseError
from lakehouse.settings import Settings


def private_files() -> None:
    """Create every file and folder of this process for its owner only (umask 077).

    The warehouse on local disk, the SQLite online store, models and training sets hold
    applicants' data; they were created world-readable. Every entry point (the CLI, the
    Luigi tasks) calls this before writing anything. What another OS user must reach (an
    embedded cluster run as `postgres`) is given its mode explicitly.
    """
    os.umask(0o077)


def online_dsn(settings: Settings) -> str:
    """Return the DSN of Feast's Postgres online store: its own, or the source's."""
    from lakehouse.source.schema import dsn as source_dsn

    return settings.feast_pg_dsn.get() or source_dsn(settings)


def s3_options(settings: Settings) -> dict[str, str]:
    """Return the `AWS_*` options of every Delta call on S3 (none on local disk)."""
    if not settings.is_s3:
        return {}
    options = {
        "AWS_REGION": settings.s3_region,
        "AWS_ACCESS_KEY_ID": settings.s3_access_key_id,
        "AWS_SECRET_ACCESS_KEY": settings.s3_secret_access_key.get(),
        # No unsafe-rename flag: delta-rs 1.x commits with conditional puts (safe with
        # concurrent writers); the rename flag would lose commits silently.
    }
    if settings.s3_endpoint:
        endpoint = settings.s3_endpoint.rstrip("/")
        options["AWS_ENDPOINT_URL"] = endpoint
        options["AWS_ALLOW_HTTP"] = "true" if endpoint.startswith("http://") else "false"
    return options


def feast_env(settings: Settings) -> dict[str, str]:
    """Return the environment Feast needs: what its YAML expands, what the repo reads."""
    env = {"LAKEHOUSE_HOME": str(settings.home), "LAKEHOUSE_STORAGE_URI": settings.warehouse}
    if settings.is_s3:
        env |= {
            "LAKEHOUSE_S3_ENDPOINT": settings.s3_endpoint,
            "LAKEHOUSE_S3_REGION": settings.s3_region,
            "LAKEHOUSE_S3_ACCESS_KEY_ID": settings.s3_access_key_id,
            "LAKEHOUSE_S3_SECRET_ACCESS_KEY": settings.s3_secret_access_key.get(),
        }
        # Feast infers Delta schemas with delta-rs, which reads these from the environment:
        # the same options as every other Delta call.
        env |= s3_options(settings)
    if settings.feast_online_store == "postgres":
        from psycopg.conninfo import conninfo_to_dict

        info = conninfo_to_dict(online_dsn(settings))

        def quoted(value: object) -> str:  # inside single quotes in the YAML
            return str(value).replace("'", "''")

        env |= {
            "LAKEHOUSE_FEAST_PG_HOST": quoted(info.get("host", "127.0.0.1")),
            "LAKEHOUSE_FEAST_PG_PORT": str(int(info.get("port") or 5432)),
            "LAKEHOUSE_FEAST_PG_DATABASE": quoted(info.get("dbname", "postgres")),
            "LAKEHOUSE_FEAST_PG_USER": quoted(info.get("user", "")),
            "LAKEHOUSE_FEAST_PG_PASSWORD": quoted(info.get("password", "")),
            "LAKEHOUSE_FEAST_PG_SSLMODE": quoted(info.get("sslmode", "prefer")),
            # Next to the source schema, so lakehouses sharing a server do not collide.
            "LAKEHOUSE_FEAST_PG_SCHEMA": quoted(f"{settings.pg_schema}_online"),
        }
    return env


def export(values: Mapping[str, str]) -> list[str]:
    """Write `values` into the process environment, only those that differ; return them."""
    changed = [key for key, value in values.items() if os.environ.get(key) != value]
    for key in changed:
        os.environ[key] = values[key]
    return changed


def export_for_feast(settings: Settings) -> list[str]:
    """Export what Feast reads; call it when a process starts (see the module's text)."""
    try:
        env = feast_env(settings)
    except LakehouseError:
        # The embedded source's address is known once it runs (`lakehouse db start`, the
        # demo): its Postgres online store variables are exported when Feast opens.
        env = feast_env(replace(settings, feast_online_store="sqlite"))
    return export(env)
