"""The README's commands: extracted from its ```bash blocks, checked, and (by hand) run.

    python tests/readme_commands.py            # list every command and how it is treated
    python tests/readme_commands.py --run      # run them all, in order, in a scratch folder

`tests/test_readme.py` checks in CI that every `lakehouse` command parses with the real
argument parser, every `luigi --module tasks` task and parameter exists, and every
`LAKEHOUSE_*` variable the README names is a setting. `--run` goes further and executes
each command as written (in a scratch copy of the project, as a fresh clone is, so the
default `./.lakehouse` and the embedded Postgres are its own),
except `docker compose` and the install lines (`.ci/run` runs those); commands that
serve forever (`lakehouse serve`, `lakehouse stream`, `luigid`, background `&` lines) run
until the next command of their block is done, then get SIGTERM.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"

# Commands that never return on their own; they run in the background of their block.
_FOREVER = (
    re.compile(r"^lakehouse serve\b"),
    re.compile(r"^lakehouse stream( --promote| --setup)*$"),
    re.compile(r"^lakehouse (run|maintain)\b.*--every\b"),
    re.compile(r"^lakehouse simulate\b(?!.*--duration)(?=.*--rate)"),
    re.compile(r"^luigid\b"),
    re.compile(r"^python -m bytewax\.run\b"),
    re.compile(r"^feast ui\b"),
)


@dataclass
class Command:
    """One command of a README block."""

    block: int
    line: int
    text: str
    background: bool

    @property
    def argv(self) -> list[str]:
        """Return the words, without a trailing `&` or redirections."""
        words = shlex.split(self.text, comments=True)
        out = []
        skip = False
        for word in words:
            if skip:
                skip = False
                continue
            if word in (">", ">>", "2>", "<"):
                skip = True
                continue
            if word == "&":
                continue
            out.append(word)
        return out

    @property
    def skip_reason(self) -> str | None:
        """Why `--run` does not run it, if it does not."""
        if self.text.startswith("docker compose") or self.text.startswith("docker "):
            return "needs a Docker engine (validated statically by tests/test_compose.py)"
        if "python3 -m venv" in self.text:
            return "install line: .ci/run runs it on a clean clone"
        if self.text.startswith(".venv/bin/"):
            return "development check: .ci/run runs it in its fresh virtual environment"
        return None

    @property
    def forever(self) -> bool:
        """Tell whether the command serves until stopped."""
        plain = " ".join(self.argv)
        return self.background or any(p.search(plain) for p in _FOREVER)


def blocks(text: str) -> list[tuple[int, list[tuple[int, str]]]]:
    """Return the ```bash blocks as (first line number, [(line number, line)])."""
    out: list[tuple[int, list[tuple[int, str]]]] = []
    current: list[tuple[int, str]] | None = None
    start = 0
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if current is None and stripped in ("```bash", "```sh", "```console"):
            current, start = [], number
        elif current is not None and stripped == "```":
            out.append((start, current))
            current = None
        elif current is not None:
            current.append((number, line))
    return out


def commands(text: str | None = None) -> list[Command]:
    """Return every command of the README's shell blocks, in order.

    A command may span lines (an open quote or a trailing backslash); comments go.
    """
    text = README.read_text() if text is None else text
    found: list[Command] = []
    for index, (_, lines) in enumerate(blocks(text)):
        pending, first, continued = "", 0, False
        for number, line in lines:
            if not pending and not line.strip():
                continue
            if not pending:
                first = number
            # A backslash joins lines into one (the shell's line continuation); an open
            # quote keeps the newline (a multi-line SQL string).
            joiner = " " if continued else "\n"
            pending = f"{pending}{joiner}{line}" if pending else line
            continued = pending.endswith("\\")
            if continued:
                pending = pending[:-1].rstrip()
                continue
            try:
                words = shlex.split(pending, comments=True)
            except ValueError:  # an open quote: the command goes on
                continue
            if words:
                body = _without_comment(pending).strip()
                background = body.endswith("&")
                found.append(Command(index, first, body.rstrip("&").strip(), background))
            pending = ""
    return found


