"""Silver's event logic against a model written independently, over random event sequences.

The model is a plain loop: one key at a time, one event at a time. The transforms are
vectorised Polars over all keys at once. Hypothesis draws events (stream changes, batch
rows that may repeat what silver holds, repairs, deletes, good and bad versions, clocks
that step back) and the prior state of each key; the two must agree exactly. A second
property splits the same events into consecutive promotions, deriving each one's prior
state from the tables the previous ones wrote: the result must equal one promotion.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lakehouse.transforms import silver

T0 = datetime(2026, 1, 1, tzinfo=UTC)
US = timedelta(microseconds=1)
EXAMPLES = int(os.environ.get("LAKEHOUSE_HYPOTHESIS_EXAMPLES", "200"))


@dataclass(frozen=True)
class Event:
    key: int
    op: str  # upsert | delete
    lsn: int
    seq: int
    ts: datetime | None
    value: int
    good: bool
    stream: bool
    repair: bool = False


@st.composite
def events(draw: st.DrawFn) -> list[Event]:
    out = []
    n = draw(st.integers(0, 30))
    lsn = 100
    for _ in range(n):
        lsn += draw(st.integers(0, 3))  # equal LSNs: one batch, or one transaction
        stream = draw(st.booleans())
        seq = draw(st.integers(1, 5)) if stream else -1
        key = draw(st.integers(1, 4))
        op = draw(st.sampled_from(["upsert", "upsert", "upsert", "delete"]))
        # Timestamps jump back and forth: order must never come from them. (Never null:
        # bronze fills a missing one from the commit or ingest time.)
        ts = T0 + timedelta(seconds=draw(st.integers(-5, 5)))
        out.append(
            Event(
                key,
                op,
                lsn,
                seq,
                ts,
                draw(st.integers(0, 2)),
                draw(st.booleans()),
                stream,
                repair=not stream and draw(st.integers(0, 9)) == 0,
            )
        )
    # Stream positions are unique; batch rows of one key at one LSN are one snapshot.
    seen: set[tuple[int, int, int]] = set()
    unique = []
    for e in out:
        slot = (e.key, e.lsn, e.seq) if e.stream else (e.key, e.lsn, -1 if e.op == "upsert" else -2)
        if slot not in seen:
            seen.add(slot)
            unique.append(e)
    return unique


@dataclass
class KeyState:
    state: str | None = None  # good | bad | None
    value: int | None = None
    good_flag: bool | None = None
    instant: datetime | None = None


@st.composite
def priors(draw: st.DrawFn) -> dict[int, KeyState]:
    out = {}
    for key in range(1, 5):
        state = draw(st.sampled_from([None, "good", "bad"]))
        instant = (
            T0 + timedelta(seconds=draw(st.integers(-10, 10))) if draw(st.booleans()) else None
        )
        if state is None:
            out[key] = KeyState(None, None, None, instant)
        else:
            out[key] = KeyState(state, draw(st.integers(0, 2)), state == "good", instant)
    return out


def image(value: int | None, good: bool | None) -> int | None:
    """Stand-in for the hash of clean values: value and validity decide the outcome."""
    return None if value is None else value * 2 + int(bool(good))


def to_frames(evs: list[Event], prior: dict[int, KeyState]) -> tuple[pl.DataFrame, pl.DataFrame]:
    rows = pl.DataFrame(
        {
            "id": [e.key for e in evs],
            "_op": [e.op for e in evs],
            "_lsn": [e.lsn for e in evs],
            "_seq": [e.seq for e in evs],
            "_source_ts": [e.ts for e in evs],
            "value": [e.value if e.op == "upsert" else None for e in evs],
            "_stream": [e.stream for e in evs],
            "_repair": [e.repair for e in evs],
            "_synthetic": [False] * len(evs),
            "_state": [None if e.op == "delete" else ("good" if e.good else "bad") for e in evs],
            "_image": [image(e.value, e.good) if e.op == "upsert" else None for e in evs],
        },
        schema={
            "id": pl.Int64,
            "_op": pl.Utf8,
            "_lsn": pl.Int64,
            "_seq": pl.Int64,
            "_source_ts": pl.Datetime("us", "UTC"),
            "value": pl.Int64,
            "_stream": pl.Boolean,
            "_repair": pl.Boolean,
            "_synthetic": pl.Boolean,
            "_state": pl.Utf8,
            "_image": pl.UInt64,
        },
    )
    keys = sorted(prior)
    state = pl.DataFrame(
        {
            "id": keys,
            "_prior_state": [prior[k].state for k in keys],
            "_prior_image": [image(prior[k].value, prior[k].good_flag) for k in keys],
            "_prior_instant": [prior[k].instant for k in keys],
        },
        schema={
            "id": pl.Int64,
            "_prior_state": pl.Utf8,
            "_prior_image": pl.UInt64,
            "_prior_instant": pl.Datetime("us", "UTC"),
        },
    )
    return rows, state


def run_transform(rows: pl.DataFrame, state: pl.DataFrame) -> silver.Outcome:
    ordered = silver.ordered(rows, "id")
    kept = silver.drop_repeats(ordered, state, "id")
    timed = silver.instants(kept, state, "id")
    return silver.outcome(timed, state, "id")


@dataclass
class Tables:
    """What the three targets hold, merged the way the MERGEs merge."""

    history: list[dict[str, object]] = field(default_factory=list)
    rejects: list[dict[str, object]] = field(default_factory=list)
    current: dict[int, int] = field(default_factory=dict)


def model(evs: list[Event], prior: dict[int, KeyState], tables: Tables) -> None:
    """Apply the events one by one, key by key, as the README describes silver."""

    def order(e: Event) -> tuple[object, ...]:
        rank = 0 if e.op == "delete" else 1
        ts = e.ts or datetime.min.replace(tzinfo=UTC)
        return (e.key, e.lsn, e.seq, rank, e.ts is not None, ts)

    by_key: dict[int, list[Event]] = {}
    for e in sorted(evs, key=order):
        by_key.setdefault(e.key, []).append(e)
    for key, chain in by_key.items():
        p = prior.get(key, KeyState())
        state, img, last = p.state, image(p.value, p.good_flag), p.instant
        first = True
        for e in chain:
            e_img = image(e.value, e.good) if e.op == "upsert" else None
            if (
                not e.stream
                and not e.repair
                and e.op == "upsert"
                and img is not None
                and e_img == img
            ):
                continue  # a batch repeating the version silver holds
            if e.op == "delete" and state is None:
                continue  # nothing to delete
            floor = None if last is None else last + US
            candidates = [t for t in (e.ts, floor) if t is not None]
            at = max(candidates) if candidates else None
            if first:
                if state == "good":
                    for row in tables.history:
                        if row["id"] == key and row["valid_to"] is None:
                            row["valid_to"], row["is_current"] = at, False
                if state == "bad":
                    for row in tables.rejects:
                        if row["id"] == key and row["is_current"]:
                            row["valid_to"], row["is_current"] = at, False
                first = False
            else:
                # Close what the previous event of this promotion opened.
                for row in tables.history:
                    if row["id"] == key and row["valid_to"] is None:
                        row["valid_to"], row["is_current"] = at, False
                for row in tables.rejects:
                    if row["id"] == key and row["is_current"]:
                        row["valid_to"], row["is_current"] = at, False
            if e.op == "delete":
                state, img = None, None
                tables.current.pop(key, None)
            elif e.good:
                state, img = "good", e_img
                tables.history.append(
                    {
                        "id": key,
                        "value": e.value,
                        "valid_from": at,
                        "valid_to": None,
                        "is_current": True,
                    }
                )
                tables.current[key] = e.value
            else:
                state, img = "bad", e_img
                tables.rejects.append(
                    {
                        "id": key,
                        "value": e.value,
                        "valid_from": at,
                        "valid_to": None,
                        "is_current": True,
                    }
                )
                tables.current.pop(key, None)
            last = at if at is not None else last


def apply(outcome: silver.Outcome, tables: Tables) -> None:
    """Merge an outcome into the tables as the Delta MERGEs do."""
    for key, close_at in outcome.history_closings.select("id", "_close_at").iter_rows():
        for row in tables.history:
            if row["id"] == key and row["valid_to"] is None:
                row["valid_to"], row["is_current"] = close_at, False
    for row in outcome.history.select(
        "id", "value", "valid_from", "valid_to", "is_current"
    ).iter_rows(named=True):
        tables.history.append(row)
    for key, close_at in outcome.reject_closings.select("id", "_close_at").iter_rows():
        for row in tables.rejects:
            if row["id"] == key and row["is_current"]:
                row["valid_to"], row["is_current"] = close_at, False
    for row in outcome.rejects.select(
        "id", "value", "valid_from", "valid_to", "is_current"
    ).iter_rows(named=True):
        tables.rejects.append(row)
    for key, op, value in outcome.current.select("id", "_op", "value").iter_rows():
        if op == "upsert":
            tables.current[key] = value
        else:
            tables.current.pop(key, None)


def prior_from(tables: Tables, start: dict[int, KeyState]) -> dict[int, KeyState]:
    """Each key's state as the promotion reads it from the tables."""
    out = {}
    for key in range(1, 5):
        opened = [r for r in tables.history if r["id"] == key and r["valid_to"] is None]
        bad = [r for r in tables.rejects if r["id"] == key and r["is_current"]]
        times = [
            t
            for r in tables.history
            if r["id"] == key
            for t in (r["valid_from"], r["valid_to"])
            if t is not None
        ]
        times += [
            t
            for r in tables.rejects
            if r["id"] == key
            for t in (r["valid_from"], r["valid_to"])
            if t is not None
        ]
        if start[key].instant is not None:
            times.append(start[key].instant)
        instant = max(times) if times else None
        if opened:
            out[key] = KeyState("good", opened[0]["value"], True, instant)
        elif bad:
            out[key] = KeyState("bad", bad[0]["value"], False, instant)
        else:
            out[key] = KeyState(None, None, None, instant)
    return out


