"""Long-running commands: repeat on an interval, stop cleanly on SIGTERM or Ctrl-C."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from lakehouse import log


class StopSignal:
    """Set by SIGTERM or SIGINT: the current step finishes, then the command exits 0.

    A second Ctrl-C interrupts the step itself.
    """

    def __init__(self) -> None:
        self.event = threading.Event()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def restore(self) -> None:
        """Put back the handlers that were there before `install`."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def install(self) -> StopSignal:
        """Install the handlers (main thread only)."""

        def handler(signum: int, frame: FrameType | None) -> None:
            if signum == signal.SIGINT and self.event.is_set():
                raise KeyboardInterrupt  # a second Ctrl-C does not wait
            first = not self.event.is_set()
            self.event.set()  # before anything that could fail: the stop is never lost
            if first:
                # Said at once: an orchestrator's log shows the signal arrived, and that
                # the wait until the exit is the step finishing. A handler can interrupt
                # a write to the same stream (a buffered, blocked stdout raises a
                # reentrant-call error): the line is then lost, not the stop.
                name = signal.Signals(signum).name
                with contextlib.suppress(Exception):
                    log.event("stop", f"{name} received: finishing the current step, then exiting")

        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, handler)
        return self

    @property
    def requested(self) -> bool:
        """Tell whether a stop was asked for."""
        return self.event.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`; return True if a stop came meanwhile."""
        return self.event.wait(seconds)


def repeat(every: float | None, step: Callable[[], None]) -> None:
    """Run `step` once, or every `every` seconds (start to start) until a stop signal.

    `step` handles its own failures: a long-running service logs a failed step and tries
    again at the next interval.
    """
    if every is None:
        step()
        return
    import time

    with StopSignal() as stop:
        while not stop.requested:
            started = time.monotonic()
            step()
            if stop.wait(max(0.0, every - (time.monotonic() - started))):
                break
