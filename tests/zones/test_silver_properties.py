"""Silver equals the source, whatever happens: a Hypothesis state machine on real Postgres.

Random sequences of inserts, updates, key changes, TOASTed values left unchanged,
deletes, truncates and values at the edges of their types (NaN, infinity, BC dates,
years past 9999, bigint bounds) are written to a real Postgres and taken in by batch
runs (sometimes four writers at once) or by the CDC stream (sometimes killed), with the
stream set up and torn down in between. At every check, after silver has caught up:

- silver's current tables hold exactly the source rows whose current version passes the
  rules (restated here in plain Python), with their clean values; every other live row
  is a current reject with exactly the rules it fails;
- history is a consistent SCD2 (one open version per key, equal to the current row;
  instants strictly increasing; every version once), and replays the source: its
  versions are, in order, source states that passed the rules (under the stream, all
  of them);
- `lakehouse verify` finds no difference.

CI runs a few short sequences; a hand run takes many long ones:
`HYPOTHESIS_PROFILE=long .venv/bin/pytest tests/zones/test_silver_properties.py -s`
(it prints what it did: sequences, changes, runs, kills, writers, checks; size it with
`PROPERTY_SEQUENCES=30 PROPERTY_STEPS=50`, the S3 run takes a fifth of the sequences).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import psycopg
import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)
from psycopg import sql

from lakehouse.settings import Settings
from lakehouse.source import schema as source_schema
from lakehouse.source.seed import seed
from lakehouse.storage import Storage
from lakehouse.zones import bronze, silver
from tests.conftest import env_for, s3_settings
from tests.helpers import read

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
# PROPERTY_SEQUENCES / PROPERTY_STEPS size a hand run between the two profiles.
SEQUENCES = int(os.environ.get("PROPERTY_SEQUENCES") or (100 if LONG else 5))
STEPS = int(os.environ.get("PROPERTY_STEPS") or (50 if LONG else 20))

WHITESPACE = " \t\n\r\x0b\x0c"
GENDERS = ("female", "male")
EDUCATION = ("High School", "Associate", "Bachelor", "Master", "Doctorate")
OWNERSHIP = ("RENT", "OWN", "MORTGAGE", "OTHER")
INTENTS = ("PERSONAL", "EDUCATION", "MEDICAL", "VENTURE", "HOMEIMPROVEMENT", "DEBTCONSOLIDATION")
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(2100, 1, 1, tzinfo=UTC)
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)

# ------------------------------------------------------------------ values


def mostly(good: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly values that pass the rules, sometimes one that does not (or breaks things)."""
    return st.one_of(good, good, good, good, odd)


def noisy(words: tuple[str, ...]) -> st.SearchStrategy[str]:
    """A category, in any ASCII case, with ASCII or Unicode space around it; or junk."""
    return st.one_of(
        st.sampled_from(words),
        st.builds(
            lambda w, lower, pad: pad + (w.lower() if lower else w.upper()) + pad,
            st.sampled_from(words),
            st.booleans(),
            st.sampled_from(["", " ", "\t", "\u00a0"]),
        ),
        st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8),
    )


def moment(low: datetime, high: datetime) -> st.SearchStrategy[str]:
    return st.datetimes(
        min_value=low.replace(tzinfo=None), max_value=high.replace(tzinfo=None)
    ).map(lambda d: d.isoformat(sep=" ") + "+00")


ODD_TIMES = st.sampled_from(
    [
        "infinity",
        "-infinity",
        "0044-03-15 12:00:00+00 BC",
        "12024-01-01 00:00:00+00",
        "9999-12-31 23:59:59.999999+00",
        "0001-01-01 00:00:00+00",
        "1677-09-21 00:00:00+00",
        "1900-01-01 00:00:00+00",
        "2100-01-01 00:00:00+00",
    ]
)
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 0.01, 5e-324]),
)


def applicant_values() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "person_age": mostly(st.integers(18, 100), st.integers(*INT32)),
            "person_gender": mostly(st.sampled_from(GENDERS), noisy(GENDERS)),
            "person_education": mostly(st.sampled_from(EDUCATION), noisy(EDUCATION)),
            "person_income": mostly(st.integers(5_000, 500_000).map(float), FLOATS),
            "person_emp_exp": mostly(st.integers(0, 3), st.integers(*INT32)),
            "person_home_ownership": mostly(st.sampled_from(OWNERSHIP), noisy(OWNERSHIP)),
            "cb_person_cred_hist_length": mostly(st.integers(0, 2), st.integers(*INT32)),
            "credit_score": mostly(st.integers(300, 850), st.integers(*INT32)),
            "previous_loan_defaults_on_file": mostly(
                st.sampled_from(["Yes", "No"]), noisy(("Yes", "No"))
            ),
        }
    )