def seeded(prior: dict[int, KeyState]) -> Tables:
    tables = Tables()
    for key, p in prior.items():
        if p.state == "good":
            tables.history.append(
                {
                    "id": key,
                    "value": p.value,
                    "valid_from": p.instant,
                    "valid_to": None,
                    "is_current": True,
                }
            )
            tables.current[key] = p.value
        elif p.state == "bad":
            tables.rejects.append(
                {
                    "id": key,
                    "value": p.value,
                    "valid_from": p.instant,
                    "valid_to": None,
                    "is_current": True,
                }
            )
    return tables


def canonical(tables: Tables) -> tuple[object, ...]:
    def rows(items: list[dict[str, object]]) -> list[tuple[object, ...]]:
        return sorted((tuple(sorted(r.items())) for r in items), key=repr)

    return rows(tables.history), rows(tables.rejects), sorted(tables.current.items())


FAST = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(events(), priors())
def test_transform_equals_the_one_key_at_a_time_model(
    evs: list[Event], prior: dict[int, KeyState]
) -> None:
    rows, state = to_frames(evs, prior)
    got, want = seeded(prior), seeded(prior)
    apply(run_transform(rows, state), got)
    model(evs, prior, want)
    assert canonical(got) == canonical(want)


@FAST
@given(events(), priors(), st.lists(st.integers(0, 40), max_size=4))
def test_consecutive_promotions_equal_one(
    evs: list[Event], prior: dict[int, KeyState], cuts: list[int]
) -> None:
    """Split by WAL position, each promotion reading its prior from the tables: the same."""
    whole = seeded(prior)
    apply(run_transform(*to_frames(evs, prior)), whole)
    pieces = seeded(prior)
    by_position = sorted(evs, key=lambda e: (e.lsn, e.seq))
    start = 0
    for cut in sorted({*[min(c, len(evs)) for c in cuts], len(evs)}):
        # A cut never splits one LSN (a batch, or a transaction, lands whole).
        while 0 < cut < len(by_position) and by_position[cut - 1].lsn == by_position[cut].lsn:
            cut += 1
        chunk = by_position[start:cut]
        start = max(start, cut)
        if chunk:
            apply(run_transform(*to_frames(chunk, prior_from(pieces, prior))), pieces)
    assert canonical(pieces) == canonical(whole)


