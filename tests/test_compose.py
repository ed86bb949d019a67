"""The compose demo without a Docker engine: schema, start order, commands, settings, roles.

No test here starts a container. The compose file is checked against the Compose
Specification's JSON schema (shipped in the `check-jsonschema` wheel) and for what the
schema cannot see; every `lakehouse` command line against the CLI's own parser; every
environment against `Settings.from_env`; the Dockerfile against the README's install
command and pyproject.toml; and `postgres/10-roles.sh` runs against a real Postgres,
after which each service does its job with its own role, and no more.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import itertools
import json
import os
import posixpath
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
import yaml
from jsonschema.validators import validator_for
from packaging.specifiers import SpecifierSet
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from lakehouse.cli import build_parser
from lakehouse.deploy.compose import as_list, interpolated, logical_lines, references
from lakehouse.settings import PREFIX, Settings
from lakehouse.source.embedded import find_bin_dir, free_port
from lakehouse.source.extract import fence, snapshot
from tests.conftest import embedded_cluster, wait_for_port

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose"
COMPOSE_FILE = COMPOSE / "docker-compose.yml"
DOCKERFILE = COMPOSE / "Dockerfile"

# ---------------------------------------------------------------- reading the files


@functools.cache
def raw_compose() -> dict[str, Any]:
    """The compose file as YAML gives it (anchors and `<<` merges resolved)."""
    doc = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(doc, dict)
    return doc


@functools.cache
def env_example() -> dict[str, str]:
    """`.env.example`, the variables docker compose substitutes (`KEY=value` lines)."""
    values: dict[str, str] = {}
    for number, line in enumerate((COMPOSE / ".env.example").read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(\S*)", line)
        assert match, f".env.example line {number} is not KEY=value: {line!r}"
        assert match[1] not in values, f"{match[1]} is defined twice in .env.example"
        values[match[1]] = match[2]
    return values


@functools.cache
def compose() -> dict[str, Any]:
    """The compose file as docker compose sees it with `.env.example` copied to `.env`."""
    return interpolated(raw_compose(), env_example())


def patterns(path: Path) -> list[str]:
    """The lines of an ignore file, without comments and blank lines."""
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def image_services() -> list[str]:
    """Services running the project's image (built from compose/Dockerfile)."""
    names = []
    for name, service in services().items():
        build = service.get("build")
        if build is None:
            continue
        context = COMPOSE / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile")
        assert (context / (dockerfile or "Dockerfile")).resolve() == DOCKERFILE, name
        names.append(name)
    return names


def cli_services() -> list[str]:
    """Services whose command is `lakehouse <command>` (the image's ENTRYPOINT)."""
    return [name for name in image_services() if "entrypoint" not in services()[name]]


def other_entrypoint_services() -> list[str]:
    return [name for name in image_services() if "entrypoint" in services()[name]]


def depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):
        return {name: {"condition": "service_started"} for name in deps}
    return deps


def closure(name: str) -> set[str]:
    """Every service that `name` waits for, directly or through others."""
    seen: set[str] = set()
    todo = list(depends_on(services()[name]))
    while todo:
        dep = todo.pop()
        if dep not in seen:
            seen.add(dep)
            todo += list(depends_on(services()[dep]))
    return seen


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of a service's volumes, short or long syntax."""
    out = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume.get("source", ""), volume["target"]
        out.append((source, target))
    return out


def is_named_volume(source: str) -> bool:
    return bool(source) and not source.startswith((".", "/", "~"))


# ------------------------------------------------------------------- the Dockerfile


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    workdir: str
    """WORKDIR in force for this instruction (absolute)."""


@functools.cache
def dockerfile() -> tuple[Instruction, ...]:
    workdir = "/"
    out = []
    for line in logical_lines(DOCKERFILE):
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "WORKDIR":
            workdir = posixpath.normpath(posixpath.join(workdir, args.strip()))
        out.append(Instruction(keyword, args.strip(), workdir))
    return tuple(out)


def instructions(keyword: str) -> list[Instruction]:
    return [i for i in dockerfile() if i.keyword == keyword]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in instructions("ENV"):
        for token in shlex.split(instruction.args):
            key, sep, value = token.partition("=")
            assert sep, f"ENV {instruction.args}: write ENV KEY=value"
            env[key] = value
    return env


