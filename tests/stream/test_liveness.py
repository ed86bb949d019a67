"""`lakehouse stream alive`, the stream's liveness probe, against heartbeats on disk.

The running stream's side (it beats, a new one removes a killed one's file, a clean stop
removes its own) is in tests/stream/test_cdc.py and the compose rehearsal.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from lakehouse.settings import Settings
from stream import liveness


def alive(home: Path, *options: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "lakehouse.cli", "stream", "alive", *options],
        env={**os.environ, "LAKEHOUSE_HOME": str(home), "LAKEHOUSE_PG_SCHEMA": "lending"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.returncode, (done.stdout + done.stderr).strip()


def test_the_probe_reads_turns_and_work_in_progress(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, pg_schema="lending")
    beat = liveness.Heartbeat(liveness.heartbeat_path(settings))
    code, said = alive(tmp_path)
    assert code == 1 and "no heartbeat" in said

    beat.beat()
    code, said = alive(tmp_path)
    assert code == 0 and said.startswith("stream alive: last turn"), said

    # Turning, but one promotion into silver has run for 15 minutes: stuck (a promotion
    # may take five times the limit for a turn, 10 minutes by default).
    beat._last = float("-inf")
    beat.beat(busy_since=time.time() - 900)
    code, said = alive(tmp_path)
    assert code == 1 and "online refresh has run for 90" in said and "limit 600s" in said
    assert alive(tmp_path, "--max-age", "200")[0] == 0

    # No turn for ten minutes: stuck; a clean stop removes the file.
    path = liveness.heartbeat_path(settings)
    os.utime(path, (time.time() - 600, time.time() - 600))
    code, said = alive(tmp_path)
    assert code == 1 and "last turn 60" in said
    beat.stop()
    assert not path.exists()


def test_a_heartbeat_that_cannot_be_written_never_stops_the_stream(tmp_path: Path) -> None:
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    beat = liveness.Heartbeat(blocked / "stream" / "lending.alive")
    beat.beat()  # NotADirectoryError inside: logged once, not raised
    beat._last = float("-inf")
    beat.beat()
    assert beat._failed
