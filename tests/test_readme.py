"""The README's commands exist as written: parsed by the real CLIs, not by eye.

Running them all is `python tests/readme_commands.py --run` (minutes, by hand); these
checks are the part that fits in CI.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lakehouse.cli import build_parser
from lakehouse.settings import PREFIX, Settings
from tests.readme_commands import README, ROOT, commands

TEXT = README.read_text()


def _parts(text: str) -> list[list[str]]:
    """Split a command line on `&&`, `|` and `;` into word lists."""
    import shlex

    lexer = shlex.shlex(text, posix=True, punctuation_chars="&|;")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    parts: list[list[str]] = [[]]
    for word in lexer:
        if word in ("&&", "|", ";", "||"):
            parts.append([])
        elif word not in ("&", ">", ">>") and not word.endswith(".csv"):
            parts[-1].append(word)
    return [p for p in parts if p]


def _invocations(program: str) -> list[list[str]]:
    found = []
    for command in commands():
        for words in _parts(command.text):
            if Path(words[0]).name == program:
                found.append(words[1:])
    return found


def test_the_readme_opens_with_the_two_commands() -> None:
    first = re.search(r"```bash\n(.*?)```", TEXT, re.S)
    assert first is not None and TEXT.index("```bash") < TEXT.index("\n## ")
    lines = first.group(1).strip().splitlines()
    assert lines == [
        "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/lakehouse demo",
        "python3 -m venv .venv && .venv/bin/pip install '.[dev]' && .venv/bin/pytest",
    ]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip\" install --quiet '.[dev]'" in ci and '"$venv/bin/pytest"' in ci


def test_every_lakehouse_command_parses() -> None:
    invocations = _invocations("lakehouse")
    assert len(invocations) > 30
    parser = build_parser()
    seen = set()
    for argv in invocations:
        args = parser.parse_args(argv)  # raises UsageError naming the bad option
        seen.add(args.command)
    # Every subcommand the CLI has is shown at least once.
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) - seen == set(), set(sub.choices) - seen  # type: ignore[arg-type]


def test_every_luigi_command_names_real_tasks_and_parameters() -> None:
    import luigi.cmdline_parser

    import tasks

    invocations = _invocations("luigi")
    assert invocations
    for argv in invocations:
        with luigi.cmdline_parser.CmdlineParser.global_instance(argv) as parser:
            task = parser.get_task_obj()
        assert task.task_family in tasks.__all__


# What `python -m bytewax.run module:flow` does to find the flow, then a SIGTERM as
# `docker compose stop` sends: in a child, because getting `stream.cdc:flow` installs the
# flow's SIGTERM/SIGINT handlers (Ctrl-C would no longer stop pytest).
_FLOW_CHECK = """
import importlib, json, os, signal, sys
from bytewax.dataflow import Dataflow
module, _, name = sys.argv[1].partition(":")
flow = getattr(importlib.import_module(module), name)
from stream import cdc
stopped_before = cdc.STOP.is_set()
os.kill(os.getpid(), signal.SIGTERM)
print(json.dumps({
    "dataflow": isinstance(flow, Dataflow),
    "steps": [(s.step_id, type(s).__name__) for s in flow.substeps],
    "stop_on_sigterm": not stopped_before and cdc.STOP.is_set(),
}))
"""


def test_the_other_programs_and_flows_exist(tmp_path: Path) -> None:
    (target,) = re.findall(r"python -m bytewax\.run (\S+:\w+)", TEXT)
    assert target == "stream.cdc:flow"
    found = subprocess.run(
        [sys.executable, "-c", _FLOW_CHECK, target],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
        check=False,
    )
    assert found.returncode == 0, found.stderr[-2000:]
    *said, last = found.stdout.strip().splitlines()
    assert "SIGTERM received: landing what is held, then stopping" in "".join(said)
    assert json.loads(last) == {
        "dataflow": True,
        "steps": [["lakehouse_cdc.slots", "input"], ["lakehouse_cdc.bronze", "output"]],
        "stop_on_sigterm": True,
    }
    feast = [argv[0] for argv in _invocations("feast")]
    assert feast
    listed = subprocess.run(
        [str(Path(sys.executable).parent / "feast"), "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    for sub in feast:
        assert re.search(rf"^\s+{re.escape(sub)}\s", listed, re.M), sub
    luigid = subprocess.run(
        [str(Path(sys.executable).parent / "luigid"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert luigid.returncode == 0 and "--port" in luigid.stdout


def test_every_setting_is_documented_and_every_documented_variable_exists() -> None:
    fields = {PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
    internal = {
        f"{PREFIX}FEAST_PG_{k}"
        for k in ("HOST", "PORT", "DATABASE", "USER", "PASSWORD", "SCHEMA", "SSLMODE")
    }
    table = TEXT[TEXT.index("## Configuration") :]
    table = table[: table.index("\n## ", 5)]
    documented = set(re.findall(r"^\| `(LAKEHOUSE_[A-Z0-9_]+)`", table, re.M))
    assert documented == fields
    named = set(re.findall(r"\bLAKEHOUSE_[A-Z0-9_]*[A-Z0-9]\b", TEXT))
    named -= {"LAKEHOUSE_FEAST_PG"}  # "LAKEHOUSE_FEAST_PG_HOST, _PORT, ..." in prose
    assert named - fields - internal == set()


@pytest.mark.parametrize(
    "link", sorted(set(re.findall(r"\]\(((?!https?:)[^)#]+)\)", TEXT))), ids=str
)
def test_local_links_point_at_files(link: str) -> None:
    assert (ROOT / link).exists(), link


def test_no_development_machine_paths_in_code_or_docs() -> None:
    """Commands in docstrings and docs run from the project folder (issue 14: the
    benchmarks named a development machine's virtualenv)."""
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    pattern = re.compile(r"(?<![\w.])/(work|home/\w+|root|Users/\w+)/")
    found = [
        f"{name}:{n}"
        for name in tracked
        if name.endswith((".py", ".md", ".toml", ".yaml", ".yml", ".sh", ".cfg"))
        and not name.startswith("tests/")
        for n, line in enumerate((ROOT / name).read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not found, found
