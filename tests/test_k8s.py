"""The Kubernetes manifests without a cluster: schemas, agreement with compose, hardening.

Every kustomization under deploy/k8s is rendered with `kubectl kustomize` (offline) in a
temporary copy whose `secrets.env` is made from the committed example, so the user's real
secrets are never read. Each rendered object is validated against the Kubernetes OpenAPI
schemas bundled in `kubernetes-validate` (strict: unknown fields fail). The rest holds the
manifests to compose/docker-compose.yml, the source of truth: the same image, command,
settings, Postgres role and secrets per service; the roles and MinIO scripts byte for
byte. Nothing here has been applied to a cluster.
"""

from __future__ import annotations

import base64
import copy
import json
import posixpath
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from lakehouse.cli.parser import build_parser
from lakehouse.settings import PREFIX, Settings
from tests.test_compose import (
    COMPOSE,
    as_list,
    env_example,
    environment,
    image_env,
    image_services,
    instructions,
    raw_compose,
    references,
    services,
    shell_commands,
)

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "k8s"
BASE = DEPLOY / "base"

KUBERNETES = "1.32"
"""Schemas to validate against: kubectl here is 1.32, and every API used (apps/v1,
batch/v1, core v1) is stable there and unchanged since."""

KUSTOMIZATIONS = {"base": "base", "small-node": "overlays/small-node"}
"""What a user applies (the overlay) and what it builds on; components render through it."""

COMPONENTS = {"components/simulator"}

Object = dict[str, Any]

# ----------------------------------------------------------------- rendering


def render(folder: Path) -> list[Object]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is not installed: the manifests cannot be rendered (no skip)"
    done = subprocess.run(
        [kubectl, "kustomize", str(folder)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, f"kubectl kustomize {folder.name}:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def deploy_copy(tmp: Path) -> Path:
    """deploy/k8s in `tmp` with base/secrets.env made from the example (never the real one)."""
    copied = tmp / "k8s"
    shutil.copytree(DEPLOY, copied, ignore=shutil.ignore_patterns("secrets.env"))
    shutil.copy(copied / "base" / "secrets.env.example", copied / "base" / "secrets.env")
    return copied


@pytest.fixture(scope="module")
def deploy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return deploy_copy(tmp_path_factory.mktemp("k8s"))


@pytest.fixture(scope="module")
def rendered(deploy: Path) -> dict[str, list[Object]]:
    return {name: render(deploy / path) for name, path in KUSTOMIZATIONS.items()}


@pytest.fixture(scope="module")
def overlay(rendered: dict[str, list[Object]]) -> list[Object]:
    return rendered["small-node"]


# ----------------------------------------------------------------- reading objects


def find(objects: list[Object], kind: str, name: str) -> Object:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} rendered"
    return matches[0]


def pod_template(obj: Object) -> Object | None:
    if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
        return obj["spec"]["template"]
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]
    return None


def workloads(objects: list[Object]) -> dict[str, Object]:
    """Objects that run pods, by name (names are unique across kinds here)."""
    out = {o["metadata"]["name"]: o for o in objects if pod_template(o) is not None}
    assert len(out) == sum(1 for o in objects if pod_template(o) is not None), "a name twice"
    return out


def pod_spec(obj: Object) -> Object:
    template = pod_template(obj)
    assert template is not None, obj["kind"]
    return template["spec"]


def all_containers(spec: Object) -> list[Object]:
    return spec.get("initContainers", []) + spec["containers"]


def main_container(obj: Object) -> Object:
    (container,) = pod_spec(obj)["containers"]
    return container


def secret_of(objects: list[Object]) -> Object:
    (secret,) = [o for o in objects if o["kind"] == "Secret"]
    return secret


def secret_data(objects: list[Object]) -> dict[str, str]:
    data = secret_of(objects)["data"]
    return {key: base64.b64decode(value).decode() for key, value in data.items()}


_K8S_REFERENCE = re.compile(r"\$(?:(\$)|\(([A-Za-z_][A-Za-z0-9_]*)\))")


