"""The inference log: every prediction the API answers, landed in `bronze.predictions`.

Databricks' inference tables and Feast's feature logging do the same job: what was asked,
which model version answered, on exactly which feature vector, with what result. Here the
request path only appends the values to a buffer in memory (a list per column); a writer
thread lands what the buffer holds as one Delta append every `LAKEHOUSE_PREDICTION_LOG_SECONDS`,
or as soon as `LAKEHOUSE_PREDICTION_LOG_RECORDS` are waiting. Serving never waits for the
table.

Several writers share the table (`serve --workers N`, replicas, the pipeline reading it):
appends do not conflict in Delta, and every batch carries its writer's app transaction
(`lakehouse.bronze.predictions<-writer:<id>` at the batch's number), so a batch retried
after an ambiguous failure (the commit landed, the answer was lost) is seen as landed and
not written twice.

What can be lost, and who says so:
- A prediction is in the buffer before its answer is sent. On SIGTERM uvicorn stops
  accepting, finishes the requests in progress, and the app's lifespan ends with `close`,
  which lands everything (and so does interpreter exit): nothing acknowledged is lost,
  unless the table cannot be written within the drain's 20 s; then the state file and
  `lakehouse status` say how many were not landed.
- A crash (SIGKILL, out of memory) loses the buffer: at most `LAKEHOUSE_PREDICTION_LOG_CAPACITY`
  records, in practice a few seconds of traffic. Each writer keeps its counts in
  `<home>/serving/predictions-<writer>.json`, rewritten at every tick, and holds a lock
  on `predictions-<writer>.alive` while its process lives; `lakehouse status` names a
  writer whose lock is free without a clean close, with what it held at its last report
  (and what came after it, at most one tick's worth, is lost too).
- A full buffer (the table unreachable for long) drops new records, counts them, and logs
  a warning: the status shows the count.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
from deltalake import DeltaTable, write_deltalake
from deltalake.exceptions import TableNotFoundError

from lakehouse.errors import described
from lakehouse.log import redact
from lakehouse.settings import Settings
from lakehouse.storage import Storage
from lakehouse.zones.commits import TABLE_CONFIGURATION, app_id, commit_properties, is_conflict

log = logging.getLogger(__name__)

ZONE, TABLE = "bronze", "predictions"

SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("served_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("application_id", pa.int64()),
        pa.field("applicant_id", pa.int64()),
        pa.field("features", pa.string(), nullable=False),
        pa.field("probability", pa.float64(), nullable=False),
        pa.field("decision", pa.string(), nullable=False),
        pa.field("threshold", pa.float64(), nullable=False),
        pa.field("latency_ms", pa.float64(), nullable=False),
        pa.field("features_event_ts", pa.timestamp("us", tz="UTC")),
        pa.field("online_refreshed_at", pa.timestamp("us", tz="UTC")),
        pa.field("writer", pa.string(), nullable=False),
    ]
)
"""One row per answered prediction. `features` is the exact vector the model scored, as
JSON (missing values null); `features_event_ts` the newest event time among the entity's
online rows; `online_refreshed_at` when the online store was last written (a stream
refresh or a materialization) as the API last checked; `latency_ms` to the answer, before
it is sent, from the request's arrival (the fast path) or from FastAPI's call of the
endpoint (requests FastAPI parses)."""

_US = 1_000_000


def state_folder(settings: Settings) -> Path:
    """Where writers keep their counts (read by `lakehouse status`)."""
    return settings.home / "serving"


class InferenceLog:
    """A bounded buffer of predictions and the thread that lands it in Delta."""

    def __init__(self, settings: Settings, storage: Storage) -> None:
        self.settings = settings
        self.storage = storage
        self.capacity = settings.prediction_log_capacity
        self.every = settings.prediction_log_seconds
        self.records = settings.prediction_log_records
        self.writer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._app = app_id(ZONE, TABLE, f"writer:{self.writer}")
        self._columns: list[list[Any]] = [[] for _ in SCHEMA]
        """The buffer, one list per column of `SCHEMA`, appended to under `_count`. A
        record allocates no container the garbage collector tracks (a tuple per request
        would: thousands held for seconds, each collection walking them), and a landing
        gives Arrow a list per column with no transposing."""
        self._wake = threading.Event()
        self._lock = threading.Lock()  # one landing at a time (the thread, or `close`)
        self._thread: threading.Thread | None = None
        self._closed = False
        self._batch = 0
        self._pending: tuple[int, int] | None = None
        self._retrying = False
        """(number, size) of the batch at the buffer's head that was tried and not landed:
        retried with the same number and the same records, as it may have landed."""
        self.received = 0
        self.landed = 0
        self.dropped = 0
        self.failures = 0
        self.last_error: str | None = None
        self.last_landed_at: str | None = None
        self._state_path = state_folder(settings) / f"predictions-{self.writer}.json"
        # A landing gives up within seconds when S3 does not answer (the records stay
        # buffered for the next tick): a drain at SIGTERM must fit the grace period.
        self._options = dict(storage.options)
        if storage.is_s3:
            self._options |= {"max_retries": "1", "retry_timeout": "5s", "timeout": "5s"}
        self._seen_table = False
        """The table existed once: not finding it later is a failure, never a reason to
        create it (a retry would then skip its check and could land a batch twice)."""
        self._count = threading.Lock()  # `received`, `dropped` and the capacity check
        self._alive: Any = None  # the open, locked `.alive` file while the writer runs
        self._table: DeltaTable | None = None
        """The table as of this writer's last landing: a write brings it up to date from
        there (the commits since), where opening it would replay the log since the last
        checkpoint, on the thread the event loop shares the interpreter with."""

    @property
    def buffered(self) -> int:
        """Return how many predictions wait to be landed."""
        return len(self._columns[0])

    # ---------------------------------------------------------------- the request path

    def record(
        self,
        *,
        request_id: str,
        served_at: float,
        model_version: str,
        application_id: int | None,
        applicant_id: int | None,
        features: str,
        probability: float,
        decision: str,
        threshold: float,
        latency_ms: float,
        features_event_ts: int | None,
        online_refreshed_at: float | None,
    ) -> bool:
        """Hand one prediction to the writer; False when the buffer is full (dropped)."""
        if self._thread is None and not self._closed:
            self._start()
        with self._count:  # the API's thread pool records too
            self.received += 1
            full = self._closed or len(self._columns[0]) >= self.capacity
            if full:
                self.dropped += 1
                dropped = self.dropped
            else:
                values = (
                    request_id,
                    int(served_at * _US),
                    model_version,
                    application_id,
                    applicant_id,
                    features,
                    probability,
                    decision,
                    threshold,
                    latency_ms,
                    features_event_ts,
                    None if online_refreshed_at is None else int(online_refreshed_at * _US),
                    self.writer,
                )
                for column, value in zip(self._columns, values, strict=True):
                    column.append(value)
                waiting = len(self._columns[0])
        if full:
            if self._closed:  # after the lifespan ended: no writer will land it
                log.warning("prediction log closed: prediction %s not logged", request_id)
            elif dropped == 1 or dropped % 10_000 == 0:
                log.warning(
                    "prediction log buffer full (%d records): %d predictions not logged; "
                    "last landing error: %s",
                    self.capacity,
                    dropped,
                    self.last_error,
                )
            return False
        if waiting >= self.records:
            self._wake.set()
        return True

    # ---------------------------------------------------------------- the writer

    def _start(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
            self._thread.start()
            atexit.register(self.close)
            self._hold_alive()
            self._report()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(self.every)
            self._wake.clear()
            if self._closed:
                return
            try:
                with self._lock:
                    self._land_buffer(deadline=time.monotonic())
                    self._report()  # every tick: what a crash now would lose
            except Exception as exc:  # never end the thread: the next tick tries again
                self.last_error = redact(described(exc))
                log.warning("prediction log: %s", self.last_error)

    def _land_buffer(self, deadline: float, *, drain: bool = False) -> None:
        """Land what the buffer holds now, in batches of at most `records`; keep what fails.

        Only what was buffered when the tick began: the predictions that arrive during a
        landing wait for the next tick. (Chasing them, a busy server's writer never slept:
        each landing's few dozen milliseconds brought a hundred more, and it committed
        small batches back to back, a Delta commit every 90 ms at 1,700 requests/s, each
        one slowing the requests served beside it.) With `drain` (closing), until empty.
        A failed batch is tried again until `deadline` (`time.monotonic()`), then left at
        the head of the buffer for the next tick.
        """
        left = self.buffered
        while self.buffered and (drain or left > 0):
            if self._pending is None:
                self._batch += 1
                size = self.buffered if drain else min(left, self.buffered)
                self._pending = (self._batch, min(size, self.records))
            number, take = self._pending
            with self._count:  # copies of the head: it stays buffered until it has landed
                batch = [column[:take] for column in self._columns]
            try:
                self._land(number, batch, retry=self._retrying)
            except Exception as exc:
                self.failures += 1
                self._retrying = True  # the retry reopens the table and checks its log
                self.last_error = redact(described(exc))
                log.warning("prediction log: landing %d records failed: %s", take, self.last_error)
                if time.monotonic() >= deadline:
                    return  # the next tick tries again; the records stay buffered
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                continue
            with self._count:
                for column in self._columns:
                    del column[:take]
            self._pending = None
            self._retrying = False
            left -= take
            self.landed += take
            self.last_landed_at = datetime.now(UTC).isoformat()

    def _land(self, number: int, batch: list[list[Any]], *, retry: bool = True) -> None:
        """Append batch `number` in one commit, exactly once.

        With `retry` (an attempt at this batch failed), the table is reopened and its log
        read first: that attempt may have committed before its answer was lost.
        """
        arrays = [pa.array(column, type=f.type) for column, f in zip(batch, SCHEMA, strict=True)]
        table = pa.Table.from_arrays(arrays, schema=SCHEMA)
        uri = self.storage.uri(ZONE, TABLE)
        for attempt in range(20):
            if self._table is None or retry or attempt:
                try:
                    self._table = DeltaTable(uri, storage_options=self._options)
                except TableNotFoundError:
                    if self._seen_table:
                        msg = "bronze.predictions is not found where it was: not landing"
                        raise RuntimeError(msg) from None
                    self._table = None
                else:
                    self._seen_table = True
                if self._table is not None:
                    done = self._table.transaction_version(self._app)
                    if done is not None and int(done) >= number:
                        return  # an earlier attempt landed it and its answer was lost
            try:
                write_deltalake(
                    self._table if self._table is not None else uri,
                    table,
                    mode="append",
                    storage_options=None if self._table is not None else self._options,
                    configuration=TABLE_CONFIGURATION,
                    commit_properties=commit_properties(
                        {self._app: number}, operation="predictions"
                    ),
                )
                self._seen_table = True
                return
            except Exception as exc:
                if not is_conflict(exc):
                    raise
                # Another writer created the table or committed first: look again.
        msg = "prediction log: 20 commits in a row lost to other writers"
        raise RuntimeError(msg)

    # ---------------------------------------------------------------- closing and state

    def close(self, timeout: float = 20.0) -> None:
        """Land everything buffered, trying for about `timeout` seconds in all; stop.

        One deadline for the whole drain (a landing in progress, then what is left), so
        that it fits an orchestrator's grace period (30 s by default in Kubernetes). A
        landing started before the deadline may end past it by one S3 timeout (5 s).
        """
        if self._closed:
            return
        deadline = time.monotonic() + timeout
        with self._count:  # a record in progress lands its values first, or sees closed
            self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread is None and not self.buffered:
            return  # never used: nothing to land or to report
        if self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            try:
                self._land_buffer(deadline=deadline, drain=True)
            finally:
                self._lock.release()
        self._report(closed=True)
        if self.buffered:
            log.error(
                "prediction log: %d predictions could not be landed before exit: %s",
                self.buffered,
                self.last_error,
            )

    def state(self) -> dict[str, Any]:
        """Return this writer's counts."""
        return {
            "writer": self.writer,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "received": self.received,
            "landed": self.landed,
            "dropped": self.dropped,
            "buffered": self.buffered,
            "failures": self.failures,
            "last_error": self.last_error,
            "last_landed_at": self.last_landed_at,
            "reported_at": datetime.now(UTC).isoformat(),
        }

    def _report(self, *, closed: bool = False) -> None:
        """Write this writer's counts where `lakehouse status` reads them (owner only)."""
        state = {**self.state(), "closed": closed}
        try:
            self._state_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            part = self._state_path.with_suffix(".part")
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(json.dumps(state))
            part.replace(self._state_path)
            if closed and self._alive is not None:
                self._alive.close()  # releases the lock: this writer has ended
                self._alive = None
                self._state_path.with_suffix(".alive").unlink(missing_ok=True)
        except OSError as exc:  # the log still lands; only the status lacks this writer
            log.warning("prediction log: cannot record its state: %s", described(exc))

    def _hold_alive(self) -> None:
        """Lock `<writer>.alive` for this process's life.

        A status that can take the lock knows the writer has ended, whatever process
        ids are now (a restarted container has the same pid 1 and host name).
        """
        try:
            self._state_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self._state_path.with_suffix(".alive"), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise
            self._alive = os.fdopen(fd, "r+")
        except OSError as exc:
            log.warning("prediction log: cannot mark itself alive: %s", described(exc))


