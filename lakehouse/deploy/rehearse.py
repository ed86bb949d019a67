"""Rehearse a compose deployment without a container engine, and check that it converges.

    python -m lakehouse.deploy.rehearse compose/docker-compose.yml

Every service of the file is started as a local process, in `depends_on` order and
waiting on each condition (healthy, completed successfully) with the service's own
healthcheck: its command, its environment with the secrets of a fresh `.env` (or
`--env-file`), its hostnames mapped to 127.0.0.1 and its ports to the file's (plus
`--port-offset`). The system must then converge: a pipeline run recorded, `/predict`
answering, the stream replicating as the least-privilege CDC role and landing changes,
silver matching the source (`lakehouse verify`), `lakehouse status` healthy in every
section. Last, each service gets its image's stop signal, dependents first, and must exit
0 within its grace period. Exit 0 when all of that held; what failed is named otherwise.

What a rehearsal cannot cover (the images, the container network, MinIO itself) is
listed in compose/README.md.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lakehouse.deploy.compose import ComposeError, Project, read_env_file
from lakehouse.deploy.converge import converge
from lakehouse.deploy.supervisor import RehearsalFailed, Supervisor
from lakehouse.errors import LakehouseError, described


def fresh_env(example: Path) -> dict[str, str]:
    """Return a new secret for every variable of `.env.example` (letters, digits, - and _)."""
    return {key: secrets.token_urlsafe(18) for key in read_env_file(example)}


def free_offset(ports: set[int]) -> int:
    """Return an offset at which every one of `ports` is free on 127.0.0.1."""
    for _ in range(50):
        offset = 20000 + secrets.randbelow(20000)
        if all(_free(port + offset) for port in ports):
            return offset
    msg = "found no port offset with every port free; pass --port-offset"
    raise ComposeError(msg)


def _free(port: int) -> bool:
    if port > 65535:
        return False
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def rehearse(
    compose_file: Path,
    *,
    env: dict[str, str],
    workdir: Path,
    offset: int | None,
    timeout: float,
    say: Callable[[str], None],
    overrides: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Start, check and stop the deployment; return the report (raises on a failure)."""
    project = Project(compose_file, env)
    for name, command in (overrides or {}).items():
        if name not in project.services:
            msg = f"--override {name}=...: there is no service `{name}`"
            raise ComposeError(msg)
        project.services[name]["command"] = shlex.split(command)
        say(f"{name}: command overridden for this rehearsal: `{command}`")
    order = project.start_order()
    sup = Supervisor(project, workdir, 0, say)
    if offset is None:
        offset = free_offset({p for ports in sup.ports.values() for p in ports})
    sup.offset = offset
    busy = sorted(
        p + offset for ports in sup.ports.values() for p in ports if not _free(p + offset)
    )
    if busy:
        msg = f"ports {busy} are in use on 127.0.0.1; stop what listens there or pass --port-offset"
        raise ComposeError(msg)
    say(f"rehearsing {len(order)} services in {workdir} (ports + {offset}): {', '.join(order)}")
    report: dict[str, Any] = {"services": order, "offset": offset}
    deadline = time.monotonic() + timeout
    try:
        try:
            for name in order:
                for dep, condition in project.depends_on(name).items():
                    sup.wait_for(dep, condition, deadline)
                sup.start(name)
            report["converged"] = converge(sup, deadline, say)
            report["healthchecks"] = healthchecks(sup, order, say)
        except BaseException:
            # A failed rehearsal ends at once: what it started is killed (a graceful stop
            # could wait for a pipeline run to finish); the logs stay for the reason.
            sup.kill_all()
            report["exit_codes"] = {n: p.popen.returncode for n, p in sup.processes.items()}
            raise
        codes = report["exit_codes"] = sup.stop_all(order)
    finally:
        sup.kill_all()  # what a stop left behind: a service's own children, or all on ^C
    bad = {name: code for name, code in codes.items() if code != 0}
    if bad:
        msg = f"services did not exit 0 on their stop signal: {bad}"
        raise RehearsalFailed(msg)
    silent = [name for name in order if not said_stop(sup, name)]
    if silent:
        msg = f"{', '.join(silent)}: exited without saying in the log that the signal came"
        raise RehearsalFailed(msg)
    say("every service exited 0 on its stop signal, and said so in its log")
    return report


