"""Each compose service as a local process: its command, environment, volumes and ports.

A service's hostnames become 127.0.0.1 and its ports the file's (plus an offset, so that
a rehearsal never meets what already listens on a developer's 5432 or 8000); named
volumes become folders of the rehearsal, bind mounts copies of their folders (readable
by the Postgres user when we are root), and a path of the image that no volume covers
(a WORKDIR, the lakehouse's HOME for a service without that volume) a folder of the
service's own, as a container's writable layer would be. Images without a wheel are
played by stand-ins: the postgres image by the system's binaries (`postgres`), MinIO by
the S3 stand-in (`s3`), its `mc` client by `mc`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lakehouse.deploy import postgres
from lakehouse.deploy.compose import ComposeError, Project, as_list, seconds

HOSTS = ("127.0.0.1", "localhost", "0.0.0.0")  # noqa: S104 - matched, then bound to loopback


@dataclass
class Process:
    """A started service."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    stop_signal: signal.Signals
    grace: float
    one_shot: bool


class Supervisor:
    """Starts the services of `project` under `workdir` and stops them."""

    def __init__(
        self, project: Project, workdir: Path, offset: int, say: Callable[[str], None]
    ) -> None:
        self.project = project
        self.workdir = workdir
        self.offset = offset
        self.say = say
        self.bin = Path(sys.executable).parent
        self.processes: dict[str, Process] = {}
        self.seen: set[str] = set()
        """Services whose condition was met and said once."""
        self.ports = self._ports()
        self.postgres: dict[str, postgres.PostgresImage] = {}
        self.mc_dir = workdir / "bin"
        self.mc_dir.mkdir(parents=True, exist_ok=True)
        mc = self.mc_dir / "mc"
        mc.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m lakehouse.deploy.mc "$@"\n')
        mc.chmod(0o755)

    # -- the network ------------------------------------------------------------------
    def _ports(self) -> dict[str, set[int]]:
        """Return the ports each service listens on: published, or reached as `name:port`."""
        names = "|".join(re.escape(n) for n in self.project.services)
        pattern = re.compile(rf"(?<![\w.-])({names}):(\d+)\b")
        ports: dict[str, set[int]] = {
            n: set(self.project.published(n)) for n in self.project.services
        }
        reached = [
            service.get(key)
            for service in self.project.services.values()
            for key in ("environment", "command", "entrypoint", "healthcheck")
        ]
        for text in _strings(reached):
            for match in pattern.finditer(text):
                ports[match[1]].add(int(match[2]))
        return ports

    def port(self, name: str, port: int) -> int:
        """Return where the container port `port` of service `name` is reached."""
        if port not in self.ports[name]:
            msg = f"`{name}` does not listen on {port}; publish it or name it as {name}:{port}"
            raise ComposeError(msg)
        return port + self.offset

    def rewrite(self, text: str, own: str, *, token: bool = False) -> str:
        """Point a string of service `own` at 127.0.0.1 and the mapped ports.

        `name:port` of any service, `HOST:port` or `:port` of its own ports, and as a whole
        argument (`token`): a wildcard address, or one of its own ports. A service's name
        as an argument, and the ports of a service named so, are `_rewrite_argv`'s: a name
        is a hostname only after a host option.
        """
        mine = self.ports[own]

        def other(m: re.Match[str]) -> str:
            return f"127.0.0.1:{self.port(m[1], int(m[2]))}"

        names = "|".join(re.escape(n) for n in self.project.services)
        text = re.sub(rf"(?<![\w.-])({names}):(\d+)\b", other, text)

        def itself(m: re.Match[str]) -> str:
            port = int(m[2])
            if port not in mine:
                return m[0]
            host = "127.0.0.1" if m[1] else ""
            return f"{host}:{port + self.offset}"

        text = re.sub(r"(?<![\w.:-])(127\.0\.0\.1|localhost|0\.0\.0\.0)?:(\d+)\b", itself, text)
        if token:
            if text in HOSTS:
                return "127.0.0.1"
            if text.isdigit() and int(text) in mine:
                return str(int(text) + self.offset)
        return text

    def _rewrite_argv(self, name: str, argv: list[str]) -> list[str]:
        # A service's name as a whole argument is a hostname after a host option only
        # (`--scheduler-host luigid`); elsewhere it is a word (`seed` runs `lakehouse seed`).
        hosts = {
            arg
            for option, arg in itertools.pairwise(["", *argv])
            if arg in self.project.services and (option == "-h" or option.endswith("host"))
        }
        out = []
        for option, arg in itertools.pairwise(["", *argv]):
            new = self.rewrite(arg, name, token=True)
            if arg in hosts and (option == "-h" or option.endswith("host")):
                new = "127.0.0.1"
            if new == arg and arg.isdigit():  # a port of a service named beside it
                for other in hosts:
                    if int(arg) in self.ports[other]:
                        new = str(int(arg) + self.offset)
            out.append(self.path(name, new))
        return out

    # -- the file system --------------------------------------------------------------
    def mounts(self, name: str) -> dict[str, Path]:
        """Return container path -> local folder for the service's volumes."""
        out = {}
        for mount in self.project.mounts(name):
            if mount.named:
                local = self.workdir / "volumes" / mount.source
                local.mkdir(parents=True, exist_ok=True)
            else:
                local = self.workdir / "binds" / name / mount.target.strip("/")
                if not local.exists():
                    # A copy every service's user can read, as a bind mount is (whatever
                    # the umask of the checkout and of this process).
                    shutil.copytree(self.project.folder / mount.source, local)
                    for path in [local, *local.rglob("*")]:
                        mode = path.stat().st_mode
                        path.chmod(mode | (0o555 if path.is_dir() or mode & 0o100 else 0o444))
                    self.traversable(local)
            out[mount.target.rstrip("/")] = local
        return out

    def traversable(self, folder: Path) -> None:
        """Let any user walk from the workdir down to `folder` (not list or read it)."""
        for path in [folder, *folder.parents]:
            path.chmod(path.stat().st_mode | 0o711)
            if path == self.workdir:
                break

    def path(self, name: str, value: str) -> str:
        """Map a container path of service `name` to its local folder; other text as is."""
        if not value.startswith("/"):
            return value
        for target, local in self.mounts(name).items():
            if value == target or value.startswith(target + "/"):
                return str(local / value[len(target) :].lstrip("/"))
        image = self.project.image(name)
        if image is not None:
            own = [image.workdir, *(v for v in image.env.values() if v.startswith("/"))]
            for root in own:
                if value == root or value.startswith(root + "/"):
                    local = self.workdir / "containers" / name / value.lstrip("/")
                    local.mkdir(parents=True, exist_ok=True)
                    return str(local)
        return value

    # -- a service's process ------------------------------------------------------------
    def environment(self, name: str) -> dict[str, str]:
        """Return the service's environment: its image's, then its own, pointed locally."""
        image = self.project.image(name)
        home = self.workdir / "containers" / name / "home"
        home.mkdir(parents=True, exist_ok=True)
        env = {
            "PATH": f"{self.mc_dir}{os.pathsep}{self.bin}{os.pathsep}/usr/local/bin:/usr/bin:/bin",
            "HOME": str(home),
            "LANG": "C.UTF-8",
        }
        if image is not None:
            # The project image's user has its WORKDIR as its home (`useradd --home-dir`).
            env |= image.env | {"HOME": image.workdir}
        env |= self.project.environment(name)
        return {k: self.path(name, self.rewrite(v, name)) for k, v in env.items()}

    def image(self, name: str) -> str:
        """Return the service's image, or `build` for the project's own."""
        service = self.project.services[name]
        return "build" if "build" in service else str(service.get("image", ""))

    def start(self, name: str) -> None:
        """Start the service's command as its container would run it."""
        service = self.project.services[name]
        env = self.environment(name)
        argv = self._rewrite_argv(name, self.project.argv(name))
        image = self.image(name)
        log = self.workdir / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        owner: dict[str, Any] = {}
        stop = signal.Signals[str(service.get("stop_signal", "SIGTERM"))]
        built = self.project.image(name)
        cwd = Path(self.path(name, built.workdir)) if built is not None else self.workdir
        if image == "build":
            argv[0] = self._executable(argv[0])
        elif image.startswith("postgres:"):
            pg = self._postgres(name, env)
            argv = pg.server_argv(as_list(service.get("command")) or ["postgres"])
            owner = pg.as_owner()
            env = {"PATH": env["PATH"], "LANG": "C.UTF-8"}
            stop = signal.Signals[str(service.get("stop_signal", postgres.STOP_SIGNAL))]
        elif image.startswith("minio/minio"):
            options = as_list(service.get("command"))
            address = options[options.index("--address") + 1] if "--address" in options else ":9000"
            argv = [
                sys.executable,
                "-m",
                "lakehouse.deploy.s3",
                "--address",
                self.rewrite(address, name),
            ]
        elif image.startswith("minio/mc"):
            pass  # its own shell script, with the `mc` stand-in first on the PATH
        else:
            msg = f"`{name}`: the rehearsal has no stand-in for the image `{image}`"
            raise ComposeError(msg)
        with log.open("ab") as out:
            popen = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                user=owner.get("user"),
                group=owner.get("group"),
                extra_groups=[] if owner else None,
                preexec_fn=_die_with_parent,
            )
        one_shot = service.get("restart") == "no"
        grace = seconds(service.get("stop_grace_period"), 10.0)
        self.processes[name] = Process(name, popen, log, stop, grace, one_shot)
        self.say(f"{name}: started `{' '.join(_shown(argv))}` (pid {popen.pid})")

    def _executable(self, command: str) -> str:
        path = self.bin / command
        if not path.exists():
            msg = f"`{command}` is not installed beside this Python; install the project first"
            raise ComposeError(msg)
        return str(path)

    def _postgres(self, name: str, env: dict[str, str]) -> postgres.PostgresImage:
        mounts = self.mounts(name)
        data = next((p for t, p in mounts.items() if t.startswith("/var/lib/postgresql")), None)
        if data is None:
            data = self.workdir / "containers" / name / "data"
        scripts = mounts.get("/docker-entrypoint-initdb.d")
        (port,) = self.ports[name] or {5432}
        pg = postgres.PostgresImage(
            data / "pgdata",
            self.workdir / "run" / name,
            self.port(name, port),
            log=self.workdir / "logs" / f"{name}-init.log",
        )
        if pg.owner is not None:  # root: the server runs as `postgres`, which must get in
            pg.data.parent.mkdir(parents=True, exist_ok=True)
            pg.sockets.parent.mkdir(parents=True, exist_ok=True)
            self.traversable(pg.data.parent)
            self.traversable(pg.sockets.parent)
            entered = subprocess.run(["test", "-x", str(self.workdir)], user=pg.owner, check=False)
            if entered.returncode != 0:
                msg = f"the `postgres` user cannot enter {self.workdir}; choose another --workdir"
                raise ComposeError(msg)
        if pg.initialise(env, scripts):
            self.say(
                f"{name}: initialised as the image's entrypoint does (see logs/{name}-init.log)"
            )
        self.postgres[name] = pg
        return pg

    # -- health and exits ---------------------------------------------------------------
    def healthy(self, name: str) -> bool:
        """Run the service's healthcheck once; True when it passes."""
        check = self.project.services[name].get("healthcheck") or {}
        test = check.get("test")
        if not test:
            msg = f"`{name}` has no healthcheck; `service_healthy` on it would wait forever"
            raise ComposeError(msg)
        argv = ["CMD-SHELL", test] if isinstance(test, str) else as_list(test)  # as compose
        if argv[0] == "CMD-SHELL":
            argv = ["/bin/sh", "-c", " ".join(argv[1:])]
        elif argv[0] == "CMD":
            argv = argv[1:]
        argv = self._rewrite_argv(name, argv)
        env = self.environment(name)
        if argv[0] == "python":
            argv[0] = sys.executable
        elif argv[0] == "pg_isready":
            pg = self.postgres[name]
            argv[0] = str(pg.bin / "pg_isready")
            env["PGPORT"] = str(pg.port)
        elif argv[0] == "mc":  # `mc ready local` inside the MinIO container: itself
            port = min(self.ports[name])
            env["MC_HOST_local"] = f"http://127.0.0.1:{self.port(name, port)}"
        timeout = seconds(check.get("timeout"), 30.0)
        try:
            done = subprocess.run(argv, env=env, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0

    def wait_for(self, name: str, condition: str, deadline: float) -> None:
        """Wait until `condition` holds for `name` (started, healthy or completed)."""
        process = self.processes[name]
        check = self.project.services[name].get("healthcheck") or {}
        interval = min(1.0, seconds(check.get("interval"), 30.0))
        started = time.monotonic()
        while time.monotonic() < deadline:
            code = process.popen.poll()
            if condition == "service_completed_successfully":
                if code is not None:
                    if code != 0:
                        self.fail(name, f"exited {code}; a dependent needs it to succeed")
                    if name not in self.seen:
                        self.seen.add(name)
                        self.say(f"{name}: completed successfully")
                    return
            elif code is not None:
                self.fail(name, f"exited {code} while others wait for it")
            elif condition == "service_started" or self.healthy(name):
                if condition == "service_healthy" and name not in self.seen:
                    self.seen.add(name)
                    self.say(f"{name}: healthy ({time.monotonic() - started:.1f}s)")
                return
            time.sleep(interval)
        self.fail(name, f"not {condition.removeprefix('service_')} in time")

    def check_running(self) -> None:
        """Fail if a long-running service has exited (Docker would restart it: a failure)."""
        for process in self.processes.values():
            code = process.popen.poll()
            if not process.one_shot and code is not None:
                self.fail(process.name, f"exited {code} while the system should be running")

    def fail(self, name: str, why: str) -> None:
        """Raise with the last lines of the service's log."""
        process = self.processes.get(name)
        tail = ""
        if process is not None:
            lines = process.log.read_text(errors="replace").splitlines()[-15:]
            tail = "\n".join(f"    {line}" for line in lines)
        msg = f"{name}: {why}; last lines of logs/{name}.log:\n{tail}"
        raise RehearsalFailed(msg)

    def stop_all(self, order: list[str]) -> dict[str, int | None]:
        """Stop what runs, dependents first (as `docker compose stop`); return exit codes."""
        codes: dict[str, int | None] = {}
        for name in reversed(order):
            process = self.processes.get(name)
            if process is None:
                continue
            if process.popen.poll() is not None:
                codes[name] = process.popen.returncode
                continue
            began = time.monotonic()
            with contextlib.suppress(ProcessLookupError):  # it may have just exited
                os.kill(process.popen.pid, process.stop_signal)
            try:
                code: int | None = process.popen.wait(process.grace)
                self.say(
                    f"{name}: {process.stop_signal.name} -> exited {code} "
                    f"after {time.monotonic() - began:.1f}s"
                )
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.popen.pid, signal.SIGKILL)
                process.popen.wait()
                code = None
                self.say(f"{name}: still running {process.grace:.0f}s after the signal: killed")
            codes[name] = code
        return codes

    def kill_all(self) -> None:
        """Kill every process group left, leaders gone or not (a service's children too)."""
        for process in self.processes.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.popen.pid, signal.SIGKILL)
            if process.popen.poll() is None:
                process.popen.wait()


def _die_with_parent() -> None:
    """In the child, before exec: be killed when the rehearsal dies, however it dies."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGKILL)


class RehearsalFailed(Exception):
    """A service did not start, stay up, converge or stop as the compose file says."""


def _strings(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [s for item in node for s in _strings(item)]
    if isinstance(node, dict):
        return [s for value in node.values() for s in _strings(value)]
    return []


def _shown(argv: list[str]) -> list[str]:
    """Return an argument list for the log: a multi-line script as its first line."""
    return [a.splitlines()[0] + " ..." if "\n" in a else a for a in argv]