def expand(text: str, defined: dict[str, str]) -> str:
    """Kubernetes' dependent variables: `$(VAR)` if VAR is defined before, `$$` is `$`."""

    def substitute(m: re.Match[str]) -> str:
        if m[1]:
            return "$"
        return defined.get(m[2], m[0])

    return _K8S_REFERENCE.sub(substitute, text)


def container_env(
    container: Object, objects: list[Object]
) -> tuple[dict[str, str], dict[str, set[str]]]:
    """A container's environment as the kubelet builds it, and each variable's secret keys."""
    secret = secret_of(objects)
    data = secret_data(objects)
    assert "envFrom" not in container, f"{container['name']}: envFrom hands over every key"
    values: dict[str, str] = {}
    secrets: dict[str, set[str]] = {}
    for item in container.get("env", []):
        name = item["name"]
        assert name not in values, f"{container['name']}: {name} is set twice"
        if "valueFrom" in item:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"], f"{name}: another Secret"
            assert ref["key"] in data, f"{name}: the Secret has no key {ref['key']}"
            values[name], secrets[name] = data[ref["key"]], {ref["key"]}
        else:
            raw = item.get("value", "")
            used = {m[2] for m in _K8S_REFERENCE.finditer(raw) if m[2]}
            undefined = used - set(values)
            assert not undefined, f"{name} refers to {undefined}, not defined before it"
            values[name] = expand(raw, values)
            secrets[name] = set().union(*(secrets[v] for v in used)) if used else set()
    return values, secrets


def lakehouse_image() -> str:
    images = {services()[name]["image"] for name in image_services()}
    assert len(images) == 1, images
    return images.pop()


def is_lakehouse(container: Object) -> bool:
    return container["image"] == lakehouse_image()


def image_ids() -> tuple[int, int]:
    """The uid and gid of the Dockerfile's user (`useradd --uid`, `groupadd --gid`)."""
    commands = [c for r in instructions("RUN") for c in shell_commands(r.args)]
    (useradd,) = [c for c in commands if c[0] == "useradd"]
    (groupadd,) = [c for c in commands if c[0] == "groupadd"]
    return int(useradd[useradd.index("--uid") + 1]), int(groupadd[groupadd.index("--gid") + 1])


def lakehouse_home() -> str:
    return posixpath.normpath(image_env()["LAKEHOUSE_HOME"])


def every_run(command: list[str]) -> tuple[list[str], float | None]:
    """Compose's command without `--every N`, and N: in Kubernetes a CronJob is the interval."""
    if "--every" not in command:
        return command, None
    at = command.index("--every")
    return command[:at] + command[at + 2 :], float(command[at + 1])


