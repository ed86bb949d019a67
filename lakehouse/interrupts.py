"""Ctrl-C while the console script starts: held off native imports, never lost.

Python turns SIGINT into a KeyboardInterrupt at the next bytecode, wherever that is, and
two places in start-up break on it (all found by sending Ctrl-C to `lakehouse sql` at
random moments of its first second, on a loaded machine):

- **inside a native library's module initialisation** (`import duckdb`): the import
  fails as `ImportError: initialization failed` with a traceback, or the process crashes.
  `install()` puts a finder on `sys.meta_path` that loads these libraries with SIGINT
  blocked; a Ctrl-C sent meanwhile is delivered when the import is done, as a
  KeyboardInterrupt the command handles.
- **in code that swallows exceptions**: a `__del__` run by the garbage collector, an
  extension's callback. The KeyboardInterrupt is printed as "Exception ignored" and
  lost, and `lakehouse sql` went on to run its query for minutes (found in CI). The
  handler records every SIGINT first; long work (a query) checks `received()`, and the
  lost exception's report is not printed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType, ModuleType
from typing import Any

#: Native libraries whose module initialisation must not be interrupted.
NATIVE = frozenset(
    {"duckdb", "_duckdb", "polars", "deltalake", "pyarrow", "bytewax", "psycopg", "numpy"}
)

_received = threading.Event()


@contextmanager
def held() -> Iterator[None]:
    """Hold SIGINT off the block; one sent meanwhile is raised again when it ends.

    Two holds, because a signal sent to the process reaches any thread that does not
    block it: this thread blocks SIGINT (threads started inside inherit the mask, and
    no system call here fails with EINTR), and Python's handler is swapped for one that
    only records, for a SIGINT that another thread took. Nested holds are released by
    the outermost. Off the main thread, where Python runs no handler, this does nothing.
    """
    handler = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or handler is None:
        yield  # no Python handler to hold (None: one set outside Python)
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # one pending here arrives now
        if caught:
            signal.raise_signal(signal.SIGINT)


class _HeldLoader(importlib.abc.Loader):
    """A loader that runs another one's module creation and execution with SIGINT held."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        with held():
            module: ModuleType | None = self._loader.create_module(spec)
            return module

    def exec_module(self, module: ModuleType) -> None:
        with held():
            self._loader.exec_module(module)

    def __getattr__(self, name: str) -> Any:  # get_resource_reader, is_package, ...
        return getattr(self._loader, name)


class _HoldNativeImports(importlib.abc.MetaPathFinder):
    """Find a native library's modules as usual, and load them with SIGINT held."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.partition(".")[0] not in NATIVE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec: importlib.machinery.ModuleSpec | None = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _HeldLoader(spec.loader)
                return spec
        return None


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    _received.set()
    raise KeyboardInterrupt


def _unraisable(hook: Any) -> Any:
    def report(info: Any) -> None:
        if isinstance(info.exc_value, KeyboardInterrupt):
            return  # recorded by `_on_sigint`; the command reports it once, as "interrupted"
        hook(info)

    return report


def install() -> None:
    """Record every SIGINT, then interrupt as Python's default handler does."""
    if threading.current_thread() is not threading.main_thread():
        return
    signal.signal(signal.SIGINT, _on_sigint)
    sys.unraisablehook = _unraisable(sys.unraisablehook)
    if not any(isinstance(finder, _HoldNativeImports) for finder in sys.meta_path):
        sys.meta_path.insert(0, _HoldNativeImports())


def note() -> None:
    """Record a SIGINT another handler took."""
    _received.set()


def received() -> bool:
    """Tell whether this process has received a SIGINT."""
    return _received.is_set()