STOP_EVENTS = ('"event": "stop"', '"event": "stream.stop"', '"event": "serve.stop"')
"""The lines the lakehouse's long-running commands log when a stop signal comes."""


def said_stop(sup: Supervisor, name: str) -> bool:
    """Tell whether a long-running lakehouse service logged its stop signal (others: True)."""
    process = sup.processes.get(name)
    if process is None or process.one_shot or sup.project.argv(name)[:1] != ["lakehouse"]:
        return True
    text = process.log.read_text(errors="replace")
    return any(event in text for event in STOP_EVENTS)


def healthchecks(sup: Supervisor, order: list[str], say: Callable[[str], None]) -> list[str]:
    """Run every running service's own healthcheck once: all pass on a converged system."""
    passed = []
    for name in order:
        process = sup.processes.get(name)
        if process is None or process.one_shot or not sup.project.services[name].get("healthcheck"):
            continue
        if not sup.healthy(name):
            sup.fail(name, "its healthcheck fails on the converged system")
        passed.append(name)
    say(f"healthchecks pass: {', '.join(passed)}")
    return passed


def main(argv: list[str] | None = None) -> int:
    """Run the command line: one line on a failure, the report with --report."""
    parser = argparse.ArgumentParser(
        prog="python -m lakehouse.deploy.rehearse", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("compose_file", type=Path, help="e.g. compose/docker-compose.yml")
    parser.add_argument(
        "--env-file", type=Path, help="the secrets (default: new ones for .env.example's names)"
    )
    parser.add_argument(
        "--workdir", type=Path, help="where volumes and logs go (default: a temp folder)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the workdir (kept anyway on a failure)"
    )
    parser.add_argument(
        "--port-offset", type=int, help="added to every port (default: one with all ports free)"
    )
    parser.add_argument(
        "--timeout", type=float, default=900, help="seconds to start and converge (default 900)"
    )
    parser.add_argument("--report", type=Path, help="write what was seen as JSON")
    parser.add_argument("--debug", action="store_true", help="show a traceback on a failure")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="SERVICE=COMMAND",
        help="run another command for one service (e.g. a smaller seed: 'seed=seed --rows 3000')",
    )
    args = parser.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.override if "=" in item)
    if len(overrides) != len(args.override):
        parser.error("--override takes SERVICE=COMMAND")
    began = time.monotonic()

    def say(line: str) -> None:
        print(f"[{time.monotonic() - began:6.1f}s] {line}", flush=True)

    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="lakehouse-rehearsal-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)  # the postgres user (when we are root) walks into it; data stays 0700

    def stopped(signum: int, frame: object) -> None:
        # SIGTERM or a closed terminal: stop the services (`rehearse` does) before exiting.
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, stopped)
    ok = False
    try:
        example = args.compose_file.parent / ".env.example"
        env = read_env_file(args.env_file) if args.env_file else fresh_env(example)
        report = rehearse(
            args.compose_file,
            env=env,
            workdir=workdir,
            offset=args.port_offset,
            timeout=args.timeout,
            say=say,
            overrides=overrides,
        )
        ok = True
    except Exception as exc:
        if args.debug:
            raise
        known = isinstance(exc, RehearsalFailed | LakehouseError)
        say(f"rehearsal failed: {exc if known else described(exc)}")
        say(f"logs kept in {workdir / 'logs'}")
        report = {"failed": str(exc)}
    report["seconds"] = round(time.monotonic() - began, 1)
    if args.report:
        args.report.write_text(json.dumps(report, indent=2, default=str) + "\n")
    if ok and not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    if ok:
        say(f"rehearsal passed in {report['seconds']:.0f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
