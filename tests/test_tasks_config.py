"""The lakehouse's Luigi defaults come from tasks/luigi.cfg and never override the user's."""

from __future__ import annotations

import configparser
from collections.abc import Iterator

import luigi.configuration
import pytest

import tasks
from tasks.config import DEFAULTS


@pytest.fixture
def luigi_config() -> Iterator[luigi.configuration.LuigiConfigParser]:
    """Luigi's global config, put back as it was after the test."""
    config = luigi.configuration.get_config()
    saved = {s: dict(config.items(s, raw=True)) for s in config.sections()}
    yield config
    for section in config.sections():
        config.remove_section(section)
    for section, options in saved.items():
        config.add_section(section)
        for option, value in options.items():
            config.set(section, option, value)


def test_a_users_option_wins_and_the_rest_are_ours(
    luigi_config: luigi.configuration.LuigiConfigParser,
) -> None:
    for section in ("retcode", "worker"):
        if luigi_config.has_section(section):
            luigi_config.remove_section(section)
    luigi_config.add_section("retcode")
    luigi_config.set("retcode", "task_failed", "9")  # the user's own choice
    tasks.configure()
    assert luigi_config.get("retcode", "task_failed") == "9"
    # Documented in README (exit codes): a completion check that cannot run exits 6.
    assert luigi_config.get("retcode", "scheduling_error") == "6"
    assert luigi_config.get("worker", "check_unfulfilled_deps") == "false"
    # Every option of the shipped file is applied (the file is the one source).
    shipped = configparser.ConfigParser()
    assert shipped.read(DEFAULTS) == [str(DEFAULTS)]
    for section in shipped.sections():
        for option in shipped.options(section):
            assert luigi_config.has_option(section, option), (section, option)