def _without_comment(text: str) -> str:
    """Cut a trailing `# comment` that is outside quotes."""
    quote = ""
    for i, char in enumerate(text):
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or text[i - 1].isspace()):
            return text[:i]
    return text


# ---------------------------------------------------------------- running them


def run_all(keep: bool = False) -> int:
    """Run every command in a scratch folder; print one line per command; return failures."""
    scratch = Path(tempfile.mkdtemp(prefix="lakehouse-readme-"))
    scratch.chmod(0o755)
    project = _copy_project(scratch / "project")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKEHOUSE_")}
    bin_dir = str(Path(sys.executable).parent)
    env |= {"PATH": f"{bin_dir}:{env.get('PATH', '')}", "PYTHONPATH": str(project)}
    failures = 0
    s3: subprocess.Popen[bytes] | None = None
    background: list[subprocess.Popen[bytes]] = []
    block = -1
    cwd = project
    for command in commands():
        if command.block != block:
            _stop(background)
            # Each block starts where the README's reader is: the project folder.
            block, cwd = command.block, project
        reason = command.skip_reason
        if reason:
            print(f"SKIP  {command.text.splitlines()[0]}  ({reason})")
            continue
        argv = command.argv
        if argv[0] == "cd":
            cwd = (cwd / argv[1]).resolve()
            print(f"ok    {command.text}")
            continue
        if argv[0] == "export":
            for pair in argv[1:]:
                key, _, value = pair.partition("=")
                env[key] = os.path.expandvars(value.replace("$PWD", str(cwd)))
            print(f"ok    {command.text}")
            continue
        shell_text = command.text
        if env.get("LAKEHOUSE_S3_ENDPOINT") and s3 is None:
            s3 = _s3_server(env["LAKEHOUSE_S3_ENDPOINT"])
        if command.forever:
            child = subprocess.Popen(
                ["bash", "-c", f"exec {shell_text}"],
                cwd=cwd,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            time.sleep(8)
            if child.poll() is not None and child.returncode != 0:
                failures += 1
                err = (child.stderr.read() if child.stderr else b"").decode()[-300:]
                print(f"FAIL  {shell_text}  (exited {child.returncode}: {err.strip()})")
            else:
                background.append(child)
                print(f"ok    {shell_text}  (serving; stopped at the end of its block)")
            continue
        started = time.monotonic()
        result = subprocess.run(
            ["bash", "-o", "pipefail", "-c", shell_text],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        took = time.monotonic() - started
        first_line = shell_text.splitlines()[0]
        if result.returncode == 0:
            print(f"ok    {first_line}  ({took:.1f}s)")
        else:
            failures += 1
            lines = (result.stderr or result.stdout).strip().splitlines()
            print(f"FAIL  {first_line}  (exit {result.returncode}: {lines[-1] if lines else ''})")
    _stop(background)
    if s3 is not None:
        _stop([s3])
    subprocess.run(
        [str(Path(bin_dir) / "lakehouse"), "db", "stop"], env=env, cwd=project, check=False
    )
    print(f"{failures} failed; scratch folder {scratch}")
    return failures


def _s3_server(endpoint: str) -> subprocess.Popen[bytes]:
    """Stand in for MinIO where the README points at it: moto's S3 server on that port."""
    from urllib.parse import urlsplit

    port = urlsplit(endpoint).port or 9000
    child = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    time.sleep(3)
    print(f"note  S3 server (moto) started on port {port} in place of MinIO")
    return child


def _copy_project(target: Path) -> Path:
    """Copy the project's files (as a fresh clone has them) to run the README in."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in listed:
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(source.read_bytes())
            (target / name).chmod(source.stat().st_mode & 0o777 | 0o044)
    target.chmod(0o755)
    return target


def _stop(background: list[subprocess.Popen[bytes]]) -> None:
    while background:
        child = background.pop()
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()


def main() -> int:
    """List, or with `--run` run, the README's commands."""
    if "--run" in sys.argv[1:]:
        return 1 if run_all() else 0
    for command in commands():
        how = command.skip_reason or ("serves until stopped" if command.forever else "runs")
        print(f"README.md:{command.line}: {command.text.splitlines()[0]}  [{how}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
