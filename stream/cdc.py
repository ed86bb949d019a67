"""The CDC dataflow: Postgres logical replication -> `bronze.<table>_changes` (Delta).

Run it with `lakehouse stream` or `python -m bytewax.run stream.cdc:flow`. One source
partition per replication slot (one slot per source table), so two Bytewax processes
(`-i 0 -a host:port;host:port`) share the tables between them.

Delivery is effectively exactly-once: a micro-batch and its position (commit LSN and
position in the transaction, plus the end of the last whole transaction) land in one
Delta commit; only then is the slot told it may advance. After a crash the server
resends from the slot's confirmed position and the source drops every change at or
before the recorded position.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from bytewax import operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition

from lakehouse import log as events
from lakehouse.errors import LakehouseError, StorageError
from lakehouse.failpoints import failpoint
from lakehouse.settings import Settings
from lakehouse.source.schema import TABLES
from lakehouse.storage import KeptTables, Storage
from lakehouse.storage import explain as explain_storage
from stream import changes, speed
from stream.changes import BatchBuilder, ChangeBatch, Progress
from stream.monitor import Monitor
from stream.pgoutput import format_lsn
from stream.replication import ReplicationStream
from stream.speed import SpeedLayer

log = logging.getLogger("lakehouse.stream")

# Positions landed in Delta by this process's sinks, read by this process's sources to
# report to the server. A source whose sink runs in another process polls Delta instead.
_LANDED: dict[str, int] = {}
_LANDED_LOCK = threading.Lock()
_POLL_SECONDS = 2.0
_READ_SECONDS = 0.05
# Messages in one call (_READ_SECONDS) that mean a backlog: 40k/s, where 10k changes/s
# of steady load bring about 500 and draining a backlog about 5,000 (115k/s here).
_BACKLOG_MESSAGES = 2_000
_STATUS_SECONDS = 1.0

MONITOR = Monitor()
"""The progress line `lakehouse stream` prints every few seconds (no line without a report)."""

STOP = threading.Event()
"""Set by SIGTERM/SIGINT (or a failure): sources emit what they hold and end; sinks land it."""
SIGNALLED = threading.Event()
"""Set by the first SIGTERM or Ctrl-C only: a Ctrl-C after it interrupts the landing."""
FAILURES: list[LakehouseError] = []
"""Errors that stopped the flow; `lakehouse stream` reports the first as one line."""
CAPTURE = threading.Event()
"""Set by `lakehouse stream`: errors stop the flow gracefully and are raised after it.
Unset (under `python -m bytewax.run`), they propagate and Bytewax aborts."""


def fail(exc: LakehouseError) -> None:
    """Stop the flow because of `exc`: raise it now, or record it and stop gracefully."""
    if not CAPTURE.is_set():
        raise exc
    log.info("stopping: %s", exc)
    FAILURES.append(exc)
    STOP.set()


def landed_key(storage: Storage, settings: Settings, table: str) -> str:
    """Return the key under which a table's landed position is shared in this process."""
    return f"{storage.root}|{changes.slot_name(settings.pg_schema, table)}"


def _landed(table: str) -> int | None:
    with _LANDED_LOCK:
        return _LANDED.get(table)


def _set_landed(table: str, lsn: int) -> None:
    with _LANDED_LOCK:
        _LANDED[table] = max(lsn, _LANDED.get(table, 0))


