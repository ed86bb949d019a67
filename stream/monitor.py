"""What the running stream tells its operator every few seconds: landed, behind, fresh.

The sinks report each landed batch and the sources the server's WAL position; one line
every `every` seconds sums them up, like `lakehouse simulate` does for its writes.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from stream.liveness import Heartbeat

Report = Callable[[str, dict[str, object]], None]


@dataclass
class Monitor:
    """Thread-safe tallies of the stream's progress, and the periodic line."""

    every: float = 5.0
    report: Report | None = None
    landed: Counter[str] = field(default_factory=Counter)
    total: Counter[str] = field(default_factory=Counter)
    buffered: dict[str, int] = field(default_factory=dict)
    newest_commit: datetime | None = None
    promote_errors: int = 0
    online_refreshes: int = 0
    online_errors: int = 0
    promotions: int = 0
    """Speed-layer promotions into silver since the start."""
    promote_seconds: float = 0.0
    refreshes: int = 0
    """Speed-layer refreshes of online features (with or without a change) since the start."""
    refresh_seconds: float = 0.0
    heartbeat: Heartbeat | None = None
    """Touched on every turn of the dataflow (`stream.liveness`)."""
    busy: Callable[[], float | None] | None = None
    """When the speed layer's oldest work in progress started (`SpeedLayer.busy_since`)."""
    _last: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def batch(self, table: str, changes: int, newest: datetime | None) -> None:
        """Count `changes` changes of `table` a sink landed."""
        with self._lock:
            self.landed[table] += changes
            self.total[table] += changes
            if newest is not None and (self.newest_commit is None or newest > self.newest_commit):
                self.newest_commit = newest
        self.tick()

    def promoted(self, seconds: float) -> None:
        """Count one speed-layer promotion (both tables) and its time."""
        with self._lock:
            self.promotions += 1
            self.promote_seconds += seconds

    def refreshed(self, seconds: float) -> None:
        """Count one speed-layer refresh of online features and its time."""
        with self._lock:
            self.refreshes += 1
            self.refresh_seconds += seconds

    def held(self, table: str, changes: int) -> None:
        """Note the `changes` changes a source holds, received but not landed yet."""
        with self._lock:
            self.buffered[table] = changes

    def beat(self) -> None:
        """Note a turn of the dataflow (for the liveness probe)."""
        if self.heartbeat is not None:
            self.heartbeat.beat(self.busy() if self.busy is not None else None)

    def tick(self) -> None:
        """Print the line if it is due."""
        if self.report is None or time.monotonic() - self._last < self.every:
            return
        with self._lock:
            seconds = time.monotonic() - self._last
            self._last = time.monotonic()
            landed = dict(self.landed)
            self.landed.clear()
            behind = sum(self.buffered.values())
            fresh = (
                None
                if self.newest_commit is None
                else (datetime.now(UTC) - self.newest_commit).total_seconds()
            )
            totals = dict(self.total)
        count = sum(landed.values())
        parts = ", ".join(f"{t} {n:,}" for t, n in sorted(landed.items()) if n) or "none"
        freshness = "no change seen yet" if fresh is None else f"newest change {fresh:.1f}s old"
        line = (
            f"landed {count:,} changes in {seconds:.0f}s ({parts}); "
            f"{'caught up' if behind == 0 else f'{behind:,} received, not landed yet'}; "
            f"{freshness}; {sum(totals.values()):,} since start"
        )
        if self.promote_errors:
            line += f"; {self.promote_errors} silver promotions deferred (see the log)"
        if self.online_refreshes:
            line += f"; online features refreshed {self.online_refreshes} times"
        if self.promotions:
            line += (
                f"; speed layer {self.promotions} promotions of "
                f"{self.promote_seconds / self.promotions:.2f}s on average"
            )
        if self.refreshes:
            average = self.refresh_seconds / self.refreshes
            line += f" and {self.refreshes} refreshes of {average:.2f}s"
        if self.online_errors:
            line += f"; {self.online_errors} online refreshes failed (see the log)"
        self.report(
            line,
            {
                "changes": count,
                "by_table": landed,
                "buffered": behind,
                "freshness_seconds": fresh,
                "total": totals,
            },
        )