def ensure_table(storage: Storage) -> None:
    """Create `bronze.predictions` empty if no API has landed a prediction yet.

    The marts over it (`gold.prediction_outcomes`, `gold.model_quality_daily`) are then
    built, empty, like any other gold table. A writer creating it at the same moment wins;
    that is the same table.
    """
    if storage.exists(ZONE, TABLE):
        return
    try:
        write_deltalake(
            storage.uri(ZONE, TABLE),
            SCHEMA.empty_table(),
            mode="append",
            storage_options=storage.options,
            configuration=TABLE_CONFIGURATION,
            commit_properties=commit_properties({}, operation="predictions-create"),
        )
    except Exception as exc:
        if not (is_conflict(exc) and storage.exists(ZONE, TABLE)):
            raise


def summary(settings: Settings) -> dict[str, Any]:
    """Return the prediction log's state for `lakehouse status`.

    Writers still running (their counts now); writers whose process ended without
    closing (a crash: what they held at their last report was lost); writers that closed
    with predictions not landed (the drain ran out of time). The others lost nothing and
    are only counted.
    """
    every = writers(settings)
    ended = [w for w in every if not w["alive"]]
    return {
        "enabled": settings.prediction_log == "on",
        "running": [w for w in every if w["alive"]],
        "crashed": [w for w in ended if not w.get("closed")],
        "unlanded": [w for w in ended if w.get("closed") and w.get("buffered")],
        "closed": sum(1 for w in ended if w.get("closed") and not w.get("buffered")),
    }