def applicant_times() -> st.SearchStrategy[dict[str, str | None]]:
    """created_at / updated_at: mostly the defaults (now); sometimes given, odd or not."""
    given = st.one_of(moment(EARLIEST, datetime(2025, 1, 1, tzinfo=UTC)), ODD_TIMES)
    return st.fixed_dictionaries(
        {
            "created_at": st.one_of(st.none(), st.none(), given),
            "updated_at": st.one_of(st.none(), st.none(), st.none(), given),
        }
    )


def loan_values() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {
            "loan_amnt": mostly(st.integers(500, 35_000).map(float), FLOATS),
            "loan_intent": mostly(st.sampled_from(INTENTS), noisy(INTENTS)),
            "loan_int_rate": mostly(st.floats(5.0, 20.0), FLOATS),
            "loan_status": mostly(st.sampled_from([None, 0, 1]), st.integers(-32768, 32767)),
        }
    )


# ------------------------------------------------------------------ the oracle


def trim(value: Any) -> Any:
    return value.strip(WHITESPACE) if isinstance(value, str) else value


def ascii_case(value: Any, upper: bool) -> Any:
    if not isinstance(value, str):
        return value
    return "".join(
        (c.upper() if upper else c.lower()) if c.isascii() and c.isalpha() else c for c in value
    )


def clean_applicant(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: trim(v) for k, v in row.items()}
    out["person_gender"] = ascii_case(out["person_gender"], upper=False)
    out["person_home_ownership"] = ascii_case(out["person_home_ownership"], upper=True)
    edu = ascii_case(out["person_education"], upper=False)
    out["person_education"] = {e.lower(): e for e in EDUCATION}.get(edu, edu)
    yes_no = ascii_case(out["previous_loan_defaults_on_file"], upper=False)
    out["previous_loan_defaults_on_file"] = {"yes": "Yes", "no": "No"}.get(yes_no, yes_no)
    return out


def clean_loan(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: trim(v) for k, v in row.items()}
    out["loan_intent"] = ascii_case(out["loan_intent"], upper=True)
    return out


def between(value: Any, low: float, high: float) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return low <= value <= high


def in_years(value: Any) -> bool:
    return isinstance(value, datetime) and EARLIEST <= value < LATEST


def not_future(value: Any) -> bool:
    """Not after the lakehouse saw it (a moment ago: the sequence's values are past ones)."""
    return isinstance(value, datetime) and value <= datetime.now(UTC) + timedelta(minutes=5)


def applicant_rules(r: dict[str, Any]) -> list[str]:
    """The applicant rules, restated: the names of those `r` (clean) fails, in rule order."""
    age = r["person_age"]
    failed = [
        ("created_at_representable", r["_created_held"]),
        ("updated_at_representable", r["_updated_held"]),
        ("key_positive", r["applicant_id"] >= 1),
        ("age_range", between(age, 18, 100)),
        (
            "experience_vs_age",
            age is not None and between(r["person_emp_exp"], 0, age - 14),
        ),
        ("income_range", between(r["person_income"], 1_000, 10_000_000)),
        ("credit_history_range", between(r["cb_person_cred_hist_length"], 0, 80)),
        (
            "credit_history_vs_age",
            age is not None
            and r["cb_person_cred_hist_length"] is not None
            and r["cb_person_cred_hist_length"] <= age - 16,
        ),
        ("credit_score_range", between(r["credit_score"], 300, 850)),
        ("gender_known", r["person_gender"] in GENDERS),
        ("education_known", r["person_education"] in EDUCATION),
        ("home_ownership_known", r["person_home_ownership"] in OWNERSHIP),
        ("previous_defaults_known", r["previous_loan_defaults_on_file"] in ("Yes", "No")),
        ("created_at_range", in_years(r["created_at"])),
        ("updated_at_range", in_years(r["updated_at"])),
        ("updated_at_not_future", not_future(r["updated_at"])),
        (
            "created_before_update",
            r["created_at"] is not None
            and r["updated_at"] is not None
            and r["created_at"] <= r["updated_at"],
        ),
    ]
    return [name for name, ok in failed if not ok]


