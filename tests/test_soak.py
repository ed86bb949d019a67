"""The native crash soak (tests/soak.py), CI-sized: every case, fresh processes, no crash."""

from __future__ import annotations

from tests.soak import CASES, report, soak


def test_no_native_crash_in_the_commands_that_crashed_before() -> None:
    tallies = soak(runs=1, cases=list(CASES))
    assert all(t.runs == 1 for t in tallies.values())
    assert not any(t.crashes or t.failures for t in tallies.values()), report(tallies)
