"""`lakehouse sql` as a process: Ctrl-C, --timeout and bounded memory for big results.

Each runs the console script in a fresh process, as a user would; none needs a table,
so they run on local storage only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

#: A query that runs for about a minute on this machine: long enough to be stopped.
LONG = "SELECT sum(hash(a.range * b.range)) FROM range(1000000) a, range(100000) b"
#: 3M rows of ~200 bytes: about 1.2 GB when fetched whole.
BIG = "SELECT i, repeat('x', 200) || i AS s FROM range(3000000) t(i)"


def _script() -> str:
    """The installed `lakehouse` console script of this interpreter's environment."""
    path = Path(sys.executable).parent / "lakehouse"
    assert path.exists(), f"no console script at {path}: install the project first"
    return str(path)


def _start(tmp_path: Path, *args: str, stdout: int = subprocess.PIPE) -> subprocess.Popen[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LAKEHOUSE_HOME": str(tmp_path)}
    return subprocess.Popen(
        [_script(), "sql", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # a terminal's Ctrl-C reaches its foreground group
    )


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("when", ["starting", "running"])
def test_ctrl_c_stops_the_query_with_exit_130_and_one_line(tmp_path: Path, when: str) -> None:
    proc = _start(tmp_path, LONG)
    if when == "starting":
        time.sleep(0.3)  # importing, connecting, loading the Delta extension
    else:  # the query has used CPU well past start-up: it is running
        deadline = time.monotonic() + 60
        while _cpu_seconds(proc.pid) < 4.0 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.1)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        # Never leave the query running: it would take a core from every later test.
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"Ctrl-C did not stop the query within 30 s; stderr: {err[-2000:]!r}")
    assert proc.returncode == 130, err
    assert err == "interrupted\n"
    assert time.monotonic() - sent < 10


def test_timeout_stops_the_query(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = _start(tmp_path, "--timeout", "2", LONG)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert err == (
        "error: query stopped after --timeout 2 s: narrow it (WHERE, LIMIT) or raise --timeout\n"
    )
    assert time.monotonic() - started < 30


# The CLI, reporting its peak RSS at exit. Not the child's ru_maxrss: Linux keeps it across
# exec, so a child forked from a large pytest process reports the parent's size.
_MEASURED = (
    "import atexit, os, sys\n"
    "def peak():\n"
    "    for line in open('/proc/self/status'):\n"
    "        if line.startswith('VmHWM:'):\n"
    "            open(os.environ['PEAK_FILE'], 'w').write(line.split()[1])\n"
    "atexit.register(peak)\n"
    "from lakehouse.entry import main\n"
    "sys.exit(main())\n"
)


def _measured(tmp_path: Path, *args: str) -> tuple[int, str, float]:
    """Run `lakehouse sql ARGS`; return its exit code, stdout and peak RSS in MB (VmHWM)."""
    peak = tmp_path / "peak"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LAKEHOUSE_HOME": str(tmp_path),
        "PEAK_FILE": str(peak),
    }
    done = subprocess.run(
        [sys.executable, "-c", _MEASURED, "sql", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    return done.returncode, done.stdout, int(peak.read_text()) / 1024


def test_max_rows_fetches_only_those_rows(tmp_path: Path) -> None:
    code, out, peak = _measured(tmp_path, "--max-rows", "5", BIG)
    assert code == 0
    lines = out.splitlines()
    assert lines[-1] == "(more than 5 rows, 5 shown: raise --max-rows to see more)"
    assert len(lines) == 2 + 5 + 1
    assert peak < 400, f"peak RSS {peak:.0f} MB: the whole result was fetched"  # was 1,179 MB


def test_csv_streams_every_row_in_bounded_memory(tmp_path: Path) -> None:
    rows = 500_000
    code, out, peak = _measured(tmp_path, "--format", "csv", BIG.replace("3000000", str(rows)))
    assert code == 0
    assert out.count("\n") == rows + 1  # and the header
    assert peak < 300, f"peak RSS {peak:.0f} MB: the whole result was fetched"
