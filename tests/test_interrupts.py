"""Ctrl-C at the worst moments of start-up: inside a native import, inside a `__del__`.

Each runs in a fresh interpreter with `lakehouse.interrupts` installed, as the console
script does, and sends itself SIGINT at the moment under test (the end-to-end version,
Ctrl-C at 0.3 s of `lakehouse sql`, is in `test_sql_stop`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path


def _run(tmp_path: Path, body: str, **extra: str) -> subprocess.CompletedProcess[str]:
    script = "from lakehouse import interrupts\ninterrupts.install()\n" + textwrap.dedent(body)
    path = f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    env = {**os.environ, "PYTHONPATH": path, **extra}
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )


def test_a_ctrl_c_held_arrives_when_the_block_ends(tmp_path: Path) -> None:
    """In a fresh interpreter, as the console script holds its imports. (In pytest's own
    long-lived process it failed twice in CI, DID NOT RAISE, after the earlier test
    modules, and passed after `tests/stream` alone: some earlier in-process test leaves
    signal delivery changed, which a command's process never inherits.)"""
    done = _run(
        tmp_path,
        """
        import os, signal, time
        finished = False
        try:
            with interrupts.held():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                finished = True
        except KeyboardInterrupt:
            print("raised after the block", finished)
        """,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "raised after the block True\n"


def test_a_native_library_imports_whole_and_then_the_ctrl_c_arrives(tmp_path: Path) -> None:
    """A library named in NATIVE sends SIGINT mid-initialisation: it still initialises
    to the end, and the import then raises KeyboardInterrupt (the command's exit 130)."""
    (tmp_path / "native_stand_in").mkdir()
    (tmp_path / "native_stand_in" / "__init__.py").write_text(
        "import os, pathlib, signal, sys, time\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(0.2)\n"
        "pathlib.Path(os.environ['MARK']).write_text('whole')\n"
    )
    mark = tmp_path / "mark"
    done = _run(
        tmp_path,
        """
        interrupts.NATIVE = interrupts.NATIVE | {"native_stand_in"}
        try:
            import native_stand_in
        except KeyboardInterrupt:
            print("interrupted after", interrupts.received())
        """,
        MARK=str(mark),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "interrupted after True\n"
    assert mark.read_text() == "whole"


def test_a_ctrl_c_swallowed_in_a_finalizer_is_recorded_and_not_printed(tmp_path: Path) -> None:
    done = _run(
        tmp_path,
        """
        import os, signal, time

        class Closing:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)

        c = Closing()
        del c
        print("received", interrupts.received())
        """,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "received True\n"
    assert done.stderr == ""
