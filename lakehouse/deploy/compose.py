"""A compose file read as data: services, environments, start order, health checks.

Read the way `docker compose` reads it (YAML anchors and `<<` merges, `.env`
interpolation, `depends_on` conditions) and, for services built from the project's
Dockerfile, with what the image adds (ENV, ENTRYPOINT, WORKDIR): the rehearsal and the
tests then work from what Docker would run, not from a copy of it.
"""

from __future__ import annotations

import functools
import json
import posixpath
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lakehouse.errors import UsageError

# Compose's interpolation: `$$` is a literal `$`; `${VAR}`, `${VAR:-default}`,
# `${VAR-default}`, `${VAR:?error}`, `${VAR?error}`, `${VAR:+other}`, `${VAR+other}`, `$VAR`.
_REFERENCE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class ComposeError(UsageError):
    """The compose file, its `.env` or its Dockerfile cannot be read as Docker would."""


def references(text: str) -> set[str]:
    """Return the variables a compose string refers to (not the `$$`-escaped ones)."""
    return {m["name"] or m["bare"] for m in _REFERENCE.finditer(text) if not m["escaped"]}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Substitute like docker compose does; an unset variable without a default fails."""

    def substitute(m: re.Match[str]) -> str:
        if m["escaped"]:
            return "$"
        name = m["name"] or m["bare"]
        value, op = env.get(name), m["op"] or ""
        if op.startswith(":") and value == "":
            value = None
        if op.endswith("+"):
            return m["arg"] if value is not None else ""
        if value is None:
            if not op.endswith("-"):
                msg = f"`{m[0]}` in the compose file: {name} is not set; add it to .env"
                raise ComposeError(msg)
            return m["arg"]
        return value

    return _REFERENCE.sub(substitute, text)


def interpolated(node: Any, env: dict[str, str]) -> Any:
    """Interpolate every string of a parsed YAML tree."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolated(item, env) for item in node]
    if isinstance(node, dict):
        return {key: interpolated(value, env) for key, value in node.items()}
    return node


def read_env_file(path: Path) -> dict[str, str]:
    """Read a `.env` file of `KEY=value` lines (comments and blank lines allowed)."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(\S*)", line)
        if not match:
            msg = f"{path.name} line {number} is not KEY=value; fix it"
            raise ComposeError(msg)
        values[match[1]] = match[2]
    return values


def as_list(command: Any) -> list[str]:
    """Return a command as an argument list (compose takes a string or a list)."""
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command or []]


def seconds(text: Any, default: float) -> float:
    """Parse a compose duration (`30s`, `1m30s`, `500ms`)."""
    if text is None:
        return default
    total = 0.0
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(text)):
        total += float(number) * units[unit]
    return total


@dataclass(frozen=True)
class Image:
    """What a Dockerfile gives its containers: environment, entrypoint, working folder."""

    env: dict[str, str]
    entrypoint: list[str]
    workdir: str
    user: str


def logical_lines(path: Path) -> list[str]:
    """Read a Dockerfile's instructions, one per line: continuations joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comments may sit between continuation lines, too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    if pending:
        msg = f"{path.name}: the file ends inside a continued line"
        raise ComposeError(msg)
    return logical


def read_dockerfile(path: Path) -> Image:
    """Read the ENV, ENTRYPOINT, WORKDIR and USER of a single-stage Dockerfile."""
    env: dict[str, str] = {}
    entrypoint: list[str] = []
    workdir, user = "/", "root"
    for line in logical_lines(path):
        keyword, _, args = line.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "ENV":
            for token in shlex.split(args):
                key, sep, value = token.partition("=")
                if not sep:
                    msg = f"{path.name}: ENV {args}: write ENV KEY=value"
                    raise ComposeError(msg)
                env[key] = value
        elif keyword == "ENTRYPOINT":
            entrypoint = json.loads(args)
        elif keyword == "WORKDIR":
            workdir = posixpath.normpath(posixpath.join(workdir, args))
        elif keyword == "USER":
            user = args.split(":")[0]
    return Image(env, entrypoint, workdir, user)


@dataclass(frozen=True)
class Mount:
    """A volume of a service: a named volume or a folder beside the compose file."""

    source: str
    target: str
    named: bool


class Project:
    """A compose file with its variables substituted, and its services' images read."""

    def __init__(self, path: Path, env: dict[str, str]) -> None:
        self.path = path
        self.folder = path.parent
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            msg = f"cannot read {path}: {exc}"
            raise ComposeError(msg) from None
        if not isinstance(raw, dict) or not isinstance(raw.get("services"), dict):
            msg = f"{path} has no `services:`; give a compose file"
            raise ComposeError(msg)
        self.raw = raw
        self.doc: dict[str, Any] = interpolated(raw, env)
        self.services: dict[str, dict[str, Any]] = self.doc["services"]

    def environment(self, name: str) -> dict[str, str]:
        """Return the service's own `environment:` (without its image's ENV)."""
        env = self.services[name].get("environment", {})
        if isinstance(env, list):
            env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
        return {key: "" if value is None else str(value) for key, value in env.items()}

    @functools.cache  # noqa: B019 - a project lives as long as its rehearsal
    def image(self, name: str) -> Image | None:
        """Return what the service's Dockerfile gives it; None for a pulled image."""
        build = self.services[name].get("build")
        if build is None:
            return None
        context = self.folder / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile")
        return read_dockerfile(context / (dockerfile or "Dockerfile"))

    def argv(self, name: str) -> list[str]:
        """Return what the container runs: its entrypoint, then its command."""
        service, image = self.services[name], self.image(name)
        if "entrypoint" in service:
            entrypoint = as_list(service["entrypoint"])
        else:
            entrypoint = image.entrypoint if image is not None else []
        return [*entrypoint, *as_list(service.get("command"))]

    def depends_on(self, name: str) -> dict[str, str]:
        """Return dependency -> condition (`service_started` for a plain list)."""
        deps = self.services[name].get("depends_on", {})
        if isinstance(deps, list):
            return dict.fromkeys(deps, "service_started")
        return {dep: spec.get("condition", "service_started") for dep, spec in deps.items()}

    def start_order(self) -> list[str]:
        """Return the services so that each comes after what it depends on."""
        order: list[str] = []
        visiting: set[str] = set()

        def visit(name: str) -> None:
            if name in order:
                return
            if name in visiting:
                msg = f"depends_on has a cycle through `{name}`; break it"
                raise ComposeError(msg)
            visiting.add(name)
            for dep in self.depends_on(name):
                if dep not in self.services:
                    msg = f"`{name}` depends on `{dep}`, which is not a service"
                    raise ComposeError(msg)
                visit(dep)
            visiting.discard(name)
            order.append(name)

        for name in self.services:
            visit(name)
        return order

    def mounts(self, name: str) -> list[Mount]:
        """Return the service's volumes, short or long syntax."""
        out = []
        for volume in self.services[name].get("volumes", []):
            if isinstance(volume, str):
                source, target = volume.split(":")[:2]
            else:
                source, target = volume.get("source", ""), volume["target"]
            named = bool(source) and not source.startswith((".", "/", "~"))
            out.append(Mount(source, target, named))
        return out

    def published(self, name: str) -> list[int]:
        """Return the container ports the service publishes."""
        ports = []
        for port in self.services[name].get("ports", []):
            if isinstance(port, dict):
                ports.append(int(port["target"]))
            else:
                ports.append(int(str(port).partition("/")[0].split(":")[-1]))
        return ports
