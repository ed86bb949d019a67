"""Named pause points for fault-injection tests: a test kills the process while it waits.

Set `LAKEHOUSE_FAILPOINT=<name>`; when the code reaches that point it prints
`failpoint <name> reached` on stderr and sleeps until killed. Unset, it costs one lookup.
"""

from __future__ import annotations

import os
import sys
import time

ENV = "LAKEHOUSE_FAILPOINT"


def failpoint(name: str) -> None:
    """Pause here forever if `LAKEHOUSE_FAILPOINT` names this point."""
    if os.environ.get(ENV) == name:
        print(f"failpoint {name} reached", file=sys.stderr, flush=True)
        while True:
            time.sleep(60)
