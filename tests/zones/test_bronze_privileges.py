"""Batch extraction as a least-privileged role: SELECT on the source tables, nothing else."""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from lakehouse.settings import Secret, Settings
from lakehouse.zones import bronze
from tests.helpers import read, seeded
from tests.test_ops import lakehouse
from tests.zones.test_silver import assert_same_rows, expected


@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_batch_extraction_needs_only_select_on_the_tables(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """README: batch extraction needs `SELECT` on the tables, and its fence needs no
    privilege (no `pg_read_all_stats`, which an older version required). A role with only
    USAGE and SELECT runs `lakehouse run`, also while another role's open transaction
    holds the fence back, and silver equals the source."""
    storage = seeded(settings, rows=40)
    admin = settings.pg_dsn.get()
    role, password = f"lh_select_{settings.pg_schema}", uuid.uuid4().hex
    source = sql.Identifier(settings.pg_schema)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(source, sql.Identifier(role)))
        conn.execute(
            sql.SQL("GRANT SELECT ON ALL TABLES IN SCHEMA {} TO {}").format(
                source, sql.Identifier(role)
            )
        )
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            powers = conn.execute(
                "SELECT rolsuper, rolreplication, pg_has_role(oid, 'pg_read_all_stats', 'MEMBER')"
                " FROM pg_roles WHERE rolname = %s",
                (role,),
            ).fetchone()
        assert powers == (False, False, False)
        reader = replace(
            settings, pg_dsn=Secret(make_conninfo(admin, user=role, password=password))
        )

        # Another role's transaction, open with an id, holds the fence back while a row
        # commits behind it: the ingest waits, then names the holder (pg_stat_activity
        # shows an unprivileged role other roles' pids and transaction ids).
        with psycopg.connect(admin) as holder:
            holder.execute("SELECT pg_current_xact_id()")
            with psycopg.connect(admin, autocommit=True) as writer:
                writer.execute(
                    sql.SQL(
                        "UPDATE {}.applicants SET credit_score = 700 WHERE applicant_id = 1"
                    ).format(source)
                )
            with caplog.at_level(logging.WARNING, logger="lakehouse.bronze"):
                bronze.ingest(reader, storage, "applicants")
            assert caplog.messages == [
                f"pid {holder.info.backend_pid} holds the extraction fence back: rows of "
                "`applicants` committed after it start come with the next run"
            ]
            holder.rollback()

        # Its own process, as a user runs it (the tasks cache their settings per process).
        run = lakehouse(reader, "run", "--no-ml")
        assert run.returncode == 0, run.stderr[-3000:]
        applicants, loans = expected(settings)
        assert_same_rows(read(storage, "silver", "applicants"), applicants, "applicant_id")
        assert_same_rows(read(storage, "silver", "loan_applications"), loans, "application_id")
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
