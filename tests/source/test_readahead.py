"""The read-ahead thread gives every item in order, raises the producer's error, and is
gone (its source closed) when the consumer stops early."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lakehouse.source.readahead import read_ahead


@given(items=st.lists(st.integers(), max_size=50), depth=st.integers(1, 4))
def test_every_item_in_order(items: list[int], depth: int) -> None:
    assert list(read_ahead(iter(items), depth)) == items


def test_the_producers_error_reaches_the_consumer_after_what_came_before() -> None:
    def produce() -> Iterator[int]:
        yield 1
        yield 2
        raise RuntimeError("connection lost")

    got = []
    with pytest.raises(RuntimeError, match="connection lost"):
        for item in read_ahead(produce()):
            got.append(item)
    assert got == [1, 2]


def test_stopping_early_closes_the_source_before_returning() -> None:
    closed = threading.Event()
    produced = []

    def produce() -> Iterator[int]:
        try:
            for i in range(1000):
                produced.append(i)
                yield i
        finally:
            closed.set()

    items = read_ahead(produce(), depth=2)
    assert next(items) == 0
    items.close()
    # The COPY the items read from may be used again at once: the thread is done.
    assert closed.is_set()
    assert not [t for t in threading.enumerate() if t.name == "read-ahead"]
    assert len(produced) <= 4  # the depth bounds how far it ran ahead


def test_a_consumer_error_stops_the_producer() -> None:
    closed = threading.Event()

    def produce() -> Iterator[int]:
        try:
            yield from range(10**9)
        finally:
            closed.set()

    def consume() -> None:
        for item in read_ahead(produce()):
            if item == 3:
                raise ValueError("bad batch")

    with pytest.raises(ValueError, match="bad batch"):
        consume()
    assert closed.is_set()
