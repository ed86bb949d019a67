"""The running stream's heartbeat, for a probe that restarts a stuck stream.

A stream that is up but no longer turns (a read or a landing that never returns) holds
its slots and lands nothing, and nothing in the process can tell. So each turn of the
dataflow touches a file, at most once a second, and `lakehouse stream alive` (a
Kubernetes exec probe, a compose healthcheck) fails once it is older than its limit.
The dataflow keeps turning while the speed layer's threads promote into silver and
refresh online features, so the file also holds when the oldest of that work started:
one stuck on a store that never answers fails the probe too. The file is in the
stream's own `LAKEHOUSE_HOME`, named by the source schema; a stream removes one left by
a killed stream before it starts, and its own when it stops cleanly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from lakehouse.settings import Settings

log = logging.getLogger(__name__)

MAX_AGE_SECONDS = 120.0
"""The probe's default limit for a turn (five times that for one promotion): far above a
turn or a promotion at 1k changes/s (under a second or two), far below what an operator
would wait for a stuck stream."""


def heartbeat_path(settings: Settings) -> Path:
    """Return where the stream of `settings.pg_schema` keeps its heartbeat."""
    return settings.home / "stream" / f"{settings.pg_schema}.alive"


class Heartbeat:
    """Writes its file at most every `every` seconds; `stop` removes it.

    A failed write (a full or read-only volume) is logged once and never stops the
    stream: the probe then fails on an old file, which is the truth about it.
    """

    def __init__(self, path: Path, every: float = 1.0) -> None:
        self.path = path
        self.every = every
        self._last = float("-inf")
        self._failed = False

    def beat(self, busy_since: float | None = None) -> None:
        """Record that the dataflow has just turned, and since when work is in progress."""
        now = time.monotonic()
        if now - self._last < self.every:
            return
        self._last = now
        try:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            except FileNotFoundError:  # the first beat, or the folder was removed
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write("" if busy_since is None else f"{busy_since:.3f}\n")
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.warning("cannot write the stream's heartbeat %s: %s", self.path, exc)

    def stop(self) -> None:
        """Remove the file: the stream has stopped (or a new one is starting)."""
        with contextlib.suppress(OSError):
            self.path.unlink()


@dataclass(frozen=True)
class Pulse:
    """What the heartbeat says: seconds since the last turn, and since busy work began."""

    age: float
    busy_for: float | None


def pulse(settings: Settings) -> Pulse | None:
    """Return the running stream's pulse; None if it is not running (no heartbeat)."""
    path = heartbeat_path(settings)
    try:
        age = max(0.0, time.time() - path.stat().st_mtime)
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        busy_for = max(0.0, time.time() - float(text)) if text else None
    except ValueError:  # caught mid-write: the next probe reads it whole
        busy_for = None
    return Pulse(age, busy_for)
