"""`lakehouse simulate`: a realistic change stream against the source, by count or by rate."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import psycopg
from psycopg import sql

from lakehouse.errors import UsageError
from lakehouse.source.schema import APPLICANTS, ident
from lakehouse.source.seed import load_dataset

# Share of each kind of change; they sum to 1.
MIX = {
    "new_application": 0.30,
    "returning_application": 0.10,
    "decision": 0.35,
    "applicant_update": 0.15,
    "withdrawal": 0.10,
}

# The applicant's own columns (no key, no timestamp) and how to cast them in unnest().
_PERSON = tuple(APPLICANTS.attributes)
_PG_TYPES = tuple(
    {"integer": "int", "double precision": "float8"}.get(t, t)
    for name, t in APPLICANTS.columns
    if name in _PERSON
)


@dataclass
class SimulationResult:
    """Changes written, by kind."""

    counts: Counter[str] = field(default_factory=Counter)
    transactions: int = 0
    seconds: float = 0.0

    @property
    def total(self) -> int:
        """Return the number of changed rows."""
        return sum(self.counts.values())

    @property
    def changes(self) -> int:
        """Return the number of changes, as `--changes` counts them.

        A new customer's first application is one change that writes two rows (the
        customer and the application): `new_applicant` rows are not changes of their own.
        """
        return self.total - self.counts.get("new_applicant", 0)


class Simulator:
    """Writes batches of changes; each batch is one source transaction."""

    def __init__(self, conn: psycopg.Connection, schema: str, *, seed: int = 42) -> None:
        self.conn = conn
        self.schema = schema
        self.rng = np.random.default_rng(seed)
        self.data = load_dataset()

    def _t(self, table: str) -> sql.Composable:
        return ident(self.schema, table)

    def batch(self, size: int) -> Counter[str]:
        """Write about `size` changes in one transaction; return what was written."""
        kinds = self.rng.choice(list(MIX), size=size, p=list(MIX.values()))
        want = Counter(str(k) for k in kinds)
        done: Counter[str] = Counter()
        with self.conn.transaction():
            if want["new_application"]:
                done["new_applicant"], done["new_application"] = self._new_applications(
                    want["new_application"]
                )
            if want["returning_application"]:
                done["returning_application"] = self._returning(want["returning_application"])
            if want["decision"]:
                done["decision"] = self._decide(want["decision"])
            if want["applicant_update"]:
                done["applicant_update"] = self._update_applicants(want["applicant_update"])
            if want["withdrawal"]:
                done["withdrawal"] = self._withdraw(want["withdrawal"])
        return done

    def _sample(self, n: int) -> dict[str, list[object]]:
        rows = self.data[self.rng.integers(0, self.data.height, size=n)]
        return {c: rows[c].to_list() for c in rows.columns}

    def _new_applications(self, n: int) -> tuple[int, int]:
        cols = self._sample(n)
        unnest = sql.SQL(", ").join(sql.SQL("%s::{}[]").format(sql.SQL(t)) for t in _PG_TYPES)
        person = sql.SQL(", ").join(ident(c) for c in _PERSON)
        ids = self.conn.execute(
            sql.SQL("INSERT INTO {} ({}) SELECT * FROM unnest({}) RETURNING applicant_id").format(
                self._t("applicants"), person, unnest
            ),
            [
                [int(v) if t == "int" else v for v in cols[c]]  # type: ignore[call-overload]
                for c, t in zip(_PERSON, _PG_TYPES, strict=True)
            ],
        ).fetchall()
        applicant_ids = [r[0] for r in ids]
        return len(applicant_ids), self._insert_applications(applicant_ids, cols)

    def _insert_applications(self, applicant_ids: list[int], cols: dict[str, list[object]]) -> int:
        income = np.asarray(cols["person_income"], dtype=float)[: len(applicant_ids)]
        amount = np.asarray(cols["loan_amnt"], dtype=float)[: len(applicant_ids)]
        cur = self.conn.execute(
            sql.SQL(
                "INSERT INTO {} (applicant_id, loan_amnt, loan_intent, loan_int_rate, "
                "loan_percent_income) SELECT * FROM unnest(%s::bigint[], %s::float8[], "
                "%s::text[], %s::float8[], %s::float8[])"
            ).format(self._t("loan_applications")),
            [
                applicant_ids,
                amount.tolist(),
                cols["loan_intent"][: len(applicant_ids)],
                cols["loan_int_rate"][: len(applicant_ids)],
                np.round(amount / income, 2).tolist(),
            ],
        )
        return cur.rowcount

    def _returning(self, n: int) -> int:
        rows = self.conn.execute(
            sql.SQL(
                "SELECT a.applicant_id, a.person_income FROM {} a "
                "JOIN unnest(%s::bigint[]) AS r(id) ON a.applicant_id = r.id"
            ).format(self._t("applicants")),
            [self._random_ids("applicants", "applicant_id", n)],
        ).fetchall()
        if not rows:
            return 0
        cols = self._sample(len(rows))
        cols["person_income"] = [r[1] or 1.0 for r in rows]
        return self._insert_applications([r[0] for r in rows], cols)

    def _random_ids(self, table: str, key: str, n: int) -> list[int]:
        row = self.conn.execute(
            sql.SQL("SELECT coalesce(max({}), 0) FROM {}").format(ident(key), self._t(table))
        ).fetchone()
        top = int(row[0]) if row else 0
        if top == 0:
            return []
        return sorted({int(i) for i in self.rng.integers(1, top + 1, size=n)})

    def _decide(self, n: int) -> int:
        # Prior defaults mean rejection (as in the dataset); otherwise approve about 45%.
        cur = self.conn.execute(
            sql.SQL(
                "UPDATE {apps} l SET loan_status = CASE "
                "WHEN a.previous_loan_defaults_on_file = 'Yes' THEN 0 "
                "WHEN random() < 0.45 THEN 1 ELSE 0 END "
                "FROM {people} a WHERE a.applicant_id = l.applicant_id AND l.application_id IN "
                "(SELECT application_id FROM {apps} WHERE loan_status IS NULL "
                "ORDER BY random() LIMIT %s)"
            ).format(apps=self._t("loan_applications"), people=self._t("applicants")),
            [n],
        )
        return cur.rowcount

    def _update_applicants(self, n: int) -> int:
        ids = self._random_ids("applicants", "applicant_id", n)
        cur = self.conn.execute(
            sql.SQL(
                "UPDATE {} SET credit_score = least(850, greatest(390, "
                "credit_score + (random() * 40 - 20)::int)), "
                "person_income = round(person_income * (0.9 + random() * 0.25)) "
                "WHERE applicant_id = ANY(%s)"
            ).format(self._t("applicants")),
            [ids],
        )
        return cur.rowcount

    def _withdraw(self, n: int) -> int:
        cur = self.conn.execute(
            sql.SQL(
                "DELETE FROM {apps} WHERE application_id IN "
                "(SELECT application_id FROM {apps} WHERE loan_status IS NULL "
                "ORDER BY random() LIMIT %s)"
            ).format(apps=self._t("loan_applications")),
            [n],
        )
        return cur.rowcount


def simulate(
    conn: psycopg.Connection,
    schema: str,
    *,
    changes: int | None = None,
    rate: float | None = None,
    duration: float | None = None,
    batch_size: int = 100,
    seed: int = 42,
    stop: threading.Event | None = None,
    report: Callable[[SimulationResult], None] | None = None,
    report_every: float = 60.0,
) -> SimulationResult:
    """Write `changes` changes as fast as possible, or `rate` a second.

    At a rate, it runs for `duration` seconds, or without one until `stop` is set (the
    change stream of a long-running demo); `report` gets the running totals every
    `report_every` seconds.
    """
    if changes is None and rate is None:
        changes = 1_000
    if changes is not None and changes < 1:
        msg = f"--changes is {changes}; give a whole number of at least 1"
        raise UsageError(msg)
    if rate is not None and (rate <= 0 or (duration is not None and duration <= 0)):
        msg = "--rate needs a positive rate (and --duration, if given, positive seconds)"
        raise UsageError(msg)
    if batch_size < 1:
        msg = f"--batch-size is {batch_size}; give a whole number of at least 1"
        raise UsageError(msg)
    sim = Simulator(conn, schema, seed=seed)
    result = SimulationResult()
    start = time.monotonic()
    if changes is not None:
        left = changes
        while left > 0 and not (stop and stop.is_set()):
            size = min(batch_size, left)
            result.counts.update(sim.batch(size))
            result.transactions += 1
            left -= size
    else:
        assert rate is not None
        per_tick = max(1, round(rate / 10))
        tick = per_tick / rate
        next_at = start
        next_report = start + report_every
        while duration is None or time.monotonic() - start < duration:
            if stop is not None and stop.is_set():
                break
            result.counts.update(sim.batch(per_tick))
            result.transactions += 1
            next_at += tick
            now = time.monotonic()
            if report is not None and now >= next_report:
                result.seconds = now - start
                report(result)
                next_report += report_every
            pause = max(0.0, next_at - time.monotonic())
            if stop is not None:
                stop.wait(pause)
            else:
                time.sleep(pause)
    result.seconds = time.monotonic() - start
    return result