def exec_form(instruction: Instruction) -> list[str]:
    value = json.loads(instruction.args)
    assert isinstance(value, list), f"{instruction.keyword} {instruction.args}: use exec form"
    return value


def shell_commands(text: str) -> list[list[str]]:
    """Split a RUN line into its commands (at `&&`, `||` and `;`)."""
    commands: list[list[str]] = [[]]
    lexer = shlex.shlex(text, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    for token in lexer:
        if token in ("&&", "||", ";"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def image_user() -> str:
    users = instructions("USER")
    assert users, "the Dockerfile sets no USER: the services would run as root"
    return users[-1].args.split(":")[0]


def owned_dirs(user: str) -> set[str]:
    """Folders the Dockerfile creates owned by `user` (`install -d -o USER ...`)."""
    dirs: set[str] = set()
    for run in instructions("RUN"):
        for command in shell_commands(run.args):
            if command[0] != "install" or "-d" not in command or "-o" not in command:
                continue
            if command[command.index("-o") + 1] == user:
                dirs |= {token for token in command if token.startswith("/")}
    return dirs


# ---------------------------------------------------------------- listening ports


def cli_args(name: str) -> Any:
    return build_parser().parse_args(as_list(services()[name].get("command")))


_LUIGID_PROBE = """
import json, sys
from importlib.metadata import entry_points
import luigi.configuration, luigi.server
def run(**kwargs):  # instead of serving: show what it would serve
    kwargs["state_path"] = luigi.configuration.get_config().get("scheduler", "state_path", None)
    print(json.dumps(kwargs))
luigi.server.run = run
sys.argv = sys.argv[1:]  # as the console script sees them: its name, then its options
(script,) = entry_points(group="console_scripts", name=sys.argv[0])
script.load()(sys.argv[1:])
"""


def console_script(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run an installed console script's entry point (luigid's serving stubbed out)."""
    return subprocess.run(
        [sys.executable, "-c", _LUIGID_PROBE, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )


@functools.cache
def luigid_options(name: str) -> dict[str, Any]:
    service = services()[name]
    argv = [*as_list(service["entrypoint"]), *as_list(service.get("command"))]
    assert argv[0] == "luigid", f"{name}: the test knows luigid only; teach it {argv[0]}"
    done = console_script(argv)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "0.0.0.0", int(port)


def listens_on(name: str) -> dict[int, str]:
    """Return port -> bind address of what the service's process listens on."""
    service = services()[name]
    if name in cli_services():
        args = cli_args(name)
        return {args.port: args.host} if args.command == "serve" else {}
    if name in other_entrypoint_services():
        options = luigid_options(name)
        return {int(options["api_port"]): options["address"] or "0.0.0.0"}
    image = service.get("image", "")
    command = as_list(service.get("command"))
    if image.startswith("postgres:"):
        options = [value for flag, value in itertools.pairwise(command) if flag == "-c"]
        port = dict(o.split("=", 1) for o in options).get("port", "5432")
        return {int(port): "0.0.0.0"}
    if image.startswith("minio/minio:"):
        options = dict(itertools.pairwise(command))
        api = _address(options.get("--address", ":9000"))
        console = _address(options["--console-address"])
        return {api[1]: api[0], console[1]: console[0]}
    assert "ports" not in service, f"{name} publishes ports; teach listens_on what it serves"
    return {}


def published(service: dict[str, Any]) -> list[tuple[str, int, int, str]]:
    """(host ip, host port, container port, protocol) of each published port."""
    out = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            out.append(
                (
                    port.get("host_ip", ""),
                    int(port["published"]),
                    int(port["target"]),
                    port.get("protocol", "tcp"),
                )
            )
            continue
        spec, _, protocol = str(port).partition("/")
        parts = spec.split(":")
        assert len(parts) in (2, 3), f"`{port}`: publish HOST:CONTAINER explicitly"
        ip = parts[0] if len(parts) == 3 else ""
        out.append((ip, int(parts[-2]), int(parts[-1]), protocol or "tcp"))
    return out


# ============================================================ the compose file's shape


@functools.cache
def compose_validator() -> Any:
    from check_jsonschema.builtin_schemas import get_builtin_schema

    schema = get_builtin_schema("vendor.compose-spec")
    assert schema["title"] == "Compose Specification"
    cls = validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def schema_errors(doc: dict[str, Any]) -> list[str]:
    errors = compose_validator().iter_errors(doc)
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_compose_file_follows_the_compose_specification() -> None:
    assert schema_errors(compose()) == []


@pytest.mark.parametrize(
    ("mistake", "expected"),
    [
        (lambda d: d["services"]["api"].update(restarts="always"), "services/api"),
        (
            lambda d: d["services"]["pipeline"]["depends_on"]["seed"].update(condition="done"),
            "services/pipeline/depends_on/seed/condition",
        ),
        (lambda d: d["services"]["api"].update(ports={"8000": 8000}), "services/api/ports"),
        (
            lambda d: d["services"]["api"]["healthcheck"].update(intervl="5s"),
            "services/api/healthcheck",
        ),
        (lambda d: d["volumes"].update({"minio-data": {"drivr": "local"}}), "volumes/minio-data"),
    ],
    ids=["unknown-key", "bad-condition", "ports-as-mapping", "healthcheck-typo", "bad-volume"],
)
def test_the_schema_check_catches_mistakes(mistake: Any, expected: str) -> None:
    doc = copy.deepcopy(compose())
    mistake(doc)
    assert schema_errors(doc)
    # oneOf/anyOf report at the parent; the sub-errors name the exact place.
    paths: set[str] = set()
    todo = list(compose_validator().iter_errors(doc))
    while todo:
        error = todo.pop()
        paths.add("/".join(map(str, error.absolute_path)))
        todo += error.context or []
    assert expected in paths, sorted(paths)


def test_start_order_is_possible() -> None:
    for name, service in services().items():
        for dep, spec in depends_on(service).items():
            assert dep in services(), f"{name} depends on `{dep}`, which is no service"
            assert dep not in closure(dep), f"{dep} waits for itself (a cycle)"
            condition = spec.get("condition", "service_started")
            target = services()[dep]
            if condition == "service_completed_successfully":
                assert target.get("restart", "no") == "no", (
                    f"{name} waits for {dep} to complete, but {dep} restarts "
                    f'({target.get("restart")}): a one-shot needs restart: "no"'
                )
            elif condition == "service_healthy":
                check = target.get("healthcheck", {})
                assert check.get("test") and not check.get("disable"), (
                    f"{name} waits for {dep} to be healthy, but {dep} has no healthcheck"
                )
            else:
                assert condition == "service_started", f"{name}: condition `{condition}`"


def test_postgres_health_waits_for_the_real_server() -> None:
    # While the image runs its init scripts, its temporary server listens on the Unix
    # socket only: a probe over the socket would call it healthy before the roles exist.
    test = as_list(services()["postgres"]["healthcheck"]["test"])
    assert test[0] == "CMD" and test[1] == "pg_isready"
    assert test[test.index("-h") + 1] == "127.0.0.1"


def test_services_wait_for_the_hosts_they_reach() -> None:
    names = set(services())
    for name, service in services().items():
        reached: set[tuple[str, int]] = set()
        for text in strings({k: v for k, v in service.items() if k != "healthcheck"}):
            for url in re.findall(r"[a-z][a-z0-9+.-]*://[^\s\"']+", text):
                parts = urlsplit(url)
                if parts.scheme != "s3":  # s3://bucket/prefix names no host
                    default = {"postgresql": 5432, "http": 80, "https": 443}[parts.scheme]
                    reached.add((parts.hostname, parts.port or default))
        if name in cli_services() and cli_args(name).command == "run":
            args = cli_args(name)
            if args.scheduler_host:
                reached.add((args.scheduler_host, args.scheduler_port))
        assert reached or name in ("postgres", "minio", "luigid"), f"{name} reaches nothing?"
        for host, port in sorted(reached):
            assert host in names, f"{name} reaches `{host}`, which is no service"
            assert host in closure(name), f"{name} reaches {host} but does not wait for it"
            assert port in listens_on(host), f"{name} reaches {host}:{port}; it listens on " + str(
                sorted(listens_on(host))
            )


def test_one_shot_services_do_not_restart() -> None:
    one_shots = {
        dep
        for service in services().values()
        for dep, spec in depends_on(service).items()
        if spec.get("condition") == "service_completed_successfully"
    }
    assert one_shots == {"seed", "minio-init"}
    for name, service in services().items():
        expected = "no" if name in one_shots else "unless-stopped"
        assert service.get("restart") == expected, name


def test_named_volumes_are_declared_and_used() -> None:
    declared = set(compose().get("volumes") or {})
    used: set[str] = set()
    for name, service in services().items():
        for source, target in mounts(service):
            assert target.startswith("/"), f"{name}: mount target `{target}` is not absolute"
            if is_named_volume(source):
                assert source in declared, f"{name} mounts volume `{source}`, not declared"
                used.add(source)
            else:
                assert (COMPOSE / source).exists(), f"{name} bind-mounts `{source}`: missing"
    assert used == declared, f"declared but never mounted: {sorted(declared - used)}"


def test_volumes_of_the_image_are_writable_by_its_user() -> None:
    # Docker copies the owner of the image's folder into a new named volume; a folder the
    # image does not create would be root's, and the non-root services could not write it.
    writable = owned_dirs(image_user())
    for name in image_services():
        for source, target in mounts(services()[name]):
            if is_named_volume(source):
                assert target in writable, f"{name}: {target} is not created for the user"


# ======================================================= variables and secrets


def test_every_variable_comes_from_env_example() -> None:
    referenced = set().union(*(references(s) for s in strings(raw_compose())))
    assert referenced - set(env_example()) == set(), "referenced but not in .env.example"
    assert set(env_example()) - referenced == set(), "in .env.example but never used"


def test_container_variables_are_set_in_the_container() -> None:
    # `$$VAR` reaches the container's shell as `$VAR`: its environment, or the script
    # itself (`VAR=...`), must define it.
    for name, service in services().items():
        for key in ("command", "entrypoint", "healthcheck"):
            for text in strings(raw_compose()["services"][name].get(key)):
                known = set(environment(service)) | set(re.findall(r"(?m)^\s*(\w+)=", text))
                for var in re.findall(r"\$\$\{?([A-Za-z_][A-Za-z0-9_]*)", text):
                    assert var in known, f"{name} uses $${var} but does not set {var}"


def test_env_example_holds_placeholders_that_work() -> None:
    for key, value in env_example().items():
        # Postgres passwords go into postgresql:// URLs unescaped.
        assert re.fullmatch(r"[A-Za-z0-9_-]+", value), f"{key}={value}: letters, digits, - _"
        if re.search(r"PASSWORD|SECRET", key):
            assert value.startswith("change-me"), f"{key}: a placeholder, not a real secret"
    # MinIO refuses shorter credentials.
    for key in ("MINIO_ROOT_PASSWORD", "LAKEHOUSE_S3_SECRET_ACCESS_KEY"):
        assert len(env_example()[key]) >= 8, key
    assert ".env" in patterns(COMPOSE / ".gitignore"), (
        "compose/.env (the real secrets) must be git-ignored"
    )


_SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|PRIVATE|_KEY(_|$)")
_REQUIRED_VARIABLE = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(:?\?[^}]*)?\}")


