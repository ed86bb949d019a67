"""The stream's speed layer (silver promotion, online refresh) fails loudly, and once.

It runs in its own thread beside the landing (`stream/speed.py`); an exception there must
not end the thread silently while bronze goes on landing and silver stays frozen.
"""

from __future__ import annotations

import pytest

from lakehouse.errors import StorageError
from lakehouse.settings import Settings
from lakehouse.storage import Storage
from stream import cdc, setup, speed
from tests.helpers import churn, seeded
from tests.stream.helpers import stream_settings, stream_while


@pytest.mark.parametrize("settings", ["local"], indirect=True)
def test_a_promotion_failing_with_a_foreign_error_stops_the_stream_with_it_once(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A storage error outside the lakehouse's own (an OSError from the disk, a delta-rs
    error) stops the stream as `lakehouse stream` reports errors: one StorageError,
    whichever of the two tables' sinks sees it first, and the flow ends cleanly."""
    settings = stream_settings(settings)
    storage = seeded(settings, rows=20)
    setup.setup(settings, storage)
    calls: list[str] = []

    def broken(storage_: Storage, table: str) -> None:
        calls.append(table)
        raise OSError("No space left on device")

    monkeypatch.setattr(speed, "_promote", broken)
    cdc.FAILURES.clear()
    cdc.CAPTURE.set()  # as `lakehouse stream` runs the flow
    try:
        # The flow stops at the error, before the rest of the changes land.
        with pytest.raises(AssertionError, match="the flow ended before"):
            stream_while(settings, storage, lambda: churn(settings, changes=20), promote=True)
    finally:
        cdc.CAPTURE.clear()
    failures = list(cdc.FAILURES)
    cdc.FAILURES.clear()
    assert calls, "the speed layer never ran"
    assert len(calls) == 1  # it stopped at the error: no cycle after it
    assert len(failures) == 1, failures
    assert isinstance(failures[0], StorageError)
    assert "No space left on device" in str(failures[0])
