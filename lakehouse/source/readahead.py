"""Read ahead: a producer thread a few items ahead of its consumer.

Extraction reads a COPY (the server formatting rows, psycopg handing them to Python)
and writes Delta (parsing, encoding Parquet). In one thread each waits for the other;
with the reading in a thread of its own they overlap, one core each (`bronze` at 1M
rows: 6.5 s -> 4.1 s on two cores, `benchmarks/batch.py`, with the cheaper query).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterator
from contextlib import suppress
from typing import TypeVar

from lakehouse.interrupts import held

T = TypeVar("T")

_END = object()


def read_ahead(items: Iterator[T], depth: int = 2) -> Generator[T]:
    """Yield `items`, produced by a thread up to `depth` ahead of the consumer.

    The producer (the server formatting rows, psycopg receiving them) then works while
    the consumer parses and writes the previous item: one core each, where in one thread
    each would wait for the other. At most `depth` + 2 items exist at once (queued, being
    produced, being consumed). An error in the producer is raised here. When the
    consumer stops early, the thread stops and closes `items` (a generator's `finally`
    runs) before this generator returns, so whatever the items read from is free again.
    """
    ready: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                with suppress(Exception):
                    close()

    thread = threading.Thread(target=produce, name="read-ahead", daemon=True)
    try:
        thread.start()
        while True:
            item = ready.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        # Ctrl-C waits for the join: the thread may be inside the connection's COPY,
        # which the caller's cleanup (cancel, rollback) must not touch meanwhile. It
        # returns within a row's arrival (or at once, stopped between items).
        with held():
            stop.set()
            if thread.is_alive():
                thread.join()
