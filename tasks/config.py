"""The lakehouse's Luigi settings (`tasks/luigi.cfg`) and the process start method.

One explicit call, `configure()`, made by `lakehouse run` and by importing `tasks` (the
`luigi --module tasks` entry has no other hook before it builds its worker). Idempotent.
"""

from __future__ import annotations

import configparser
import multiprocessing
from pathlib import Path

import luigi.configuration

DEFAULTS = Path(__file__).with_name("luigi.cfg")


def configure() -> None:
    """Apply `tasks/luigi.cfg` under the user's Luigi config, and start workers by spawn.

    An option the user's own luigi.cfg sets is left as it is. deltalake's tokio runtime
    does not survive fork, so `--workers N` must spawn its worker processes.
    """
    ours = configparser.ConfigParser()
    if not ours.read(DEFAULTS):  # without it a failed run would exit 0
        msg = f"the lakehouse's Luigi settings {DEFAULTS} are missing: reinstall the package"
        raise FileNotFoundError(msg)
    config = luigi.configuration.get_config()
    for section in ours.sections():
        for option, value in ours.items(section):
            if not config.has_option(section, option):
                config.set(section, option, value)
    if multiprocessing.get_start_method(allow_none=True) != "spawn":
        multiprocessing.set_start_method("spawn", force=True)
