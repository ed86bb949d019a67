"""The running stream's heartbeat, for a probe that restarts a stuck stream.

A stream that is up but no longer turns (a read or a landing that never returns) holds
its slots and lands nothing, and nothing in the process can tell. So each turn of the
dataflow touches a file, at most once a second, and `lakehouse stream alive` (a
Kubernetes exec probe, a compose healthcheck) fails once it is older than its limit.
The file is in the stream's own `LAKEHOUSE_HOME`, named by the source schema, and is
removed when the stream stops cleanly: a stopped stream is not alive.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from lakehouse.settings import Settings

MAX_AGE_SECONDS = 120.0
"""The probe's default limit: above the longest landing measured at 1k changes/s (a few
seconds), far below what an operator would wait for a stuck stream."""


def heartbeat_path(settings: Settings) -> Path:
    """Return where the stream of `settings.pg_schema` keeps its heartbeat."""
    return settings.home / "stream" / f"{settings.pg_schema}.alive"


class Heartbeat:
    """Touches its file at most every `every` seconds; `stop` removes it."""

    def __init__(self, path: Path, every: float = 1.0) -> None:
        self.path = path
        self.every = every
        self._last = float("-inf")

    def beat(self) -> None:
        """Record that the dataflow has just turned."""
        now = time.monotonic()
        if now - self._last < self.every:
            return
        self._last = now
        try:
            os.utime(self.path)
        except FileNotFoundError:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch(mode=0o600)

    def stop(self) -> None:
        """Remove the file: the stream has stopped."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def age(settings: Settings) -> float | None:
    """Return how many seconds ago the stream last turned; None if it is not running."""
    try:
        return max(0.0, time.time() - heartbeat_path(settings).stat().st_mtime)
    except FileNotFoundError:
        return None
