"""Native crash soak: the commands that crashed, many times, each in a fresh process.

CI saw `terminate called without an active exception` (SIGABRT at exit) and segfaults,
once each: rare native crashes that one run of a test does not show. This repeats the
commands involved and counts every process that died by a signal or printed a native
crash, per case; a clean exit with another code than the expected one counts apart
(`failed`), so a crash is never hidden among ordinary failures.

Cases (each run is a fresh `python -m lakehouse.cli` process):

- `status`: `lakehouse status` on S3 (Polars and delta-rs threads reading S3);
- `run-s3`: `lakehouse simulate --changes 20` then `lakehouse run --no-ml` on S3;
- `serve`: `lakehouse serve`, `GET /health`, SIGTERM: exit 0 expected;
- `sql-ctrl-c`: a long `lakehouse sql` query and Ctrl-C (SIGINT) while it runs: 130;
- `sql-timeout`: the same query with `--timeout 1`: exit 1.

Services: an embedded Postgres and a moto S3 server over HTTP, under a temporary folder.
Run by hand (about 10 s per round on 2 cores; `--code` soaks another checkout, such as
the commit before a fix, for a before/after figure)::

    .venv/bin/python -m tests.soak --runs 200
    .venv/bin/python -m tests.soak --runs 100 --cases sql-ctrl-c --code ../before

`tests/test_soak.py` runs one round in CI.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKERS = ("terminate called", "Fatal Python error", "Segmentation fault", "core dumped")
LONG_QUERY = "SELECT sum(hash(a.range * b.range)) FROM range(1000000) a, range(100000) b"


@dataclass
class Tally:
    """What the runs of one case did."""

    runs: int = 0
    crashes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def per_thousand(self) -> float:
        return 1000 * len(self.crashes) / self.runs if self.runs else 0.0


@dataclass
class Outcome:
    code: int
    stderr: str


def crashed(outcome: Outcome) -> bool:
    """A native crash: killed by a signal, or a native runtime's last words."""
    return outcome.code < 0 or any(m in outcome.stderr for m in MARKERS)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for(url: str, proc: subprocess.Popen[str], timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with suppress(OSError), urllib.request.urlopen(url, timeout=2) as answer:
            return bool(answer.status == 200)
        time.sleep(0.2)
    return False


class Lake:
    """The services and settings every case runs against."""

    def __init__(self, workdir: Path, code: Path) -> None:
        self.workdir = workdir
        self.code = code
        self.env: dict[str, str] = {}

    def cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "lakehouse.cli", *args]

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.cli(*args),
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )

    def run(self, *args: str, timeout: float = 300) -> Outcome:
        proc = self.popen(*args)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            return Outcome(0, f"timed out after {timeout}s\n{err}")
        return Outcome(proc.returncode, err)


@contextmanager
def lake(workdir: Path, code: Path) -> Iterator[Lake]:
    """Start Postgres and S3, seed 300 rows, run the pipeline once on S3."""
    sys.path.insert(0, str(ROOT))
    from lakehouse.settings import Settings
    from lakehouse.source.embedded import EmbeddedPostgres

    pg_home = workdir / "pg"
    pg_home.mkdir(mode=0o755)
    pg = EmbeddedPostgres(Settings(home=pg_home), extra_options={"fsync": "off"})
    pg.start()
    port = _free_port()
    moto = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                break
            time.sleep(0.1)
        it = Lake(workdir, code)
        it.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(code),
            "LAKEHOUSE_HOME": str(workdir / "home"),
            "LAKEHOUSE_PG_DSN": pg.dsn(),
            "LAKEHOUSE_STORAGE_URI": "s3://soak/lakehouse",
            "LAKEHOUSE_S3_ENDPOINT": endpoint,
            "LAKEHOUSE_S3_ACCESS_KEY_ID": "soak-key",
            "LAKEHOUSE_S3_SECRET_ACCESS_KEY": "soak-secret",
        }
        import boto3

        boto3.client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id="soak-key",
            aws_secret_access_key="soak-secret",
            region_name="us-east-1",
        ).create_bucket(Bucket="soak")
        for step in (("seed", "--rows", "300"), ("run", "--no-ml")):
            done = it.run(*step)
            if done.code != 0:
                msg = f"soak set-up `{' '.join(step)}` failed: {done.stderr[-2000:]}"
                raise RuntimeError(msg)
        yield it
    finally:
        moto.terminate()
        moto.wait()
        pg.destroy()


