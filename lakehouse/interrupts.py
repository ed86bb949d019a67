"""A Ctrl-C this process received, remembered for the work that starts after it.

Python turns SIGINT into a KeyboardInterrupt at the next bytecode. Code that calls back
into Python from C and clears whatever error it gets (an extension's import probing an
attribute, a library's callback) can swallow that exception without a trace: `lakehouse
sql` interrupted 0.3 s after it started went on to run its query for minutes (found in
CI). The console script installs this handler first; long work (a query) checks
`received()` before it starts, so a swallowed Ctrl-C still stops it.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

_received = threading.Event()


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    _received.set()
    raise KeyboardInterrupt


def install() -> None:
    """Remember every SIGINT, then interrupt as Python's default handler does."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)


def note() -> None:
    """Remember a SIGINT another handler took."""
    _received.set()


def received() -> bool:
    """Tell whether this process has received a SIGINT."""
    return _received.is_set()
