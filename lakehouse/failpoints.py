"""Named pause points for fault-injection tests: a test kills the process while it waits.

Set `LAKEHOUSE_FAILPOINT=<name>`; when the code reaches that point it prints
`failpoint <name> reached` on stderr and sleeps until killed, or, with
`LAKEHOUSE_FAILPOINT_PAUSE=<seconds>`, for that long and then carries on (a race made
certain: another writer commits meanwhile). Unset, it costs one lookup.
"""

from __future__ import annotations

import os
import sys
import time

ENV = "LAKEHOUSE_FAILPOINT"
PAUSE = "LAKEHOUSE_FAILPOINT_PAUSE"


def failpoint(name: str) -> None:
    """Pause here (forever, or `LAKEHOUSE_FAILPOINT_PAUSE` seconds) if this point is named."""
    if os.environ.get(ENV) == name:
        print(f"failpoint {name} reached", file=sys.stderr, flush=True)
        pause = os.environ.get(PAUSE)
        if pause:
            time.sleep(float(pause))
            return
        while True:
            time.sleep(60)
