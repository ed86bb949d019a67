"""The `lakehouse` console script: Ctrl-C while it starts is an interrupt, not a traceback.

Importing the command line takes a tenth of a second, and a KeyboardInterrupt raised
then would escape `cli.main`'s handler; this module imports nothing of its own first.
"""

from __future__ import annotations

import sys


def main() -> int:
    """Import and run the command line; exit 130 with one line if interrupted first."""
    try:
        from lakehouse import interrupts

        interrupts.install()  # first: a Ctrl-C swallowed while importing is remembered
        from lakehouse.cli import main as cli_main
        from lakehouse.environment import private_files
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    private_files()  # before anything is written (lakehouse.environment says why)
    return cli_main()