def test_secrets_come_only_from_env() -> None:
    raw = raw_compose()["services"]
    for name, service in raw.items():
        for key, value in environment(service).items():
            if _SECRET_NAME.search(key):
                # No literal and no `:-default`: a missing .env must fail, not fall back.
                assert _REQUIRED_VARIABLE.fullmatch(value), f"{name}: {key}={value}"
        for text in strings(service):
            for password in re.findall(r"://[^:/@\s]+:(\$\{[^}]*\}|[^@\s]*)@", text):
                assert _REQUIRED_VARIABLE.fullmatch(password), f"{name}: password in a URL"
    secrets = [v for k, v in env_example().items() if re.search(r"PASSWORD|SECRET", k)]
    script = COMPOSE / "postgres" / "10-roles.sh"
    for path in (COMPOSE_FILE, DOCKERFILE, COMPOSE / "README.md", script):
        text = path.read_text()
        leaked = [s for s in secrets if s in text]
        assert not leaked, f"{path.name} holds the value of a secret from .env.example"
    # The roles script takes every password from psql variables, never a literal.
    assert not re.search(r"PASSWORD\s+'", script.read_text())


_FAKE_MC = """#!/bin/sh
echo "$*" >> "$MC_LOG"
if [ "$1 $2 $3" = "admin policy create" ]; then cp "$6" "$MC_LOG.policy"; fi
if [ "$1 $2 $3" = "admin user info" ]; then cat "$MC_LOG.info" 2>/dev/null; fi
exit 0
"""