_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity: cores for CPU (`250m`), bytes for memory (`512Mi`)."""
    text = str(value)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti|k|M|G)?", text)
    assert match, f"quantity `{text}`"
    number, unit = float(match[1]), match[2]
    if unit == "m":
        return number / 1000
    return number * _UNITS[unit] if unit else number


GiB = 2**30

# ============================================================ rendering and schemas


def test_every_kustomization_is_rendered_here() -> None:
    found = {str(p.parent.relative_to(DEPLOY)) for p in DEPLOY.rglob("kustomization.yaml")}
    assert found == set(KUSTOMIZATIONS.values()) | COMPONENTS
    # A component renders only through a kustomization that includes it.
    overlay_doc = yaml.safe_load((DEPLOY / "overlays/small-node/kustomization.yaml").read_text())
    for component in COMPONENTS:
        doc = yaml.safe_load((DEPLOY / component / "kustomization.yaml").read_text())
        assert doc["kind"] == "Component"
        assert f"../../{component}" in overlay_doc["components"]


def schema_errors(obj: Object) -> list[str]:
    try:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    except kubernetes_validate.ValidationError as error:
        path = "/".join(map(str, error.path))
        return [f"{obj['kind']}/{obj['metadata']['name']}: {path}: {error.message}"]
    return []


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_objects_follow_the_kubernetes_schemas(
    rendered: dict[str, list[Object]], name: str
) -> None:
    objects = rendered[name]
    assert objects
    # SchemaNotFoundError (an unknown kind or apiVersion) propagates: it fails too.
    assert [e for obj in objects for e in schema_errors(obj)] == []


@pytest.mark.parametrize(
    ("mistake", "kind", "name"),
    [
        (lambda o: main_container(o).update(commnd=["lakehouse"]), "Deployment", "api"),
        (lambda o: o["spec"].update(replicas="1"), "Deployment", "stream"),
        (lambda o: o["spec"].update(concurrencyPolicy=["Forbid"]), "CronJob", "pipeline"),
        (lambda o: o["spec"]["ports"][0].update(port="5432"), "Service", "postgres"),
        (
            lambda o: main_container(o)["livenessProbe"]["exec"].update(command="alive"),
            "Deployment",
            "stream",
        ),
    ],
    ids=["unknown-field", "replicas-as-text", "policy-as-list", "port-as-text", "probe-argv"],
)
def test_the_schema_check_catches_mistakes(
    overlay: list[Object], mistake: Callable[[Object], None], kind: str, name: str
) -> None:
    obj = copy.deepcopy(find(overlay, kind, name))
    assert schema_errors(obj) == []
    mistake(obj)
    assert schema_errors(obj)


def test_image_override_from_the_overlay_reaches_every_lakehouse_container(
    tmp_path: Path,
) -> None:
    # What the overlay's comment and the README tell a user to add for a registry image.
    copied = deploy_copy(tmp_path)
    kustomization = copied / "overlays" / "small-node" / "kustomization.yaml"
    with kustomization.open("a") as f:
        f.write(
            "images:\n  - name: lakehouse\n"
            "    newName: registry.example.com/lakehouse\n    newTag: '0.1.0'\n"
        )
    image = "registry.example.com/lakehouse:0.1.0"
    seen = set()
    for name, obj in workloads(render(copied / "overlays" / "small-node")).items():
        for container in all_containers(pod_spec(obj)):
            if name in image_services():
                assert container["image"] == image, name
                seen.add(name)
            else:
                assert container["image"] != image, name
    assert seen == set(image_services())


# ============================================================ agreement with compose


def test_every_compose_service_is_deployed(rendered: dict[str, list[Object]]) -> None:
    kinds = {
        "postgres": "StatefulSet",
        "minio": "StatefulSet",
        "minio-init": "Job",
        "seed": "Job",
        "luigid": "Deployment",
        "pipeline": "CronJob",
        "stream": "Deployment",
        "simulator": "Deployment",
        "maintain": "CronJob",
        "api": "Deployment",
    }
    assert set(kinds) == set(services())
    overlay_workloads = workloads(rendered["small-node"])
    assert {n: o["kind"] for n, o in overlay_workloads.items()} == kinds
    # The base is everything but the demo's application side (a component).
    assert set(workloads(rendered["base"])) == set(kinds) - {"simulator"}
    for name, obj in overlay_workloads.items():
        restart = services()[name].get("restart")
        # compose's one-shots (restart "no") are Jobs; the others run on.
        assert (obj["kind"] == "Job") == (restart == "no"), name


def compose_secrets(name: str) -> dict[str, set[str]]:
    """Each variable of a compose service, with the .env variables its value refers to."""
    raw = environment(raw_compose()["services"][name])
    return {key: references(value) for key, value in raw.items()}


@pytest.mark.parametrize("name", image_services())
def test_lakehouse_service_agrees_with_compose(overlay: list[Object], name: str) -> None:
    service = services()[name]
    obj = workloads(overlay)[name]
    container = main_container(obj)
    assert container["image"] == service["image"]
    command, every = every_run(as_list(service.get("command")))
    if "entrypoint" in service:  # luigid: another program of the image
        assert container["command"] == as_list(service["entrypoint"])
    else:  # the image's ENTRYPOINT, `lakehouse`
        assert "command" not in container, f"{name}: keep the image's entrypoint"
    assert container["args"] == command, f"{name}: compose runs {service.get('command')}"
    # A repeating command (`--every N`) is a CronJob every N seconds.
    assert (every is not None) == (obj["kind"] == "CronJob"), name
    # compose's `init: true` (tini as PID 1): here the pod's pause process is PID 1.
    assert pod_spec(obj).get("shareProcessNamespace") is bool(service.get("init")), name
    values, secrets = container_env(container, overlay)
    compose_env = environment(service)
    wanted = {k: v for k, v in compose_env.items() if k.startswith(PREFIX)}
    got = {k: v for k, v in values.items() if k.startswith(PREFIX)}
    # Same names and values: the same Postgres role in each DSN, the same endpoint, bucket,
    # schema, log format and Feast settings (secrets.env.example holds compose's
    # .env.example values, so even the passwords compare).
    assert got == wanted, name
    assert set(compose_env) == set(wanted), f"{name}: compose sets a non-LAKEHOUSE variable"
    # ... each drawn from the same secret variables, and the service gets no other secret.
    lakehouse_secrets = {k: v for k, v in secrets.items() if k.startswith(PREFIX)}
    assert lakehouse_secrets == compose_secrets(name), name
    used = set().union(*secrets.values()) if secrets else set()
    assert used == set().union(*compose_secrets(name).values()), f"{name}: extra secrets"
    if "LAKEHOUSE_HOME" not in values:
        values["LAKEHOUSE_HOME"] = image_env()["LAKEHOUSE_HOME"]
    # Raises ConfigError naming a variable the settings refuse.
    Settings.from_env({k: v for k, v in values.items() if k.startswith(PREFIX)})


@pytest.mark.parametrize("name", ["postgres", "minio", "minio-init"])
def test_third_party_service_agrees_with_compose(overlay: list[Object], name: str) -> None:
    service = services()[name]
    container = main_container(workloads(overlay)[name])
    assert container["image"] == service["image"]
    values, secrets = container_env(container, overlay)
    compose_env = environment(service)
    assert {k: values.get(k) for k in compose_env} == compose_env
    for key, refs in compose_secrets(name).items():
        assert secrets[key] == refs, f"{name}: {key}"
    if name != "minio-init":
        assert container["args"] == as_list(service["command"])
    # What k8s adds, and why (see the manifests): PGDATA below the mount; a writable home.
    extra = set(values) - set(compose_env)
    assert extra == {"postgres": {"PGDATA"}, "minio": {"HOME"}, "minio-init": {"HOME"}}[name]


def test_secrets_example_holds_compose_variables() -> None:
    example = {}
    for line in (BASE / "secrets.env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            example[key] = value
    assert example == env_example()
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    (generator,) = kustomization["secretGenerator"]
    assert generator["envs"] == ["secrets.env"]
    ignored = [line.strip() for line in (DEPLOY / ".gitignore").read_text().splitlines()]
    assert "secrets.env" in ignored, "the real secrets must be git-ignored"


def test_roles_script_is_compose_copy(overlay: list[Object]) -> None:
    script = (COMPOSE / "postgres" / "10-roles.sh").read_bytes()
    assert (BASE / "postgres" / "10-roles.sh").read_bytes() == script
    spec = pod_spec(workloads(overlay)["postgres"])
    (mount,) = [
        m
        for m in main_container(workloads(overlay)["postgres"])["volumeMounts"]
        if m["mountPath"] == "/docker-entrypoint-initdb.d"
    ]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    config_map = find(overlay, "ConfigMap", volume["configMap"]["name"])
    assert config_map["data"] == {"10-roles.sh": script.decode()}
    # The entrypoint executes executable *.sh files (as compose's bind mount gives them).
    assert volume["configMap"]["defaultMode"] & 0o111 == 0o111


def heredoc_policy(script: str) -> Any:
    match = re.search(r"<<'POLICY'\n(.*?)\nPOLICY\n", script, re.DOTALL)
    assert match, "no policy in the script"
    return json.loads(match[1])


def test_minio_init_runs_compose_script(overlay: list[Object]) -> None:
    script = as_list(services()["minio-init"]["command"])[0]
    assert (BASE / "minio" / "init.sh").read_text() == script
    obj = workloads(overlay)["minio-init"]
    container = main_container(obj)
    # compose: `/bin/sh -ec SCRIPT`; here the same shell and -e over the script's file.
    assert container["command"][:2] == ["/bin/sh", "-e"]
    path = container["command"][2]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == posixpath.dirname(path)]
    (volume,) = [v for v in pod_spec(obj)["volumes"] if v["name"] == mount["name"]]
    data = find(overlay, "ConfigMap", volume["configMap"]["name"])["data"]
    assert data[posixpath.basename(path)] == script
    # The policy limiting the lakehouse's user to its bucket, identical to compose's.
    policy = heredoc_policy(data[posixpath.basename(path)])
    assert policy == heredoc_policy(script)
    bucket = urlsplit(environment(services()["pipeline"])["LAKEHOUSE_STORAGE_URI"]).netloc
    resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
    assert resources == {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}


def test_postgres_keeps_its_data_and_waits_for_its_roles(overlay: list[Object]) -> None:
    obj = workloads(overlay)["postgres"]
    container = main_container(obj)
    values, _ = container_env(container, overlay)
    (claim,) = obj["spec"]["volumeClaimTemplates"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    # PGDATA strictly below the mount: lost+found at a volume's root breaks initdb.
    assert posixpath.dirname(values["PGDATA"]) == mount["mountPath"]
    # Ready over TCP only (compose's healthcheck says why), as compose asks.
    healthcheck = as_list(services()["postgres"]["healthcheck"]["test"])
    for probe in ("startupProbe", "readinessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[0] == "pg_isready" and command[command.index("-h") + 1] == "127.0.0.1"
        assert command == healthcheck[1:], probe


# ============================================================ hardening and resources


def setting(key: str, container_context: Object, pod_context: Object) -> Any:
    """A securityContext field in force: the container's, else the pod's."""
    return container_context.get(key, pod_context.get(key))


def pods(objects: list[Object]) -> Iterator[tuple[str, Object]]:
    for name, obj in workloads(objects).items():
        yield name, pod_spec(obj)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_container_runs_hardened(rendered: dict[str, list[Object]], name: str) -> None:
    uid, gid = image_ids()
    for pod, spec in pods(rendered[name]):
        pod_context = spec.get("securityContext", {})
        assert spec.get("automountServiceAccountToken") is False, pod
        assert spec.get("enableServiceLinks") is False, pod
        for key in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(key), f"{pod}: {key}"
        assert not [v for v in spec.get("volumes", []) if "hostPath" in v], pod
        for container in all_containers(spec):
            where = f"{pod}/{container['name']}"
            context = container.get("securityContext", {})
            effective = {
                key: setting(key, context, pod_context)
                for key in ("runAsNonRoot", "runAsUser", "runAsGroup", "seccompProfile")
            }
            assert effective["runAsNonRoot"] is True, where
            assert effective["runAsUser"] not in (None, 0), f"{where}: a numeric non-root uid"
            assert (effective["seccompProfile"] or {}).get("type") == "RuntimeDefault", where
            assert context.get("allowPrivilegeEscalation") is False, where
            assert not context.get("privileged"), where
            assert context.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not context.get("capabilities", {}).get("add"), where
            assert context.get("readOnlyRootFilesystem") is True, where
            writable = {
                m["mountPath"] for m in container.get("volumeMounts", []) if not m.get("readOnly")
            }
            assert "/tmp" in writable, f"{where}: a read-only root needs a writable /tmp"
            if is_lakehouse(container):
                assert (effective["runAsUser"], effective["runAsGroup"]) == (uid, gid), where
                assert pod_context.get("fsGroup") == gid, where
                if "command" not in container:  # `lakehouse`: writes LAKEHOUSE_HOME
                    assert lakehouse_home() in writable, f"{where}: LAKEHOUSE_HOME"
        if pod == "postgres":
            assert (pod_context.get("runAsUser"), pod_context.get("fsGroup")) == (999, 999)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_container_has_requests_and_limits(
    rendered: dict[str, list[Object]], name: str
) -> None:
    for pod, spec in pods(rendered[name]):
        for container in all_containers(spec):
            resources = container.get("resources", {})
            for resource in ("cpu", "memory"):
                request = resources.get("requests", {}).get(resource)
                limit = resources.get("limits", {}).get(resource)
                assert request and limit, f"{pod}/{container['name']}: {resource}"
                assert quantity(request) <= quantity(limit), f"{pod}: {resource}"


def pod_resources(obj: Object, kind: str) -> tuple[float, float]:
    """(cores, bytes) a pod asks for (`requests`) or may use (`limits`), times replicas."""
    replicas = obj["spec"].get("replicas", 1) if obj["kind"] != "CronJob" else 1
    containers = all_containers(pod_spec(obj))
    cpu = sum(quantity(c["resources"][kind]["cpu"]) for c in containers)
    memory = sum(quantity(c["resources"][kind]["memory"]) for c in containers)
    return cpu * replicas, memory * replicas


def test_small_node_overlay_fits_two_cores_and_eight_gib(overlay: list[Object]) -> None:
    # Kept for the system, k3s and the kubelet (the overlay's resources.yaml says so).
    cores, memory = 2 - 0.25, 8 * GiB - 1 * GiB
    running = workloads(overlay)
    # Everything at once, one-shots included, must be schedulable.
    requested = [pod_resources(o, "requests") for o in running.values()]
    assert sum(r[0] for r in requested) <= cores
    assert sum(r[1] for r in requested) <= memory
    # Memory limits of what runs together (the long-running pods and one periodic run)
    # stay within the node, so that no pod is killed for another's use.
    always = [o for o in running.values() if o["kind"] in ("Deployment", "StatefulSet")]
    periodic = [o for o in running.values() if o["kind"] == "CronJob"]
    at_once = sum(pod_resources(o, "limits")[1] for o in always)
    at_once += max(pod_resources(o, "limits")[1] for o in periodic)
    assert at_once <= memory, f"{at_once / GiB:.2f} GiB"
    for name, obj in running.items():
        assert pod_resources(obj, "limits")[0] <= 2, name
    # ... which holds because maintain never starts with the pipeline.
    assert not minutes(running["maintain"]) & minutes(running["pipeline"])


# ============================================================ commands and probes


def lakehouse_argv(container: Object) -> list[str]:
    return as_list(container.get("args"))


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_lakehouse_commands_parse(rendered: dict[str, list[Object]], name: str) -> None:
    for pod, spec in pods(rendered[name]):
        for container in all_containers(spec):
            if is_lakehouse(container) and "command" not in container:
                argv = lakehouse_argv(container)
                assert build_parser().parse_args(argv).command == argv[0], pod


def test_cronjobs_are_the_interval_and_never_overlap(overlay: list[Object]) -> None:
    for name in ("pipeline", "maintain"):
        obj = workloads(overlay)[name]
        _, every = every_run(as_list(services()[name]["command"]))
        args = build_parser().parse_args(lakehouse_argv(main_container(obj)))
        assert args.every is None, f"{name}: the CronJob repeats it, not --every"
        assert interval(obj["spec"]["schedule"]) == every, name
        spec = obj["spec"]
        assert spec["concurrencyPolicy"] == "Forbid", name
        assert 0 < spec["startingDeadlineSeconds"] < every, name
        assert spec["successfulJobsHistoryLimit"] >= 1 and spec["failedJobsHistoryLimit"] >= 1
        job = spec["jobTemplate"]["spec"]
        assert job["backoffLimit"] == 0, f"{name}: the next run is the retry"
        assert job["activeDeadlineSeconds"] > 0, f"{name}: a hung run would block the rest"
        assert pod_spec(obj)["restartPolicy"] == "Never"
    pipeline = build_parser().parse_args(
        lakehouse_argv(main_container(workloads(overlay)["pipeline"]))
    )
    assert pipeline.command == "run" and pipeline.scheduler_host == "luigid"


def minutes(cronjob: Object) -> set[int]:
    minute = cronjob["spec"]["schedule"].split()[0]
    if minute.startswith("*/"):
        return set(range(0, 60, int(minute[2:])))
    return {int(minute)}


def interval(schedule: str) -> float:
    """Seconds between runs of an every-N-minutes or hourly schedule."""
    minute, *rest = schedule.split()
    assert rest == ["*", "*", "*", "*"], schedule
    if minute.startswith("*/"):
        assert 60 % int(minute[2:]) == 0, schedule
        return int(minute[2:]) * 60
    assert 0 <= int(minute) < 60, schedule
    return 3600


def test_one_shots_retry_until_what_they_need_is_up(overlay: list[Object]) -> None:
    # No depends_on in Kubernetes: a Job started before Postgres or MinIO fails and retries.
    for name in ("seed", "minio-init"):
        job = workloads(overlay)[name]
        assert job["spec"]["backoffLimit"] >= 5, name
        assert pod_spec(job)["restartPolicy"] == "Never", name


def test_stream_runs_alone_and_lands_what_it_holds(overlay: list[Object]) -> None:
    obj = workloads(overlay)["stream"]
    assert obj["spec"]["replicas"] == 1
    assert obj["spec"]["strategy"] == {"type": "Recreate"}, "two streams would share slots"
    args = build_parser().parse_args(lakehouse_argv(main_container(obj)))
    assert (args.command, args.action, args.setup, args.promote) == ("stream", "run", True, True)
    # ~9 s measured to land the held batch; compose gives 30 s, this at least as much.
    grace = pod_spec(obj)["terminationGracePeriodSeconds"]
    assert grace >= 60 and grace >= int(services()["stream"]["stop_grace_period"].rstrip("s"))


def test_stream_probe_asks_the_stream_itself(overlay: list[Object]) -> None:
    container = main_container(workloads(overlay)["stream"])
    for probe in ("startupProbe", "livenessProbe"):
        command = container[probe]["exec"]["command"]
        # The image's console script, as its ENTRYPOINT.
        assert command[0] == "lakehouse", probe
        args = build_parser().parse_args(command[1:])
        assert (args.command, args.action) == ("stream", "alive"), probe
    startup = container["startupProbe"]
    # The first start takes the aligned snapshot before the first heartbeat.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert container["livenessProbe"]["timeoutSeconds"] >= 5, "a Python process starts"


def http_port(container: Object, port: str | int) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


def test_api_probes_are_routes_of_the_app(overlay: list[Object], tmp_path: Path) -> None:
    from lakehouse.ml.serve import create_app

    container = main_container(workloads(overlay)["api"])
    args = build_parser().parse_args(lakehouse_argv(container))
    paths = {}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert http_port(container, get["port"]) == args.port, probe
        paths[probe] = get["path"]
    assert paths == {
        "startupProbe": "/healthz",
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
    }
    app = create_app(Settings(home=tmp_path, prediction_log="off"))
    routes: dict[str, set[str]] = {
        getattr(r, "path", ""): getattr(r, "methods", set()) for r in app.routes
    }
    for path in set(paths.values()):
        assert "GET" in routes.get(path, set()), f"the API has no GET {path}"
    assert pod_spec(workloads(overlay)["api"])["terminationGracePeriodSeconds"] >= 30


def test_luigid_probe_and_state(overlay: list[Object]) -> None:
    container = main_container(workloads(overlay)["luigid"])
    argv = container["args"]
    port = int(argv[argv.index("--port") + 1])
    for probe in ("readinessProbe", "livenessProbe"):
        assert http_port(container, container[probe]["httpGet"]["port"]) == port
    state = posixpath.dirname(argv[argv.index("--state-path") + 1])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == state]
    (volume,) = [
        v for v in pod_spec(workloads(overlay)["luigid"])["volumes"] if v["name"] == mount["name"]
    ]
    assert "persistentVolumeClaim" in volume, "the task history survives a restart"


def services_of(objects: list[Object]) -> dict[str, Object]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}


def listens(objects: list[Object], host: str, port: int) -> bool:
    """A Service `host` has `port`, and a pod it selects has a container port behind it."""
    service = services_of(objects).get(host)
    if service is None:
        return False
    targets = [p.get("targetPort", port) for p in service["spec"]["ports"] if p["port"] == port]
    if len(targets) != 1:
        return False
    target = targets[0]
    selector = service["spec"]["selector"]
    for obj in workloads(objects).values():
        template = pod_template(obj)
        assert template is not None
        if selector.items() <= template["metadata"]["labels"].items():
            for container in all_containers(template["spec"]):
                for p in container.get("ports", []):
                    if target in (p["containerPort"], p.get("name")):
                        return True
    return False


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_services_reach_hosts_that_listen(rendered: dict[str, list[Object]], name: str) -> None:
    objects = rendered[name]
    for pod, spec in pods(objects):
        for container in all_containers(spec):
            values, _ = container_env(container, objects)
            reached: set[tuple[str, int]] = set()
            for text in [
                *values.values(),
                *container.get("args", []),
                *container.get("command", []),
            ]:
                for url in re.findall(r"[a-z][a-z0-9+.-]*://[^\s\"']+", text):
                    parts = urlsplit(url)
                    if parts.scheme != "s3":
                        default = {"postgresql": 5432, "http": 80}[parts.scheme]
                        reached.add((str(parts.hostname), parts.port or default))
            if is_lakehouse(container) and "command" not in container:
                args = build_parser().parse_args(lakehouse_argv(container))
                if getattr(args, "scheduler_host", None):
                    reached.add((args.scheduler_host, args.scheduler_port))
            for host, port in sorted(reached):
                assert listens(objects, host, port), f"{pod} reaches {host}:{port}: nothing there"
    for service in services_of(objects).values():
        for port in service["spec"]["ports"]:
            assert listens(objects, service["metadata"]["name"], port["port"]), port


def test_feast_registry_lives_in_the_shared_home(overlay: list[Object]) -> None:
    # The API and the stream read the Feast registry the pipeline writes, in LAKEHOUSE_HOME
    # (not in the warehouse): the three must mount one volume there.
    from lakehouse.ml.features import repo_path

    for store in repo_path().glob("feature_store*.yaml"):
        registry = yaml.safe_load(store.read_text())["registry"]["path"]
        assert registry.startswith("${LAKEHOUSE_HOME}/"), store.name
    claims = {}
    for name in ("pipeline", "stream", "api"):
        spec = pod_spec(workloads(overlay)[name])
        (mount,) = [
            m
            for m in main_container(workloads(overlay)[name])["volumeMounts"]
            if m["mountPath"] == lakehouse_home()
        ]
        (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        claims[name] = volume["persistentVolumeClaim"]["claimName"]
    (claim,) = set(claims.values())
    assert find(overlay, "PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteOnce"]


# ============================================================ secrets and files


_SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|PRIVATE|_KEY(_|$)")


def test_no_secret_outside_the_secret(rendered: dict[str, list[Object]]) -> None:
    secrets = [v for k, v in env_example().items() if re.search(r"PASSWORD|SECRET", k)]
    forms = {s for v in secrets for s in (v, base64.b64encode(v.encode()).decode())}
    for name, objects in rendered.items():
        for obj in objects:
            if obj["kind"] == "Secret":
                continue
            text = yaml.safe_dump(obj)
            leaked = sorted(s for s in forms if s in text)
            assert not leaked, f"{name}: {obj['kind']}/{obj['metadata']['name']} holds {leaked}"
        for pod, spec in pods(objects):
            for container in all_containers(spec):
                for item in container.get("env", []):
                    if _SECRET_NAME.search(item["name"]):
                        assert "value" not in item, f"{pod}: {item['name']} is a literal"
                    for password in re.findall(r"://[^:/@\s]+:([^@\s]*)@", item.get("value", "")):
                        assert re.fullmatch(r"\$\([A-Z_]+\)", password), f"{pod}: {item['name']}"
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.name not in ("secrets.env.example", "secrets.env"):
            text = path.read_text()
            assert not [s for s in secrets if s in text], f"{path.name} holds a secret's value"


def test_files_name_no_machine_paths() -> None:
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.name != "secrets.env":
            assert str(ROOT) not in path.read_text(), f"{path.name} names this checkout"


def test_readme_commands_name_real_paths() -> None:
    readme = (DEPLOY / "README.md").read_text()
    assert "kubectl apply -k deploy/k8s/overlays/small-node" in readme
    for path in set(re.findall(r"deploy/k8s/[\w./-]*\w", readme)):
        assert (ROOT / path).exists() or path.endswith("secrets.env"), path
