"""The speed layer of `lakehouse stream --promote`: silver and online features, beside the landing.

Landing in bronze is the stream's guarantee (exactly once, in WAL order); promoting into
silver and refreshing the online features follow it. They used to run in the sink after
each table's landing, so each of the two tables' micro-batches waited for two silver
promotions and a refresh (about 1.5 s at 200 changes/s on two cores) before the next
could land, and a change took 4-6 s to reach Feast. Here one thread per lakehouse does
them while the sinks go on landing: a landing only nudges it, and nudges that arrive
during a cycle are served by one more cycle, which takes in everything landed by then.

Errors keep their meaning: a promotion that keeps losing to another writer is deferred
(the next cycle or batch run takes it in), a refresh failure is logged and counted, and
any other promotion error is fatal. A sink reports that one (`take_error`, once) on its
next write, as the landing's own errors are. When the flow ends, the sinks' `close` drains
the thread: what was landed is promoted and refreshed before `lakehouse stream` exits.
"""

from __future__ import annotations

import logging
import threading
import time

from lakehouse.errors import LakehouseError, StorageError, described
from lakehouse.settings import Settings
from lakehouse.storage import Storage
from lakehouse.storage import explain as explain_storage
from lakehouse.zones.commits import ConcurrentWriteError
from stream.monitor import Monitor

log = logging.getLogger("lakehouse.stream")


def _promote(storage: Storage) -> None:
    """Merge what landed into silver (the batch path reconciles).

    Applicants first, then applications, whatever landed: applications are held below
    the applicants' position, so promoting both keeps either from waiting for the other
    table's next commit.
    """
    from lakehouse.zones import silver

    for name in ("applicants", "loan_applications"):
        silver.promote(storage, name)


class SpeedLayer:
    """One thread that promotes into silver and refreshes online features on demand."""

    def __init__(self, settings: Settings, storage: Storage, monitor: Monitor) -> None:
        self.settings = settings
        self.storage = storage
        self.monitor = monitor
        self.error: LakehouseError | None = None
        """A fatal promotion error; the thread stops at it (`take_error` reports it)."""
        self._reported = False
        self._cond = threading.Condition()
        self._asked = 0  # nudges so far
        self._served = 0  # nudges that a finished cycle started after
        self._closing = False
        self._thread: threading.Thread | None = None
        from lakehouse.ml.fresh import Refresher

        self.refresher = Refresher(settings, storage)
        # Feast and DuckDB open while the first micro-batch gathers.
        threading.Thread(target=self.refresher.warm, name="warm-online", daemon=True).start()

    def nudge(self) -> None:
        """Ask for a cycle: everything landed before this call will be taken in."""
        with self._cond:
            self._asked += 1
            if self._thread is None and self.error is None:
                self._closing = False  # a later flow of this process, after a drain
                self._thread = threading.Thread(target=self._run, name="speed-layer", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def drain(self) -> None:
        """Finish every cycle asked for, then stop the thread (the flow is ending)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def take_error(self) -> LakehouseError | None:
        """Return the fatal error to the first caller only: it is reported once."""
        with self._cond:
            if self.error is None or self._reported:
                return None
            self._reported = True
            return self.error

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            with self._cond:  # ended by an error: gone (a failed layer is not restarted)
                if self._thread is threading.current_thread():
                    self._thread = None

    def _loop(self) -> None:
        while True:
            with self._cond:
                while self._served == self._asked and not self._closing:
                    self._cond.wait()
                if self._served == self._asked:
                    # Closing with nothing to do. Gone under the same lock as the check,
                    # so that a nudge after it starts a new thread rather than being lost.
                    self._thread = None
                    return
                asked = self._asked
            if not self._cycle():
                return
            with self._cond:
                self._served = asked

    def _cycle(self) -> bool:
        """Promote both tables, then refresh; False after a fatal error."""
        started = time.perf_counter()
        try:
            _promote(self.storage)
        except ConcurrentWriteError as exc:
            # Another writer (a batch run) kept winning: what landed in bronze is safe,
            # and the next cycle or run promotes it.
            self.monitor.promote_errors += 1
            log.warning("silver promotion deferred: %s", exc)
            return True
        except LakehouseError as exc:
            self.error = exc
            return False
        except Exception as exc:  # delta-rs / object store errors, explained as the sink does
            self.error = StorageError(explain_storage(exc, self.storage.root))
            return False
        promoted = time.perf_counter()
        self._refresh()
        self.monitor.cycle(promoted - started, time.perf_counter() - promoted)
        return True

    def _refresh(self) -> None:
        """Bring the online features of what silver just took in up to date (`ml.fresh`).

        A failure is logged and counted, never fatal: silver and bronze are safe, and the
        next refresh (which diffs from the last state it wrote) or batch run catches up.
        """
        try:
            done = self.refresher.refresh()
        except Exception as exc:  # the online store down, a Feast error: keep streaming
            self.monitor.online_errors += 1
            log.warning("online features not refreshed: %s", described(exc))
            return
        if done is not None:
            self.monitor.online_refreshes += 1
            log.info(
                "online features of %d applicants and %d applications refreshed in %.2fs",
                done.applicants,
                done.applications,
                done.seconds,
            )


_LAYERS: dict[tuple[str, str, str], SpeedLayer] = {}
_LAYERS_LOCK = threading.Lock()


def layer(settings: Settings, storage: Storage, monitor: Monitor) -> SpeedLayer:
    """Return the speed layer of these settings, one per lakehouse in this process.

    Called once per flow. Keyed by home, warehouse and online store: a process running
    several flows one after another (the tests) gets the right one, with its online
    refresher warm; one that failed is replaced.
    """
    key = (str(settings.home), storage.root, settings.feast_online_store)
    with _LAYERS_LOCK:
        found = _LAYERS.get(key)
        if found is None or found.error is not None:
            found = SpeedLayer(settings, storage, monitor)
            _LAYERS[key] = found
        found.monitor = monitor  # `lakehouse stream` replaces the monitor at each start
        return found