def loan_rules(r: dict[str, Any], applicant: dict[str, Any] | None) -> list[str]:
    failed = [
        ("applied_at_representable", r["_applied_held"]),
        ("updated_at_representable", r["_updated_held"]),
        ("key_positive", r["application_id"] >= 1),
        ("amount_range", between(r["loan_amnt"], 100, 1_000_000)),
        ("interest_rate_range", between(r["loan_int_rate"], 1, 36)),
        ("percent_income_range", between(r["loan_percent_income"], 0, 1)),
        ("intent_known", r["loan_intent"] in INTENTS),
        ("status_known", r["loan_status"] in (None, 0, 1)),
        ("applied_at_range", in_years(r["applied_at"])),
        ("updated_at_range", in_years(r["updated_at"])),
        ("updated_at_not_future", not_future(r["updated_at"])),
        (
            "applied_before_update",
            r["applied_at"] is not None
            and r["updated_at"] is not None
            and r["applied_at"] <= r["updated_at"],
        ),
        ("applicant_exists", applicant is not None),
        (
            "applied_after_applicant_created",
            applicant is None
            or r["applied_at"] is None
            or r["applied_at"] >= applicant["created_at"],
        ),
    ]
    return [name for name, ok in failed if not ok]


def columns_sql(table: str) -> str:
    """Every source column, timestamps Python cannot hold as null, and `_<name>_held` flags."""
    from lakehouse.source.schema import TABLES

    out = []
    for name, pg_type in TABLES[table].columns:
        if pg_type != "timestamptz":
            out.append(f'"{name}"')
            continue
        held = (
            f"(\"{name}\" >= '0001-01-01 00:00:00+00' AND \"{name}\" < '10000-01-01 00:00:00+00')"
        )
        out.append(f'CASE WHEN {held} THEN "{name}" END AS "{name}"')
        out.append(f'coalesce({held}, false) AS "_{name.split("_")[0]}_held"')
    return ", ".join(out)


def source_rows(conn: psycopg.Connection, schema: str, table: str) -> list[dict[str, Any]]:
    conn.execute("SET TimeZone = 'UTC'")
    cur = conn.execute(f'SELECT {columns_sql(table)} FROM "{schema}".{table} ORDER BY 1')
    names = [d.name for d in cur.description or []]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def oracle(
    conn: psycopg.Connection, schema: str
) -> dict[str, tuple[dict[int, dict[str, Any]], dict[int, list[str]]]]:
    """Per table: (good rows by key with clean values, failed rules by key)."""
    people = [clean_applicant(r) for r in source_rows(conn, schema, "applicants")]
    good_people, bad_people = {}, {}
    for r in people:
        failed = applicant_rules(r)
        if failed:
            bad_people[r["applicant_id"]] = failed
        else:
            good_people[r["applicant_id"]] = r
    good_loans, bad_loans = {}, {}
    for r in (clean_loan(x) for x in source_rows(conn, schema, "loan_applications")):
        failed = loan_rules(r, good_people.get(r["applicant_id"]))
        if failed:
            bad_loans[r["application_id"]] = failed
        else:
            good_loans[r["application_id"]] = r
    return {
        "applicants": (good_people, bad_people),
        "loan_applications": (good_loans, bad_loans),
    }


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    return a == b


# ------------------------------------------------------------------ the machine


RETURNING = sql.SQL(columns_sql("applicants"))
ATTRIBUTES = source_schema.TABLES["applicants"].attributes