def writers(settings: Settings) -> list[dict[str, Any]]:
    """Return every writer's last report, each with `alive`: its process still runs.

    Alive means its `.alive` file is locked (by that process, on this machine's kernel:
    a home shared between machines sees the others' writers as ended).
    """
    out = []
    folder = state_folder(settings)
    for path in sorted(folder.glob("predictions-*.json")) if folder.is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            state = dict(json.loads(path.read_text()))
            state["alive"] = _locked(path.with_suffix(".alive"))
            out.append(state)
    return out


def prune(settings: Settings, retention_hours: float) -> int:
    """Remove the state files of writers that ended; return how many (`lakehouse maintain`).

    A writer that closed with everything landed is removed at once (the status only
    counts it). One that crashed, or closed with predictions not landed, stays for the
    retention (`LAKEHOUSE_VACUUM_RETENTION_HOURS`) after its last report, so that the
    status keeps naming what it lost for that long. A writer still running is never
    touched.
    """
    folder = state_folder(settings)
    cutoff = datetime.now(UTC).timestamp() - retention_hours * 3600
    removed = 0
    for path in sorted(folder.glob("predictions-*.json")) if folder.is_dir() else []:
        alive = path.with_suffix(".alive")
        try:
            state = dict(json.loads(path.read_text()))
            reported = datetime.fromisoformat(state["reported_at"]).timestamp()
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being rewritten, or not ours: left alone
        if _locked(alive):
            continue
        lost_nothing = state.get("closed") and not state.get("buffered")
        if lost_nothing or reported < cutoff:
            path.unlink(missing_ok=True)
            alive.unlink(missing_ok=True)
            removed += 1
    return removed


def _locked(path: Path) -> bool:
    """Tell whether another process holds the lock on `path`."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # (closing releases a lock this process took)
    return False
