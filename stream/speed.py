"""The speed layer of `lakehouse stream --promote`: silver and online features, beside the landing.

Landing in bronze is the stream's guarantee (exactly once, in WAL order); promoting into
silver and refreshing the online features follow it. They used to run in the sink after
each table's landing, so each of the two tables' micro-batches waited for two silver
promotions and a refresh (about 1.5 s at 200 changes/s on two cores) before the next
could land, and a change took 4-6 s to reach Feast. Here two threads per lakehouse do
them while the sinks go on landing: a landing only nudges the promotion thread, which
nudges the refresh thread after each promotion; nudges that arrive during a run are
served by one more run, which takes in everything landed by then.

The landing follows the promotions' pace (`wants_landing`): while a promotion runs, the
sources hold what arrives (it would wait for the next promotion anyway), and the moment
it ends they land it, so the next promotion starts with everything received until then.
A change waits at most for the promotion in progress and its own, then its refresh.

Errors keep their meaning: a promotion that keeps losing to another writer is deferred
(the next cycle or batch run takes it in), a refresh failure is logged and counted, and
any other promotion error is fatal. A sink reports that one (`take_error`, once) on its
next write, as the landing's own errors are. When the flow ends, the sinks' `close` drains
the threads: what was landed is promoted and refreshed before `lakehouse stream` exits.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from lakehouse.errors import LakehouseError, StorageError, described
from lakehouse.settings import Settings
from lakehouse.storage import KeptTables, Storage, opened_once
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


GATHER_SECONDS = 0.5
"""The longest a promotion waits, once asked, for every table's landing of the moment.

While the layer promotes, the sources hold what arrives (`wants_landing`), up to the
stream's batch window; when it is free, each table lands what it holds, in turn, and
checks in (`check_in`). The next promotion starts when every table of the flow has, so
that it takes in everything received until then, or after this long (a table that
cannot land, a slow store).
"""


class Worker:
    """One thread that runs `work` once more after any nudge, until drained.

    Nudges that arrive while `work` runs are served by one more run, which takes in
    everything landed by then. `work` returning False stops the worker for good.
    """

    def __init__(
        self, name: str, work: Callable[[], bool], *, prepare: Callable[[], None] | None = None
    ) -> None:
        self.name = name
        self.work = work
        self.prepare = prepare
        """Called before each run (not when closing): what the run should wait for."""
        self.busy = False
        """Running `work` now (not while waiting or gathering)."""
        self.busy_since: float | None = None
        """When the run in progress started (seconds since the epoch), for liveness."""
        self.stopped = False
        self._cond = threading.Condition()
        self._asked = 0  # nudges so far
        self._served = 0  # nudges that a finished run started after
        self._closing = False
        self._thread: threading.Thread | None = None

    def nudge(self) -> None:
        """Ask for a run: everything landed before this call will be taken in."""
        with self._cond:
            self._asked += 1
            if self._thread is None and not self.stopped:
                self._closing = False  # a later flow of this process, after a drain
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def drain(self) -> None:
        """Finish every run asked for, then stop the thread (the flow is ending)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            with self._cond:  # ended by an error: gone (a stopped worker is not restarted)
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
                closing = self._closing
            if self.prepare is not None and not closing:
                self.prepare()
            with self._cond:
                asked = self._asked
                self.busy = True
                self.busy_since = time.time()
            try:
                ok = self.work()
            finally:
                with self._cond:
                    self.busy = False
                    self.busy_since = None
            if not ok:
                with self._cond:
                    self.stopped = True
                return
            with self._cond:
                self._served = asked