class SilverMachine(RuleBasedStateMachine):
    """One source schema and one warehouse per sequence; steps write, run and check."""

    applicants = Bundle("applicants")
    applications = Bundle("applications")

    def __init__(self) -> None:
        super().__init__()
        self.base: Settings = CONTEXT["settings"]
        self.schema = "p_" + uuid.uuid4().hex[:10]
        warehouse = Path(CONTEXT["tmp"]) / self.schema
        self.settings = replace(
            self.base,
            pg_schema=self.schema,
            storage_uri=str(warehouse)
            if not CONTEXT["s3"]
            else self.base.storage_uri + self.schema,
            stream_batch_seconds=0.2,
            stream_heartbeat_seconds=0.2,
        )
        self.conn = psycopg.connect(self.settings.pg_dsn.get(), autocommit=True)
        seed(self.conn, self.schema, rows=12, seed=7)
        self.storage = Storage.from_settings(self.settings)
        self.storage.check()
        self.streaming = False
        self.changes = 0
        self.transitions = 0
        self.truncated = False
        # Keys the stream has seen from their first state on: history must replay all.
        self.exact: set[int] = set()
        self.trace: list[str] = []  # what this sequence did, for a failure's message
        self.checked_at = 0
        self.next_key = 1_000
        # Committed states of each applicant, in commit order (the stream sees them all).
        self.states: dict[int, list[dict[str, Any] | None]] = {}
        self.counts = CONTEXT["counts"]
        self.counts["sequences"] += 1

    def teardown(self) -> None:
        try:
            self.settle()
            self.check()
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        """Drop the sequence's source schema, slot and publication."""
        from tests.conftest import drop_stream_objects

        with psycopg.connect(self.settings.pg_dsn.get(), autocommit=True) as conn:
            drop_stream_objects(conn, self.schema)
            source_schema.drop_schema(conn, self.schema)
        self.conn.close()

    # ---------------------------------------------------------------- writes

    def table(self, name: str) -> sql.Composable:
        return sql.Identifier(self.schema, name)

    def write(
        self, statement: sql.Composable, args: list[Any] | tuple[Any, ...] | None = None
    ) -> list[dict[str, Any]]:
        text = statement.as_string(self.conn)
        self.trace.append(f"{text.split(' RETURNING ')[0][:200]} {args!r}")
        cur = self.conn.execute(statement, args)
        self.counts["changes"] += max(cur.rowcount, 0)
        self.changes += max(cur.rowcount, 0)
        if cur.description is None:
            return []
        names = [d.name for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def remember(self, rows: list[dict[str, Any]], *, new: bool = False) -> None:
        for r in rows:
            if new and self.streaming and r["applicant_id"] not in self.states:
                self.exact.add(r["applicant_id"])
            self.states.setdefault(r["applicant_id"], []).append(r)

    @initialize(target=applicants, people=st.lists(applicant_values(), min_size=2, max_size=4))
    def some_applicants(self, people: list[dict[str, Any]]) -> Any:
        """Start every sequence with a few applicants of its own (the seed has 12 more)."""
        keys = [
            self.insert_applicant(values, {"created_at": None, "updated_at": None}, None)
            for values in people
        ]
        return multiple(*keys)

    @rule(
        target=applicants,
        values=applicant_values(),
        times=applicant_times(),
        key=st.one_of(st.none(), st.sampled_from([0, -1, INT64[1]])),
    )
    def insert_applicant(
        self, values: dict[str, Any], times: dict[str, str | None], key: int | None
    ) -> int:
        if key is None or key in self.states:
            key = self.next_key
            self.next_key += 1
        row = {**values, "applicant_id": key, **{k: v for k, v in times.items() if v is not None}}
        cols = list(row)
        casts = [
            sql.SQL("%s::timestamptz") if c in ("created_at", "updated_at") else sql.SQL("%s")
            for c in cols
        ]
        self.remember(
            self.write(
                sql.SQL("INSERT INTO {} ({}) VALUES ({}) RETURNING {}").format(
                    self.table("applicants"),
                    sql.SQL(", ").join(map(sql.Identifier, cols)),
                    sql.SQL(", ").join(casts),
                    RETURNING,
                ),
                [row[c] for c in cols],
            ),
            new=True,
        )
        return key

    @rule(
        key=applicants,
        values=applicant_values(),
        columns=st.sets(
            st.sampled_from(
                [
                    "person_age",
                    "person_income",
                    "credit_score",
                    "person_gender",
                    "person_home_ownership",
                ]
            ),
            min_size=1,
        ),
    )
    def update_applicant(self, key: int, values: dict[str, Any], columns: set[str]) -> None:
        sets = sql.SQL(", ").join(
            sql.SQL("{} = %s").format(sql.Identifier(c)) for c in sorted(columns)
        )
        self.remember(
            self.write(
                sql.SQL("UPDATE {} SET {} WHERE applicant_id = %s RETURNING {}").format(
                    self.table("applicants"), sets, RETURNING
                ),
                [*[values[c] for c in sorted(columns)], key],
            )
        )

    @rule(key=applicants, column=st.sampled_from(["person_gender", "person_home_ownership"]))
    def toast_then_update_around_it(self, key: int, column: str) -> None:
        """A value stored out of line, then updates that leave it unchanged (pgoutput's 'u')."""
        big = os.urandom(3_000).hex()
        self.remember(
            self.write(
                sql.SQL("UPDATE {} SET {} = %s WHERE applicant_id = %s RETURNING {}").format(
                    self.table("applicants"), sql.Identifier(column), RETURNING
                ),
                [big, key],
            )
        )
        self.remember(
            self.write(
                sql.SQL(
                    "UPDATE {} SET credit_score = credit_score WHERE applicant_id = %s RETURNING {}"
                ).format(self.table("applicants"), RETURNING),
                [key],
            )
        )

    @rule(target=applicants, key=consumes(applicants))
    def change_key(self, key: int) -> int:
        new = self.next_key
        self.next_key += 1
        rows = self.write(
            sql.SQL(
                "UPDATE {} a SET applicant_id = %s WHERE applicant_id = %s AND NOT EXISTS "
                "(SELECT 1 FROM {} l WHERE l.applicant_id = a.applicant_id) RETURNING {}"
            ).format(self.table("applicants"), self.table("loan_applications"), RETURNING),
            [new, key],
        )
        if not rows:
            return key  # it has applications: the foreign key keeps its key
        self.states.setdefault(key, []).append(None)
        self.exact.discard(key)
        self.remember(rows, new=True)
        return new

    @rule(key=consumes(applicants))
    def delete_applicant(self, key: int) -> None:
        self.write(
            sql.SQL("DELETE FROM {} WHERE applicant_id = %s").format(
                self.table("loan_applications")
            ),
            [key],
        )
        if self.write(
            sql.SQL("DELETE FROM {} WHERE applicant_id = %s RETURNING applicant_id").format(
                self.table("applicants")
            ),
            [key],
        ):
            self.states.setdefault(key, []).append(None)

    @rule(
        target=applications,
        applicant=applicants,
        values=loan_values(),
        applied=st.one_of(
            st.none(),
            st.none(),
            st.none(),
            ODD_TIMES,
            moment(EARLIEST, datetime(2024, 1, 1, tzinfo=UTC)),
        ),
    )
    def insert_application(
        self, applicant: int, values: dict[str, Any], applied: str | None
    ) -> int:
        # loan_percent_income as the application computes it from the applicant's income.
        income = self.conn.execute(
            sql.SQL("SELECT person_income FROM {} WHERE applicant_id = %s").format(
                self.table("applicants")
            ),
            [applicant],
        ).fetchone()
        if income is None:
            return -1
        try:
            share = round(values["loan_amnt"] / income[0], 2)
            share = share if math.isfinite(share) else 0.5
        except (ZeroDivisionError, TypeError, OverflowError):
            share = 0.5
        row = {**values, "applicant_id": applicant, "loan_percent_income": share}
        if applied is not None:
            row["applied_at"] = applied
        cols = list(row)
        casts = [sql.SQL("%s::timestamptz") if c == "applied_at" else sql.SQL("%s") for c in cols]
        rows = self.write(
            sql.SQL("INSERT INTO {} ({}) VALUES ({}) RETURNING application_id").format(
                self.table("loan_applications"),
                sql.SQL(", ").join(map(sql.Identifier, cols)),
                sql.SQL(", ").join(casts),
            ),
            [row[c] for c in cols],
        )
        return int(rows[0]["application_id"])

    @rule(key=applications, status=st.sampled_from([0, 1, None, 7]))
    def decide(self, key: int, status: int | None) -> None:
        self.write(
            sql.SQL("UPDATE {} SET loan_status = %s WHERE application_id = %s").format(
                self.table("loan_applications")
            ),
            [status, key],
        )

    @rule(key=consumes(applications))
    def withdraw(self, key: int) -> None:
        self.write(
            sql.SQL("DELETE FROM {} WHERE application_id = %s").format(
                self.table("loan_applications")
            ),
            [key],
        )

    @precondition(lambda self: not self.truncated)
    @rule()
    def truncate_applications(self) -> None:
        self.truncated = True
        self.counts["truncates"] += 1
        self.write(sql.SQL("TRUNCATE {}").format(self.table("loan_applications")))

    # ---------------------------------------------------------------- runs

    @precondition(lambda self: not self.streaming)
    @rule(writers=st.sampled_from([1, 1, 4]))
    def batch_run(self, writers: int) -> None:
        self.trace.append(f"batch run, {writers} writers")
        for table in ("loan_applications", "applicants"):
            bronze.ingest(self.settings, self.storage, table)
        self.counts["batch runs"] += 1
        self.promote(writers)

    def promote(self, writers: int) -> None:
        errors: list[BaseException] = []

        def writer() -> None:
            try:
                for table in ("applicants", "loan_applications"):
                    silver.promote(Storage.from_settings(self.settings), table)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer) for _ in range(writers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if writers > 1:
            self.counts["concurrent writers"] += 1
        assert not errors, errors

    @precondition(lambda self: not self.streaming and self.transitions < 3)
    @rule()
    def start_streaming(self) -> None:
        from stream import setup

        self.trace.append("stream setup")
        setup.setup(self.settings, self.storage)
        self.streaming = True
        self.transitions += 1
        self.counts["setups"] += 1

    @precondition(lambda self: self.streaming)
    @rule(promote=st.booleans())
    def stream_run(self, promote: bool) -> None:
        from tests.stream.helpers import stream_while

        self.trace.append(f"stream run, promote={promote}")
        stream_while(self.settings, self.storage, lambda: None, promote=promote)
        self.counts["stream runs"] += 1

    @precondition(lambda self: self.streaming)
    @rule(after=st.floats(0.5, 3.0))
    def stream_killed(self, after: float) -> None:
        child = subprocess.Popen(
            [sys.executable, "-m", "lakehouse.cli", "stream", "--promote"],
            env={**os.environ, **env_for(self.settings)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(after)
        self.trace.append(f"stream --promote killed after {after:.2f}s")
        child.send_signal(signal.SIGKILL)
        child.wait()
        self.counts["kills"] += 1
        self.wait_slots_free()

    def wait_slots_free(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            row = self.conn.execute(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE %s AND active",
                (f"%{self.schema}%",),
            ).fetchone()
            if row and row[0] == 0:
                return
            time.sleep(0.1)

    @precondition(lambda self: self.streaming)
    @rule()
    def stop_streaming(self) -> None:
        from stream import setup
        from tests.stream.helpers import stream_while

        stream_while(self.settings, self.storage, lambda: None, promote=True)
        self.trace.append("stream teardown")
        setup.teardown(self.settings, self.storage)
        self.streaming = False
        self.exact.clear()
        self.transitions += 1

    # ---------------------------------------------------------------- checks

    def settle(self) -> None:
        """Let silver catch up with everything committed."""
        if self.streaming:
            from tests.stream.helpers import stream_while

            stream_while(self.settings, self.storage, lambda: None)
        else:
            for table in ("loan_applications", "applicants"):
                bronze.ingest(self.settings, self.storage, table)
        self.promote(1)

    @precondition(lambda self: self.changes - self.checked_at >= 6)
    @rule()
    def settle_and_check(self) -> None:
        self.settle()
        self.check()
        self.checked_at = self.changes

    @rule(data=st.data(), size=st.integers(2, 8))
    def burst(self, data: st.DataObject, size: int) -> None:
        """Several writes in a row, as a front end makes them: updates, decisions, loans."""
        people = sorted(k for k, states in self.states.items() if states and states[-1] is not None)
        if not people:
            return
        for _ in range(size):
            key = data.draw(st.sampled_from(people))
            kind = data.draw(st.sampled_from(["update", "update", "loan", "decide", "toast"]))
            if kind == "update":
                self.update_applicant(
                    key, data.draw(applicant_values()), {data.draw(st.sampled_from(ATTRIBUTES))}
                )
            elif kind == "loan":
                self.insert_application(key, data.draw(loan_values()), None)
            elif kind == "toast":
                self.toast_then_update_around_it(key, "person_home_ownership")
            else:
                self.write(
                    sql.SQL("UPDATE {} SET loan_status = %s WHERE applicant_id = %s").format(
                        self.table("loan_applications")
                    ),
                    [data.draw(st.sampled_from([0, 1, None])), key],
                )

    def check(self) -> None:
        self.trace.append("check")
        try:
            self._check()
        except AssertionError as exc:
            path = Path(CONTEXT["tmp"]) / f"{self.schema}.trace"
            path.write_text("\n".join(self.trace))
            raise AssertionError(f"{exc}\n(steps in {path})") from None

    def _check(self) -> None:
        self.counts["checks"] += 1
        expected = oracle(self.conn, self.schema)
        for table, key in (("applicants", "applicant_id"), ("loan_applications", "application_id")):
            good, bad = expected[table]
            current = read(self.storage, "silver", table)
            assert current[key].is_unique().all(), f"{table}: a key twice in silver"
            got = {r[key]: r for r in current.iter_rows(named=True)}
            assert set(got) == set(good), (
                f"{table}: in silver, not valid in the source: {sorted(set(got) - set(good))[:5]}; "
                f"valid in the source, not in silver: {sorted(set(good) - set(got))[:5]}"
            )
            for k, want in good.items():
                row = got[k]
                for column, value in want.items():
                    if column.startswith("_"):
                        continue
                    if column == "previous_loan_defaults_on_file":
                        value = value == "Yes"
                    assert same(row[column], value), (table, k, column, row[column], value)
            rejected = (
                read(self.storage, "silver", f"{table}_rejected")
                if self.storage.exists("silver", f"{table}_rejected")
                else pl.DataFrame(
                    schema={
                        key: pl.Int64,
                        "is_current": pl.Boolean,
                        "_failed_rules": pl.List(pl.Utf8),
                    }
                )
            )
            now = rejected.filter(pl.col("is_current"))
            assert now[key].is_unique().all(), f"{table}: two current rejects of one key"
            held = dict(now.select(key, "_failed_rules").iter_rows())
            assert set(held) == set(bad), (
                f"{table}: rejected now, not failing: {sorted(set(held) - set(bad))[:5]}; "
                f"failing, not rejected: {sorted(set(bad) - set(held))[:5]}"
            )
            for k, rules in bad.items():
                if held[k] != rules:
                    row = now.filter(pl.col(key) == k).row(0, named=True)
                    source = next(
                        r for r in source_rows(self.conn, self.schema, table) if r[key] == k
                    )
                    raise AssertionError((table, k, held[k], rules, row, source))
            self.check_history(table, key, current)
        self.check_replay()
        from lakehouse.verify import Verification, verify

        results: list[Verification] = []

        def compare() -> None:
            results.extend(verify(self.settings, self.storage, timeout=60))

        if self.streaming:  # verify waits until the stream has landed past its fence
            from tests.stream.helpers import stream_while

            stream_while(self.settings, self.storage, compare)
        else:
            compare()
        for result in results:
            assert result.ok, (result.table, result.differences[:5])

    def check_history(self, table: str, key: str, current: pl.DataFrame) -> None:
        history = read(self.storage, "silver", f"{table}_history")
        version = [key, "_lsn", "_seq"]
        if table == "applicants":
            assert history.select(version).is_unique().all(), f"{table}: a version twice"
        else:
            # An application leaves silver with its applicant and comes back with it: the
            # same source version again, after a gap (never a copy beside the first).
            copies = history.sort("valid_from").with_columns(
                copy=pl.int_range(pl.len()).over(version),
                prev=pl.col("valid_to").shift(1).over(version),
            )
            glued = copies.filter(
                (pl.col("copy") > 0)
                & (pl.col("prev").is_null() | (pl.col("prev") >= pl.col("valid_from")))
            )
            assert glued.height == 0, f"{table}: a version twice without a gap {glued.head(3)}"
        opened = history.filter(pl.col("valid_to").is_null())
        assert opened[key].is_unique().all(), f"{table}: two open versions"
        assert sorted(opened[key]) == sorted(current[key])
        ordered = history.sort(key, "valid_from")
        assert ordered.filter(pl.col("valid_to") <= pl.col("valid_from")).height == 0
        overlap = ordered.with_columns(prev=pl.col("valid_to").shift(1).over(key)).filter(
            pl.col("prev").is_null().not_() & (pl.col("prev") > pl.col("valid_from"))
        )
        assert overlap.height == 0, f"{table}: overlapping versions {overlap.head(3)}"
        same_open = opened.select(current.columns).sort(key).equals(current.sort(key))
        assert same_open, f"{table}: an open version differs from its current row"

    def check_replay(self) -> None:
        """History's versions are source states that passed, in commit order (all of them
        when the stream saw every change)."""
        history = read(self.storage, "silver", "applicants_history").sort(
            "applicant_id", "valid_from"
        )
        self.counts["versions checked"] += history.height
        for (key,), versions in history.group_by("applicant_id", maintain_order=True):
            states = [clean_applicant(s) for s in self.states.get(int(key), []) if s is not None]
            if not states:
                continue  # seeded before the sequence: only its current state is known
            passed = [attributes(s) for s in states if not applicant_rules(s)]
            got = [
                tuple(r[c] for c in ATTRIBUTES)
                for r in versions.with_columns(
                    pl.when(pl.col("previous_loan_defaults_on_file"))
                    .then(pl.lit("Yes"))
                    .otherwise(pl.lit("No"))
                    .alias("previous_loan_defaults_on_file")
                ).iter_rows(named=True)
            ]
            remaining = iter(passed)
            assert all(any(version == p for p in remaining) for version in got), (key, got, passed)
            if int(key) in self.exact:
                self.counts["keys replayed exactly"] += 1
                assert got == passed, (key, got, passed)


def attributes(state: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(state[c] for c in ATTRIBUTES)


CONTEXT: dict[str, Any] = {}


def s3_on(base: Settings, request: pytest.FixtureRequest) -> Settings:
    """Settings whose warehouse is a prefix in a bucket of the test S3 server."""
    settings = s3_settings(base, request.getfixturevalue("s3_endpoint"))
    return replace(settings, storage_uri=settings.storage_uri + "/")


# CI: random sequences on local disk (the scripted sequence below covers S3); by hand, both.
@pytest.mark.parametrize("where", ["local", "s3"] if LONG else ["local"])
def test_silver_equals_the_source_whatever_happens(
    where: str, base_settings: Settings, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    from collections import Counter

    counts: Counter[str] = Counter()
    CONTEXT.clear()
    CONTEXT.update(settings=base_settings, tmp=tmp_path, s3=where == "s3", counts=counts)
    if where == "s3":
        CONTEXT["settings"] = s3_on(base_settings, request)
    run_state_machine_as_test(
        SilverMachine,
        settings=settings(
            max_examples=SEQUENCES if where == "local" else SEQUENCES // 5,
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=not LONG,
            phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target]
            if os.environ.get("HYPOTHESIS_NO_SHRINK")
            else list(Phase),
        ),
    )
    print(f"\n{where}: {dict(counts)}")
    assert counts["checks"] >= counts["sequences"] > 0


GOOD_PERSON = {
    "person_age": 40,
    "person_gender": "female",
    "person_education": "Master",
    "person_income": 60_000.0,
    "person_emp_exp": 3,
    "person_home_ownership": "RENT",
    "cb_person_cred_hist_length": 2,
    "credit_score": 700,
    "previous_loan_defaults_on_file": "No",
}
GOOD_LOAN = {
    "loan_amnt": 6_000.0,
    "loan_intent": "MEDICAL",
    "loan_int_rate": 9.5,
    "loan_status": None,
}
NOW = {"created_at": None, "updated_at": None}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_scripted_sequence_takes_every_kind_of_step(
    where: str, base_settings: Settings, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The machine's steps in one fixed order, so that every CI run exercises each kind
    (Hypothesis' swarm testing may leave some out of a few short random sequences):
    several writers at once, the stream killed mid-batch, TOAST and key changes under the
    stream, a good row turning bad and back, late parents, a truncate, stream teardown."""
    from collections import Counter

    counts: Counter[str] = Counter()
    CONTEXT.clear()
    CONTEXT.update(settings=base_settings, tmp=tmp_path, s3=where == "s3", counts=counts)
    if where == "s3":
        CONTEXT["settings"] = s3_on(base_settings, request)
    machine = SilverMachine()
    writers = 4 if where == "local" else 2  # each S3 round trip is slow: fewer retries
    try:
        people = [machine.insert_applicant(GOOD_PERSON, NOW, None) for _ in range(3)]
        loans = [machine.insert_application(p, GOOD_LOAN, None) for p in people]
        machine.batch_run(writers)
        machine.check()
        machine.start_streaming()
        machine.toast_then_update_around_it(people[1], "person_gender")
        machine.update_applicant(people[0], {**GOOD_PERSON, "person_age": 7}, {"person_age"})
        late = machine.insert_applicant({**GOOD_PERSON, "person_age": 12}, NOW, None)
        machine.insert_application(late, GOOD_LOAN, None)  # its applicant is rejected
        machine.stream_run(True)  # people[0]'s loan leaves silver with them
        machine.decide(loans[2], 1)
        machine.update_applicant(late, GOOD_PERSON, {"person_age"})  # the parent arrives
        machine.update_applicant(people[0], GOOD_PERSON, {"person_age"})  # back, with the loan
        if where == "local":  # (S3: CI time; tests/stream kill the stream on S3)
            machine.stream_killed(1.5)
            machine.stream_run(True)
        machine.settle()
        machine.check()
        back = read(machine.storage, "silver", "loan_applications_history").filter(
            pl.col("application_id") == loans[0]
        )
        assert back.height == 2 and back["_lsn"].n_unique() == 1, back  # left, came back
        machine.withdraw(loans[1])
        people[2] = machine.change_key(people[2])  # its loan holds the key: unchanged
        machine.delete_applicant(people[2])
        moved = machine.change_key(machine.insert_applicant(GOOD_PERSON, NOW, None))
        machine.truncate_applications()
        machine.stop_streaming()
        machine.insert_application(moved, GOOD_LOAN, None)
        machine.batch_run(writers)
    except BaseException:
        machine.cleanup()
        raise
    machine.teardown()  # settles and checks
    kinds = ["batch runs", "concurrent writers", "setups", "stream runs", "truncates"]
    for kind in kinds + (["kills"] if where == "local" else []):
        assert counts[kind] >= 1, (kind, dict(counts))
    assert counts["checks"] == 3 and counts["versions checked"] > 10, dict(counts)
