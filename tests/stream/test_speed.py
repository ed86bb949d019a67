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

    def broken(storage_: Storage) -> None:
        calls.append(storage_.root)
        raise OSError("No space left on device")

    monkeypatch.setattr(speed, "_promote", broken)
    cdc.FAILURES.clear()
    cdc.CAPTURE.set()  # as `lakehouse stream` runs the flow
    try:
        # The flow stops at the error: before the rest of the changes land, or, if the
        # first cycle comes after they all landed, when the flow's end drains the layer.
        stream_while(settings, storage, lambda: churn(settings, changes=20), promote=True)
    except AssertionError as exc:
        assert "the flow ended before" in str(exc)
    finally:
        cdc.CAPTURE.clear()
    failures = list(cdc.FAILURES)
    cdc.FAILURES.clear()
    assert calls, "the speed layer never ran"
    assert len(calls) == 1  # it stopped at the error: no cycle after it
    assert len(failures) == 1, failures
    assert isinstance(failures[0], StorageError)
    assert "No space left on device" in str(failures[0])


def test_every_nudge_is_served_also_across_drains() -> None:
    """Landings nudge from the sinks' thread while a flow's end drains: after the last
    drain, every nudge has been served by a run that started after it, and a nudge
    after a drain starts the thread again (a later flow in the same process)."""
    import threading
    import time

    runs: list[int] = []

    class SlowToEnd(speed.Worker):
        """A thread that lingers after deciding to end: nudges fall into that window."""

        def _loop(self) -> None:
            super()._loop()
            time.sleep(0.005)

    worker = SlowToEnd("test", lambda: runs.append(1) is None)

    def nudges() -> None:
        for _ in range(300):
            worker.nudge()

    for _ in range(20):
        threads = [threading.Thread(target=nudges) for _ in range(3)]
        for t in threads:
            t.start()
        worker.drain()  # while they nudge: some nudges land during the drain
        for t in threads:
            t.join()
        worker.drain()
        assert worker._served == worker._asked  # nothing asked for is left undone
    before = len(runs)
    worker.nudge()
    worker.drain()
    assert len(runs) == before + 1
    assert not worker.stopped


def test_landing_waits_while_a_promotion_runs_and_each_promotion_is_refreshed(
    base_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sources are told to hold changes exactly while a promotion runs (they would
    wait for the next one anyway); the next promotion starts once every table of the
    flow has checked in what it held after the last one; every promotion is followed by
    a refresh, in the refresh thread, which a drain also finishes."""
    import threading

    from stream.monitor import Monitor

    storage = Storage.from_settings(base_settings)
    inside = threading.Event()
    release = threading.Event()
    refreshed: list[str] = []

    def promote(storage_: Storage) -> None:
        inside.set()
        assert release.wait(10)

    monkeypatch.setattr(speed, "_promote", promote)
    layer = speed.SpeedLayer(base_settings, storage, Monitor())
    monkeypatch.setattr(
        layer.refresher, "refresh", lambda: refreshed.append(threading.current_thread().name)
    )
    layer.expect(["applicants", "loan_applications"])
    layer.check_in("applicants", 0)
    layer.check_in("loan_applications", 0)
    assert layer.wants_landing()  # nothing running: land at once
    layer.nudge()
    assert inside.wait(10)
    assert not layer.wants_landing()  # promoting: hold what arrives
    release.set()
    layer.drain()
    assert layer.wants_landing()
    assert layer.round == 1
    assert refreshed == ["online-refresh"]  # after the promotion, in its own thread

    # The second promotion waits for the table that has not checked in since the first.
    inside.clear()
    layer.check_in("applicants", 1)
    layer.nudge()
    assert not inside.wait(0.2)
    layer.check_in("loan_applications", 1)
    assert inside.wait(5)
    layer.drain()
    assert layer.monitor.promotions == 2
    assert layer.monitor.refreshes == 2