class SpeedLayer:
    """Promotes into silver, and refreshes online features, on demand: two threads.

    The refresh of one promotion runs while the next promotion does: a change waits for
    the promotion in progress and its own, not for a refresh as well.
    """

    def __init__(self, settings: Settings, storage: Storage, monitor: Monitor) -> None:
        self.settings = settings
        self.storage = storage
        self.monitor = monitor
        self.error: LakehouseError | None = None
        """A fatal promotion error; promotions stop at it (`take_error` reports it)."""
        self._reported = False
        self._lock = threading.Lock()
        self._rounds = threading.Condition()
        self.round = 0
        """Promotions finished: the sources' landings after one are checked in with it."""
        self._checked: dict[str, int] = {}
        self._tables: tuple[str, ...] = ()
        self.promotions = Worker("speed-layer", self._promote_once, prepare=self._gather)
        self._kept = KeptTables(storage)  # the promotion thread's own
        self.refreshes = Worker("online-refresh", self._refresh_once)
        from lakehouse.ml.fresh import Refresher

        self.refresher = Refresher(settings, storage)
        # Feast and DuckDB open while the first micro-batch gathers.
        threading.Thread(target=self.refresher.warm, name="warm-online", daemon=True).start()

    def busy_since(self) -> float | None:
        """Return when the oldest promotion or refresh in progress started; None if idle.

        The dataflow turns on while these threads work, so a promotion stuck on a store
        that never answers would not stop the heartbeat: the heartbeat carries this.
        """
        times = [w.busy_since for w in (self.promotions, self.refreshes) if w.busy_since]
        return min(times, default=None)

    def nudge(self) -> None:
        """Ask for a promotion (then a refresh) of everything landed before this call."""
        self.promotions.nudge()

    def expect(self, tables: list[str]) -> None:
        """Name the tables of the flow: each checks in before a promotion starts."""
        with self._rounds:
            self._tables = tuple(tables)
            self._checked.clear()

    def check_in(self, table: str, round_: int) -> None:
        """Say that `table` landed everything it held when it saw promotion round `round_`."""
        with self._rounds:
            self._checked[table] = max(self._checked.get(table, -1), round_)
            self._rounds.notify_all()

    def _gather(self) -> None:
        """Wait until every table checked in since the last promotion (or GATHER_SECONDS)."""
        deadline = time.monotonic() + GATHER_SECONDS
        with self._rounds:
            while any(self._checked.get(t, -1) < self.round for t in self._tables):
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._rounds.wait(left)

    def wants_landing(self) -> bool:
        """Tell the sources to land what they hold now: no promotion is running.

        A change that arrives during a promotion is held until it ends (at most the
        stream's batch window): landed earlier, it would wait for the next one anyway.
        """
        return self.error is None and not self.promotions.busy

    def drain(self) -> None:
        """Finish every promotion and refresh asked for, then stop (the flow is ending)."""
        self.promotions.drain()
        self.refreshes.drain()

    def take_error(self) -> LakehouseError | None:
        """Return the fatal error to the first caller only: it is reported once."""
        with self._lock:
            if self.error is None or self._reported:
                return None
            self._reported = True
            return self.error

    def _promote_once(self) -> bool:
        """Promote both tables, then ask for a refresh; False after a fatal error."""
        try:
            return self._promote_timed()
        finally:
            with self._rounds:
                self.round += 1

    def _promote_timed(self) -> bool:
        started = time.perf_counter()
        try:
            with opened_once(self._kept):
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
        self.monitor.promoted(time.perf_counter() - started)
        self.refreshes.nudge()
        return True

    def _refresh_once(self) -> bool:
        """Bring the online features of what silver just took in up to date (`ml.fresh`).

        A failure is logged and counted, never fatal: silver and bronze are safe, and the
        next refresh (which diffs from the last state it wrote) or batch run catches up.
        """
        started = time.perf_counter()
        try:
            done = self.refresher.refresh()
        except Exception as exc:  # the online store down, a Feast error: keep streaming
            self.monitor.online_errors += 1
            log.warning("online features not refreshed: %s", described(exc))
            return True
        self.monitor.refreshed(time.perf_counter() - started)
        if done is not None:
            self.monitor.online_refreshes += 1
            log.info(
                "online features of %d applicants and %d applications refreshed in %.2fs",
                done.applicants,
                done.applications,
                done.seconds,
            )
        return True


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
        monitor.busy = found.busy_since
        return found