class SlotPartition(StatefulSourcePartition[tuple[str, ChangeBatch], None]):
    """Reads one slot; emits change batches closed by size, time, or a heartbeat.

    With a speed layer (`--promote`), a batch also closes as soon as the layer is free
    to promote it (`SpeedLayer.wants_landing`).
    """

    def __init__(
        self, settings: Settings, storage: Storage, table: str, *, layer: SpeedLayer | None
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.table = table
        self.layer = layer
        self.key = landed_key(storage, settings, table)
        start = changes.progress(storage, table)
        self.builder = BatchBuilder(table, skip=start)
        self.emitted = start.flushed
        self.polled = start.flushed
        self.last_poll = time.monotonic()
        self.last_heartbeat = time.monotonic()
        self.stream = ReplicationStream(
            settings,
            changes.slot_name(settings.pg_schema, table),
            changes.slot_name(settings.pg_schema, table),
        )
        self.stream.start()
        if start.flushed:
            self.stream.report(start.flushed)
        self.awake: datetime | None = None
        self.ended = False
        self.behind = False  # the open batch met a backlog (see next_batch)

    def next_batch(self) -> list[tuple[str, ChangeBatch]]:
        """Read what the server has sent; return the batches closed by now."""
        if self.ended:
            raise StopIteration
        settings = self.settings
        out: list[tuple[str, ChangeBatch]] = []
        received = False
        messages = 0
        try:
            # Read for up to _READ_SECONDS per call: each return to Bytewax costs about a
            # millisecond, so returning after every few messages would halve throughput.
            deadline = time.monotonic() + _READ_SECONDS
            while True:
                left = deadline - time.monotonic()
                got = self.stream.read(max_messages=20_000, max_seconds=max(0.0, left))
                messages += len(got)
                for payload in got:
                    self.builder.feed(payload)
                    if len(self.builder.batch) >= settings.stream_batch_rows:
                        out.append(self._take())
                received = received or bool(got)
                if not got or left <= 0 or out or STOP.is_set():
                    break
        except LakehouseError as exc:
            # Land the whole transactions that came before the problem, then stop.
            if len(self.builder.batch):
                out.append(self._take(complete=True))
            self.ended = True
            fail(exc)
            return out
        # Free to promote: land what is held now, and check in for the next promotion.
        round_ = self.layer.round if self.layer is not None else None
        eager = self.layer is not None and self.layer.wants_landing()
        # More in one call than steady load brings: a backlog. The open batch then keeps
        # the long window until it closes.
        held = len(self.builder.batch) > 0  # (an empty batch waits for nothing)
        self.behind = held and (self.behind or messages >= _BACKLOG_MESSAGES)
        window = 0.0 if eager else self._window()
        if self.builder.ready(max_rows=settings.stream_batch_rows, max_seconds=window):
            out.append(self._take())
        if eager and self.layer is not None and round_ is not None:
            if out:  # the sink checks in once the last of them has landed
                out[-1][1].round = round_
            else:  # nothing to land (or mid-transaction)
                self.layer.check_in(self.table, round_)
        if STOP.is_set():
            if len(self.builder.batch):
                out.append(self._take(complete=True))
            self.ended = True
        elif self._heartbeat_due():
            # Idle: land the server's position so readers (and the slot) move on.
            heartbeat = self.builder.take()
            heartbeat.flushed = max(self.stream.server_wal_end, self.emitted)
            self.builder.flushed = heartbeat.flushed
            self.emitted = heartbeat.flushed
            self.last_heartbeat = time.monotonic()
            out.append((self.table, heartbeat))
        try:
            self._report()
        except LakehouseError as exc:
            self.ended = True
            fail(exc)
        MONITOR.held(self.table, len(self.builder.batch))
        MONITOR.beat()
        MONITOR.tick()
        self.awake = None if received or out else datetime.now(UTC) + timedelta(milliseconds=5)
        return out

    def _window(self) -> float:
        """Return how old the open batch may grow before it closes (between transactions).

        Keeping up, `stream_quiet_seconds`: a change waits little before its commit.
        Behind (a backlog, a burst), `stream_batch_seconds`: fewer, larger commits catch
        up faster. Either way each commit is one more small file until `maintain`. (The
        quiet window is never the longer one: a shorter `stream_batch_seconds` wins.)
        """
        settings = self.settings
        if self.behind:
            return settings.stream_batch_seconds
        return min(settings.stream_quiet_seconds, settings.stream_batch_seconds)

    def _take(self, *, complete: bool = False) -> tuple[str, ChangeBatch]:
        self.behind = False
        batch = self.builder.take_complete() if complete else self.builder.take()
        self.emitted = max(self.emitted, batch.flushed)
        self.last_heartbeat = time.monotonic()
        return (self.table, batch)

    def _heartbeat_due(self) -> bool:
        return (
            self.builder.idle
            and self.stream.server_wal_end > self.emitted
            and self._landed_position() >= self.emitted
            and time.monotonic() - self.last_heartbeat >= self.settings.stream_heartbeat_seconds
        )

    def _landed_position(self) -> int:
        """Return what Delta holds of this slot: this process's sink's word, or the log's.

        The log is read every few seconds when this process has no sink for the table
        (cluster mode) or its word is behind what this partition started from (an
        earlier flow in the same process, then another process, landed more).
        """
        local = _landed(self.key)
        if local is not None and local >= self.emitted:
            return local
        if time.monotonic() - self.last_poll >= _POLL_SECONDS:
            self.polled = changes.progress(self.storage, self.table).flushed
            self.last_poll = time.monotonic()
        return max(local or 0, self.polled)

    def _report(self) -> None:
        if self.stream.due(_STATUS_SECONDS):
            self.stream.report(self._landed_position())

    def next_awake(self) -> datetime | None:
        """Return when to poll again (soon, when the last poll found nothing)."""
        return self.awake

    def snapshot(self) -> None:
        """Return nothing: positions live in Delta and in the slot, not in Bytewax."""
        return None

    def close(self) -> None:
        """Report the landed position one last time, then disconnect."""
        try:
            landed = _landed(self.key)
            if landed is not None and self.stream.conn is not None:
                self.stream.report(landed, ask_reply=False)
        finally:
            self.stream.close()


class _FailedPartition(StatefulSourcePartition[tuple[str, ChangeBatch], None]):
    """Stands in for a partition that could not start: it ends at once."""

    def next_batch(self) -> list[tuple[str, ChangeBatch]]:
        """End immediately."""
        raise StopIteration

    def snapshot(self) -> None:
        """Return nothing."""
        return


class SlotSource(FixedPartitionedSource[tuple[str, ChangeBatch], None]):
    """One partition per source table (each has its own slot and publication)."""

    def __init__(
        self, settings: Settings, tables: list[str], *, layer: SpeedLayer | None = None
    ) -> None:
        self.settings = settings
        self.tables = tables
        self.layer = layer

    def list_parts(self) -> list[str]:
        """List the partitions: one per source table."""
        return list(self.tables)

    def build_part(
        self, step_id: str, for_part: str, resume_state: None
    ) -> StatefulSourcePartition[tuple[str, ChangeBatch], None]:
        """Build the partition of one table."""
        try:
            storage = Storage.from_settings(self.settings)
            return SlotPartition(self.settings, storage, for_part, layer=self.layer)
        except LakehouseError as exc:
            fail(exc)
            return _FailedPartition()


class ChangesPartition(StatefulSinkPartition[ChangeBatch, None]):
    """Appends each micro-batch to `bronze.<table>_changes` in one commit with its position."""

    def __init__(self, settings: Settings, table: str, *, layer: SpeedLayer | None) -> None:
        self.settings = settings
        self.table = table
        self.storage = Storage.from_settings(settings)
        self.done: Progress = changes.progress(self.storage, table)
        self.speed = layer
        self.failed = False
        self.kept = KeptTables(self.storage)

    def write_batch(self, values: list[ChangeBatch]) -> None:
        """Land each batch in one Delta commit, then let the source confirm it."""
        for batch in values:
            if self._speed_failed() or (len(batch) == 0 and batch.flushed <= self.done.flushed):
                continue
            failpoint(f"stream.{self.table}.before-commit")
            try:
                self.done = changes.write(self.storage, batch, self.done, self.kept)
            except LakehouseError as exc:
                self.failed = True
                fail(exc)
                continue
            except Exception as exc:  # delta-rs / object store errors, explained
                self.failed = True
                fail(StorageError(explain_storage(exc, self.storage.root)))
                continue
            _set_landed(landed_key(self.storage, self.settings, self.table), self.done.flushed)
            failpoint(f"stream.{self.table}.after-commit")
            newest = None
            if len(batch):
                log.info(
                    "landed %d changes of %s up to %s",
                    len(batch),
                    self.table,
                    format_lsn(self.done.flushed),
                )
                newest = datetime.fromtimestamp(max(batch.commit_ts) / 1e6, tz=UTC)
            MONITOR.batch(self.table, len(batch), newest)
            if self.speed is not None:
                self.speed.nudge()  # silver and online features follow, in their thread
                if batch.round is not None:
                    self.speed.check_in(self.table, batch.round)

    def _speed_failed(self) -> bool:
        """Tell whether to stop landing: this sink or the speed layer failed.

        The speed layer's error is reported once, by whichever sink sees it first.
        """
        if self.failed or self.speed is None or self.speed.error is None:
            return self.failed
        self.failed = True
        error = self.speed.take_error()
        if error is not None:
            fail(error)
        return True

    def close(self) -> None:
        """Promote and refresh what was landed before the flow ends.

        Never raises: Bytewax calls this from a destructor, also while unwinding from
        another partition's error, and an exception there aborts the process. Under
        `python -m bytewax.run` (errors not captured) the error is logged instead.
        """
        if self.speed is None or self.failed:
            return
        self.speed.drain()
        error = self.speed.take_error()
        if error is None:
            return
        self.failed = True
        if CAPTURE.is_set():
            fail(error)
        else:
            log.error("silver promotion failed: %s", error)

    def snapshot(self) -> None:
        """Return nothing: positions live in Delta and in the slot, not in Bytewax."""
        return None


class ChangesSink(FixedPartitionedSink[ChangeBatch, None]):
    """One partition per table; keys are table names."""

    def __init__(
        self, settings: Settings, tables: list[str], *, layer: SpeedLayer | None = None
    ) -> None:
        self.settings = settings
        self.tables = sorted(tables)
        # One speed layer for the flow, shared by its partitions (Bytewax may build one
        # partition after the other has met an error: it must see that layer's error).
        self.layer = layer

    def list_parts(self) -> list[str]:
        """List the partitions: one per source table."""
        return list(self.tables)

    def part_fn(self, item_key: str) -> int:
        """Route a table's batches to its own partition."""
        return self.tables.index(item_key)

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> ChangesPartition:
        """Build the partition of one table."""
        return ChangesPartition(self.settings, for_part, layer=self.layer)


def build_flow(
    settings: Settings, tables: list[str] | None = None, *, promote: bool = False
) -> Dataflow:
    """Build the dataflow: slots -> change batches -> Delta."""
    chosen = tables or list(TABLES)
    layer = speed.layer(settings, Storage.from_settings(settings), MONITOR) if promote else None
    if layer is not None:
        layer.expect(chosen)
    flow = Dataflow("lakehouse_cdc")
    batches = op.input("slots", flow, SlotSource(settings, chosen, layer=layer))
    op.output("bronze", batches, ChangesSink(settings, chosen, layer=layer))
    return flow


def install_signal_handlers() -> None:
    """Make SIGTERM (and SIGINT) stop the flow gracefully: land what is held, then exit.

    A second Ctrl-C does not wait for that landing (it may hang on a slow store): it
    exits 130 at once. That is safe because a batch is landed by one atomic Delta commit
    and the slot is confirmed only after it: what was not landed is streamed again. A
    KeyboardInterrupt would not do: raised outside a sink's `write_batch`, Bytewax turns
    it into a Rust panic (a backtrace on stderr) wrapped in a runtime error.
    """

    def stop(signum: int, frame: Any) -> None:
        # Asked to stop before (not merely stopping after a failure, which sets STOP too).
        if signum == signal.SIGINT and SIGNALLED.is_set():
            events.event("interrupted", "interrupted", level="error")
            os._exit(130)
        first = not SIGNALLED.is_set()
        SIGNALLED.set()
        STOP.set()  # before the line, which can fail (`lakehouse.service.StopSignal`)
        if first:
            name = signal.Signals(signum).name
            with contextlib.suppress(Exception):
                events.event("stream.stop", f"{name} received: landing what is held, then stopping")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def __getattr__(name: str) -> Dataflow:
    # `python -m bytewax.run stream.cdc:flow` reads the module attribute `flow`; build it
    # lazily so importing this module never needs the settings.
    if name == "flow":
        install_signal_handlers()
        return build_flow(Settings.from_env())
    raise AttributeError(name)