@FAST
@given(events(), priors())
def test_instants_strictly_increase_and_intervals_are_never_empty(
    evs: list[Event], prior: dict[int, KeyState]
) -> None:
    got = seeded(prior)
    apply(run_transform(*to_frames(evs, prior)), got)
    for key in range(1, 5):
        versions = sorted(
            (r for r in got.history if r["id"] == key and r["valid_from"] is not None),
            key=lambda r: r["valid_from"],  # type: ignore[arg-type,return-value]
        )
        opened = [r for r in versions if r["valid_to"] is None]
        assert len(opened) <= 1
        for r in versions:
            assert r["valid_to"] is None or r["valid_to"] > r["valid_from"]  # type: ignore[operator]
        for a, b in itertools.pairwise(versions):
            assert a["valid_to"] is not None and a["valid_to"] <= b["valid_from"]  # type: ignore[operator]


def test_a_clock_that_stepped_back_does_not_reorder() -> None:
    """Issue 13, reproduction 2 in miniature: WAL order wins over updated_at."""
    evs = [
        Event(1, "upsert", 100, 1, T0 + timedelta(days=365 * 4), 1, True, True),
        Event(1, "upsert", 101, 1, T0, 2, True, True),
    ]
    got = seeded({})
    apply(run_transform(*to_frames(evs, {})), got)
    assert got.current == {1: 2}
    later = T0 + timedelta(days=365 * 4)
    assert sorted((r["value"], r["valid_from"], r["valid_to"]) for r in got.history) == [
        (1, later, later + US),
        (2, later + US, None),
    ]