def test_minio_init_limits_the_lakehouse_user_to_its_bucket(tmp_path: Path) -> None:
    service = services()["minio-init"]
    entrypoint, (script,) = as_list(service["entrypoint"]), as_list(service["command"])
    fake = tmp_path / "bin" / "mc"
    fake.parent.mkdir()
    fake.write_text(_FAKE_MC)
    fake.chmod(0o755)
    log = tmp_path / "mc.log"
    env = environment(service)

    def run_init() -> list[str]:
        log.unlink(missing_ok=True)
        done = subprocess.run(
            [*entrypoint, script],
            env={**env, "PATH": f"{fake.parent}:/usr/bin:/bin", "MC_LOG": str(log)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return log.read_text().splitlines()

    calls = run_init()
    key, secret = env["LAKEHOUSE_S3_ACCESS_KEY_ID"], env["LAKEHOUSE_S3_SECRET_ACCESS_KEY"]
    bucket = urlsplit(service_settings_env("pipeline")["LAKEHOUSE_STORAGE_URI"]).netloc
    root = f"{env['MINIO_ROOT_USER']} {env['MINIO_ROOT_PASSWORD']}"
    assert calls[0] == f"alias set local http://minio:9000 {root}"
    assert f"mb --ignore-existing local/{bucket}" in calls
    assert f"admin user add local {key} {secret}" in calls
    assert calls[-1] == f"admin policy attach local lakehouse-bucket --user {key}"
    policy = json.loads(Path(f"{log}.policy").read_text())
    resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
    assert resources == {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}
    assert all(statement["Effect"] == "Allow" for statement in policy["Statement"])
    assert_policy_enforced(policy, bucket)
    # A later `up` on the same volume: the policy is attached already (attach would fail).
    Path(f"{log}.info").write_text(f"AccessKey: {key}\nPolicyName: lakehouse-bucket\n")
    assert not any(call.startswith("admin policy attach") for call in run_init())


def assert_policy_enforced(policy: dict[str, Any], bucket: str) -> None:
    """A user with only `policy` reads and writes `bucket` and is denied another, on an S3
    server that enforces IAM (moto with auth on, in a process of its own: the switch is
    process-wide, and the session's S3 server runs without it)."""
    import io

    import boto3
    import requests
    from minio import Minio
    from minio.error import S3Error

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        url = f"http://127.0.0.1:{port}"
        admin = {"endpoint_url": url, "region_name": "us-east-1"}
        admin |= {"aws_access_key_id": "admin", "aws_secret_access_key": "admin"}
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="lakehouse")
        key = iam.create_access_key(UserName="lakehouse")["AccessKey"]
        document = json.dumps(policy)
        arn = iam.create_policy(PolicyName="bucket", PolicyDocument=document)["Policy"]["Arn"]
        iam.attach_user_policy(UserName="lakehouse", PolicyArn=arn)
        for name in (bucket, "another-bucket"):
            boto3.client("s3", **admin).create_bucket(Bucket=name)
        requests.post(f"{url}/moto-api/reset-auth", data=b"0", timeout=30).raise_for_status()
        user = Minio(
            f"127.0.0.1:{port}",
            access_key=key["AccessKeyId"],
            secret_key=key["SecretAccessKey"],
            secure=False,
            region="us-east-1",
        )
        user.put_object(bucket, "bronze/x", io.BytesIO(b"x"), 1)
        assert [o.object_name for o in user.list_objects(bucket, recursive=True)] == ["bronze/x"]
        assert user.get_object(bucket, "bronze/x").read() == b"x"
        user.remove_object(bucket, "bronze/x")
        for denied in (
            lambda: user.put_object("another-bucket", "x", io.BytesIO(b"x"), 1),
            lambda: list(user.list_objects("another-bucket")),
            lambda: user.make_bucket("a-third-bucket"),
        ):
            with pytest.raises(S3Error, match="AccessDenied"):
                denied()
    finally:
        server.terminate()
        server.wait(timeout=30)


# ======================================================= commands and settings


@pytest.mark.parametrize("name", cli_services())
def test_lakehouse_command_parses(name: str) -> None:
    argv = as_list(services()[name].get("command"))
    args = build_parser().parse_args(argv)  # raises UsageError on a bad option
    assert args.command == argv[0]


@pytest.mark.parametrize("name", cli_services())
def test_lakehouse_command_exists(name: str) -> None:
    command = as_list(services()[name].get("command"))[0]
    done = subprocess.run(
        [sys.executable, "-m", "lakehouse.cli", command, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: lakehouse {command}"), done.stdout


def test_long_running_commands_do_what_the_design_says() -> None:
    pipeline, stream = cli_args("pipeline"), cli_args("stream")
    assert pipeline.command == "run" and pipeline.every == 300 and not pipeline.no_ml
    assert pipeline.scheduler_host == "luigid"
    assert stream.command == "stream" and stream.action == "run"
    assert stream.setup and stream.promote
    simulator = cli_args("simulator")
    assert simulator.rate == 20 and simulator.duration is None and simulator.changes is None
    assert cli_args("maintain").every == 3600
    assert cli_args("seed").command == "seed" and not cli_args("seed").reset


@pytest.mark.parametrize("name", other_entrypoint_services())
def test_other_entrypoint_exists_and_takes_its_options(name: str) -> None:
    service = services()[name]
    script = as_list(service["entrypoint"])[0]
    done = console_script([script, "--help"])
    assert done.returncode == 0 and done.stdout.startswith(f"usage: {script}"), done.stderr
    options = luigid_options(name)
    # The scheduler's state (task history) survives a restart: it sits on a volume.
    state_dir = posixpath.dirname(options["state_path"])
    assert state_dir in {target for source, target in mounts(service) if is_named_volume(source)}


def service_settings_env(name: str) -> dict[str, str]:
    """The LAKEHOUSE_* environment of a lakehouse container: the image's, then the service's."""
    env = {k: v for k, v in image_env().items() if k.startswith(PREFIX)}
    env |= {k: v for k, v in environment(services()[name]).items() if k.startswith(PREFIX)}
    return env


KNOWN_SETTINGS = {PREFIX + f.name.upper() for f in fields(Settings)}


def test_every_lakehouse_variable_is_a_setting() -> None:
    for name, service in services().items():
        unknown = {k for k in environment(service) if k.startswith(PREFIX)} - KNOWN_SETTINGS
        assert unknown == set(), f"{name} sets variables no setting reads"
    assert {k for k in image_env() if k.startswith(PREFIX)} <= KNOWN_SETTINGS
    assert {k for k in env_example() if k.startswith(PREFIX)} <= KNOWN_SETTINGS


TABLE_COMMANDS = {"run", "stream", "maintain", "serve"}
"""Commands that read or write the Delta tables; `seed` and `simulate` touch Postgres only."""


@pytest.mark.parametrize("name", cli_services())
def test_settings_accept_the_service_environment(name: str) -> None:
    env = service_settings_env(name)
    settings = Settings.from_env(env)  # raises ConfigError naming a bad variable
    assert settings.log_format == "json"
    volumes = {target for source, target in mounts(services()[name]) if is_named_volume(source)}
    assert str(settings.home) in volumes, f"{name}: LAKEHOUSE_HOME is not on a volume"
    if cli_args(name).command in TABLE_COMMANDS:
        assert settings.is_s3, f"{name}: its tables would be on the container's disk"
        assert urlsplit(settings.warehouse).netloc == "lakehouse"  # minio-init's bucket
    else:
        assert not settings.s3_secret_access_key, f"{name} needs no S3 secret"
    if settings.feast_online_store == "postgres":
        assert settings.feast_pg_dsn, f"{name}: Feast's online store would use the source role"


@pytest.mark.parametrize("name", other_entrypoint_services())
def test_other_entrypoints_get_no_lakehouse_settings(name: str) -> None:
    assert not {k for k in environment(services()[name]) if k.startswith(PREFIX)}


def test_ports_are_published_once_to_what_listens() -> None:
    taken: dict[tuple[int, str], str] = {}
    for name, service in services().items():
        listening = listens_on(name)
        for ip, host_port, container_port, protocol in published(service):
            assert (host_port, protocol) not in taken, (
                f"{name} and {taken[(host_port, protocol)]} both publish {host_port}"
            )
            taken[(host_port, protocol)] = name
            assert ip == "127.0.0.1", f"{name}: publish on the loopback only ({ip})"
            assert container_port in listening, (
                f"{name} publishes {container_port}, but listens on {sorted(listening)}"
            )
            assert listening[container_port] == "0.0.0.0", (
                f"{name} listens on {listening[container_port]}:{container_port} only; "
                "a published port needs 0.0.0.0 inside the container"
            )
        for text in strings(service.get("healthcheck", {})):
            for port in re.findall(r"//(?:127\.0\.0\.1|localhost):(\d+)", text):
                assert int(port) in listening, f"{name}'s healthcheck probes {port}"
    guide = (COMPOSE / "README.md").read_text()
    for port, _ in taken:
        assert f"http://localhost:{port}" in guide, f"compose/README.md: where is {port}?"


# ================================================================ the Dockerfile


def test_dockerfile_installs_as_the_readme_does() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"^```[^\n]*\n(.*?)^```", readme, re.MULTILINE | re.DOTALL)
    assert block, "README.md has no fenced block"
    first = block[1].splitlines()[0]
    assert first == "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/lakehouse demo"
    readme_targets = re.findall(r"pip install (\S+)", first)

    runs = [r for r in instructions("RUN") if "pip install" in r.args]
    assert len(runs) == 1, "one pip install, the README's"
    (install,) = [c for c in shell_commands(runs[0].args) if "install" in c and "pip" in c[:3]]
    targets = [t for t in install[install.index("install") + 1 :] if not t.startswith("-")]
    assert targets == readme_targets == ["."], "no extras, no other requirements"

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert instructions("FROM")[0].args == "python:3.12-slim"
    assert SpecifierSet(pyproject["project"]["requires-python"]).contains("3.12")
    assert exec_form(instructions("ENTRYPOINT")[-1]) == ["lakehouse"]
    assert "lakehouse" in pyproject["project"]["scripts"]
    assert first.endswith(".venv/bin/lakehouse demo")


def installed_packages(pyproject: dict[str, Any]) -> set[str]:
    """Top-level packages `pip install .` installs, as setuptools finds them."""
    tool = pyproject["tool"]["setuptools"]
    if isinstance(tool.get("packages"), list):
        return {p.split(".")[0] for p in tool["packages"]}
    find = tool["packages"]["find"]
    include, exclude = find.get("include", ["*"]), find.get("exclude", [])

    def wanted(dotted: str) -> bool:
        return any(fnmatch.fnmatchcase(dotted, p) for p in include) and not any(
            fnmatch.fnmatchcase(dotted, p) for p in exclude
        )

    found = set()
    # Like setuptools: from the top, descend into packages (folders with __init__.py) only.
    todo = [p for p in ROOT.iterdir() if (p / "__init__.py").is_file()]
    while todo:
        folder = todo.pop()
        dotted = ".".join(folder.relative_to(ROOT).parts)
        if wanted(dotted):
            found.add(dotted.split(".")[0])
        todo += [p for p in folder.iterdir() if "." not in p.name and (p / "__init__.py").is_file()]
    return found


def test_dockerfile_copies_everything_the_install_needs() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    (install,) = [r for r in instructions("RUN") if "pip install" in r.args]
    copied: dict[str, str] = {}  # source -> where it lands in the image
    for instruction in instructions("COPY"):
        tokens = [t for t in shlex.split(instruction.args) if not t.startswith("--")]
        *sources, dest = tokens
        into = dest.endswith("/") or len(sources) > 1
        dest = posixpath.normpath(posixpath.join(instruction.workdir, dest))
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the project"
            # A folder's contents land in dest; a file lands in dest, or inside it.
            folder = (ROOT / source).is_dir()
            copied[source] = posixpath.join(dest, source) if into and not folder else dest
    needed = {"pyproject.toml", pyproject["project"]["readme"]}
    packages = installed_packages(pyproject)
    assert {"lakehouse", "tasks", "stream", "feature_repo"} <= packages
    needed |= packages | set(pyproject["tool"]["setuptools"].get("package-data", {}))
    for path in sorted(needed):
        target = posixpath.join(install.workdir, path)
        assert copied.get(path) == target, f"{path} is not copied to {target}"
    assert set(copied) == needed, f"copied but not needed: {sorted(set(copied) - needed)}"
    # BuildKit sends only what compose/Dockerfile.dockerignore lets through.
    ignore = patterns(COMPOSE / "Dockerfile.dockerignore")
    assert ignore[0] == "*", "the build context starts empty"
    assert {p[1:] for p in ignore if p.startswith("!")} == needed


def test_image_runs_as_a_user_not_root() -> None:
    user = image_user()
    assert user not in ("root", "0")
    created = [c for r in instructions("RUN") for c in shell_commands(r.args) if c[0] == "useradd"]
    assert created and created[0][-1] == user
    assert created[0][created[0].index("--uid") + 1] != "0"
    assert posixpath.normpath(image_env()["LAKEHOUSE_HOME"]) in owned_dirs(user)


# ============================================================ the Postgres roles


def local_env(name: str, port: int, tmp_path: Path) -> dict[str, str]:
    """The service's settings, pointed at the test cluster and at local Delta tables."""
    env = {k: v for k, v in service_settings_env(name).items() if "_S3_" not in k}
    env |= {
        "LAKEHOUSE_HOME": str(tmp_path / "home"),
        "LAKEHOUSE_STORAGE_URI": str(tmp_path / "warehouse"),
        "LAKEHOUSE_LOG_FORMAT": "text",
    }
    for key in ("LAKEHOUSE_PG_DSN", "LAKEHOUSE_FEAST_PG_DSN"):
        if key in env:
            env[key] = make_conninfo(env[key], host="127.0.0.1", port=str(port))
    return env


def lakehouse(env: dict[str, str], *argv: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "lakehouse.cli", *argv],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, f"lakehouse {' '.join(argv)}:\n{done.stdout}\n{done.stderr}"


def test_roles_let_each_service_do_its_job_and_no_more(tmp_path: Path) -> None:
    postgres = services()["postgres"]
    database = environment(postgres)["POSTGRES_DB"]
    dsns = {
        (name, key): value
        for name in cli_services()
        for key, value in service_settings_env(name).items()
        if key.endswith("_PG_DSN")
    }
    for (name, key), dsn in dsns.items():
        info = conninfo_to_dict(dsn)
        assert info["host"] == "postgres" and info["dbname"] == database, f"{name}: {key}"
    schema = Settings.from_env(service_settings_env("seed")).pg_schema

    with embedded_cluster("lakehouse-compose-") as admin:
        info = conninfo_to_dict(admin)
        assert info["dbname"] == database
        script = COMPOSE / "postgres" / "10-roles.sh"
        # Run as the postgres image does: executable, the superuser, its environment.
        done = subprocess.run(
            [str(script)],
            env={
                **os.environ,
                **environment(postgres),
                "PATH": f"{find_bin_dir()}{os.pathsep}{os.environ['PATH']}",
                "POSTGRES_USER": info["user"],
                "PGHOST": info["host"],
                "PGPORT": info["port"],
                "PGPASSWORD": info["password"],
            },
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        port = int(info["port"])

        def env(name: str) -> dict[str, str]:
            return local_env(name, port, tmp_path)

        def connect(name: str, key: str = "LAKEHOUSE_PG_DSN") -> psycopg.Connection:
            return psycopg.connect(env(name)[key], autocommit=True)

        denied = pytest.raises(psycopg.errors.InsufficientPrivilege)

        # seed: creates and loads the schema; the simulator: writes rows.
        lakehouse(env("seed"), "seed", "--rows", "300")
        lakehouse(env("simulator"), "simulate", "--changes", "100")
        with connect("simulator") as conn, denied:
            conn.execute(f"CREATE TABLE {schema}.intruder (x int)")

        # stream: publications, slots and the aligned snapshot into bronze.
        lakehouse(env("stream"), "stream", "setup")

        # pipeline: reads the source and its snapshot's fence (no extra privilege), writes
        # nothing.
        with connect("pipeline") as conn:
            assert fence(conn) > 0
            with snapshot(conn) as snap:
                assert snap.xmin > 0 and snap.lsn > 0
            conn.autocommit = True
            count = conn.execute(f"SELECT count(*) FROM {schema}.applicants").fetchone()
            assert count and count[0] >= 300
            with denied:
                conn.execute(f"DELETE FROM {schema}.applicants")

        # Feast: the pipeline writes the online store, the API only reads it.
        online = f"{schema}_online"
        with connect("pipeline", "LAKEHOUSE_FEAST_PG_DSN") as conn:
            conn.execute(f"CREATE TABLE {online}.features (entity_key bytea, value bytea)")
            conn.execute(f"INSERT INTO {online}.features VALUES ('\\x01', '\\x02')")
        with connect("api", "LAKEHOUSE_FEAST_PG_DSN") as conn:
            assert conn.execute(f"SELECT count(*) FROM {online}.features").fetchone() == (1,)
            with denied:
                conn.execute(f"DELETE FROM {online}.features")
            with denied:
                conn.execute(f"SELECT count(*) FROM {schema}.applicants")