def case_status(it: Lake) -> tuple[Outcome, int]:
    return it.run("status"), 0


def case_run_s3(it: Lake) -> tuple[Outcome, int]:
    simulated = it.run("simulate", "--changes", "20")
    if simulated.code != 0:
        return simulated, 0
    return it.run("run", "--no-ml"), 0


def case_serve(it: Lake) -> tuple[Outcome, int]:
    port = _free_port()
    proc = it.popen("serve", "--port", str(port))
    up = _wait_for(f"http://127.0.0.1:{port}/health", proc)
    proc.send_signal(signal.SIGTERM)
    outcome = _finish(proc, "SIGTERM did not stop it")
    if not up:
        outcome.stderr = f"never answered /health\n{outcome.stderr}"
    return outcome, 0


def case_sql_ctrl_c(it: Lake) -> tuple[Outcome, int]:
    proc = it.popen("sql", LONG_QUERY)
    time.sleep(2.5)  # well into the query (start-up takes about 1 s)
    proc.send_signal(signal.SIGINT)
    return _finish(proc, "Ctrl-C did not stop it"), 130


def _finish(proc: subprocess.Popen[str], stuck: str) -> Outcome:
    """Wait for a signalled process; kill it after a minute, saying `stuck`."""
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        err = f"{stuck}\n{err}"
    return Outcome(proc.returncode, err)


def case_sql_timeout(it: Lake) -> tuple[Outcome, int]:
    return it.run("sql", "--timeout", "1", LONG_QUERY), 1


CASES: dict[str, Callable[[Lake], tuple[Outcome, int]]] = {
    "status": case_status,
    "run-s3": case_run_s3,
    "serve": case_serve,
    "sql-ctrl-c": case_sql_ctrl_c,
    "sql-timeout": case_sql_timeout,
}


def soak(
    runs: int,
    cases: list[str],
    code: Path = ROOT,
    progress: Callable[[int, dict[str, Tally]], None] | None = None,
) -> dict[str, Tally]:
    """Run each case `runs` times, round-robin; return the tallies (and show each round's)."""
    tallies = {name: Tally() for name in cases}
    workdir = Path(tempfile.mkdtemp(prefix="lakehouse-soak-"))
    workdir.chmod(0o755)  # as root, the cluster's owner must reach its folder
    try:
        with lake(workdir, code) as it:
            for round_ in range(1, runs + 1):
                for name in cases:
                    outcome, expected = CASES[name](it)
                    tally = tallies[name]
                    tally.runs += 1
                    last = outcome.stderr.strip().splitlines()[-3:]
                    if crashed(outcome):
                        tally.crashes.append(f"exit {outcome.code}: {' | '.join(last)}")
                    elif outcome.code != expected:
                        tally.failures.append(f"exit {outcome.code}: {' | '.join(last)}")
                if progress is not None:  # a long soak cut short still tells what it saw
                    progress(round_, tallies)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return tallies


def report(tallies: dict[str, Tally]) -> str:
    lines = [
        "| case | runs | crashes | per 1,000 | other failures |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, t in tallies.items():
        lines.append(
            f"| {name} | {t.runs} | {len(t.crashes)} | {t.per_thousand():.1f} | {len(t.failures)} |"
        )
    for name, t in tallies.items():
        for what in t.crashes[:5]:
            lines.append(f"- crash in {name}: {what}")
        for what in t.failures[:5]:
            lines.append(f"- failure in {name}: {what}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=100, help="rounds (each runs every case)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated cases")
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout to soak")
    args = parser.parse_args(argv)
    started = time.monotonic()

    def progress(done: int, tallies: dict[str, Tally]) -> None:
        crashes = sum(len(t.crashes) for t in tallies.values())
        failures = sum(len(t.failures) for t in tallies.values())
        elapsed = time.monotonic() - started
        print(
            f"round {done}/{args.runs}: {crashes} crashes, {failures} other failures "
            f"({elapsed:.0f} s)",
            file=sys.stderr,
            flush=True,
        )

    tallies = soak(args.runs, args.cases.split(","), args.code.resolve(), progress)
    print(report(tallies))
    print(f"({time.monotonic() - started:.0f} s, code at {args.code})")
    return 1 if any(t.crashes for t in tallies.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
