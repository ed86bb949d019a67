"""The `lakehouse` command line: one line per error, non-zero exit, tracebacks with --debug.

`parser` declares the commands, each with its handler; the handlers live by area
(`source`, `pipeline`, `query`, `stream`, `ml`) and report through `lakehouse.log`, so
`--log-format json` holds for every command's messages.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from lakehouse import environment, log
from lakehouse.cli.parser import build_parser
from lakehouse.errors import LakehouseError
from lakehouse.settings import PREFIX, Settings

__all__ = ["build_parser", "main"]


def _requested_format(args_list: list[str]) -> str:
    """Find the log format before parsing, so that even a usage error is logged in it.

    The environment is read directly here because the settings may be what is wrong.
    """
    for i, arg in enumerate(args_list):
        if arg == "--log-format" and i + 1 < len(args_list):
            return args_list[i + 1]
        if arg.startswith("--log-format="):
            return arg.split("=", 1)[1]
    return os.environ.get(PREFIX + "LOG_FORMAT", "text")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args_list
    fmt = _requested_format(args_list)
    log.configure(fmt if fmt in log.FORMATS else "text")
    try:
        args = build_parser().parse_args(args_list)
        settings = Settings.from_env()
        log.configure(args.log_format or settings.log_format, settings)
        # Before any work starts a native thread that reads the environment (see there).
        environment.export_for_feast(settings)
        code: int = args.handler(settings, args)
        return code
    except LakehouseError as exc:
        if debug:
            raise
        log.event("error", f"error: {exc}", level="error", error=str(exc), kind=type(exc).__name__)
        return exc.exit_code
    except KeyboardInterrupt:
        log.event("interrupted", "interrupted", level="error")
        return 130
