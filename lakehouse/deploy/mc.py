"""MinIO's `mc` client, the part of it the compose file's `minio-init` uses, for a rehearsal.

The rehearsal runs minio-init's own shell script, with this on its PATH as `mc`, against
the S3 stand-in (`lakehouse.deploy.s3`): the bucket, the policy and the user are made
through the S3 and IAM APIs, signed with the alias's credentials, as MinIO would check
them. Aliases live in `$HOME/.mc/standin-aliases.json`, or come from `MC_HOST_<alias>`.

One deliberate difference: moto authorizes a multi-object delete as `s3:DeleteObject` on
the *bucket's* ARN, where S3 and MinIO check each key against `bucket/*`. A policy that
grants `s3:DeleteObject` on `bucket/*` gets that one grant on `bucket` too, or vacuum
and compaction (which delete in batches) would be refused on the stand-in only.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lakehouse.deploy.s3 import ADMIN_PATH

Alias = dict[str, str]


def _aliases_file() -> Path:
    return Path(os.environ.get("HOME", ".")) / ".mc" / "standin-aliases.json"


def _aliases() -> dict[str, Alias]:
    try:
        return dict(json.loads(_aliases_file().read_text()))
    except FileNotFoundError:
        return {}


def alias(name: str) -> Alias:
    """Return an alias's URL and keys, from `MC_HOST_<name>` or `mc alias set`."""
    env = os.environ.get(f"MC_HOST_{name}")
    if env:
        parts = urlsplit(env)
        url = f"{parts.scheme}://{parts.hostname}:{parts.port}"
        return {"url": url, "user": parts.username or "", "password": parts.password or ""}
    known = _aliases()
    if name not in known:
        msg = f"mc: alias `{name}` is not set; run `mc alias set {name} URL KEY SECRET`"
        raise SystemExit(msg)
    return known[name]


def _client(service: str, target: Alias) -> Any:
    import boto3

    return boto3.client(
        service,
        endpoint_url=target["url"],
        region_name="us-east-1",
        aws_access_key_id=target["user"],
        aws_secret_access_key=target["password"],
    )


def _policy_arn(iam: Any, name: str) -> str:
    for page in iam.get_paginator("list_policies").paginate(Scope="Local"):
        for policy in page["Policies"]:
            if policy["PolicyName"] == name:
                return str(policy["Arn"])
    msg = f"mc: policy `{name}` does not exist"
    raise SystemExit(msg)


def _stand_in_grants(document: dict[str, Any]) -> dict[str, Any]:
    """Add `s3:DeleteObject` on `bucket` where it is granted on `bucket/*` (the docstring)."""
    for statement in document.get("Statement", []):
        actions = statement.get("Action", [])
        actions = [actions] if isinstance(actions, str) else actions
        resources = statement.get("Resource", [])
        resources = [resources] if isinstance(resources, str) else resources
        if "s3:DeleteObject" in actions and statement.get("Effect") == "Allow":
            buckets = [r[: -len("/*")] for r in resources if r.endswith("/*")]
            statement["Resource"] = resources + [b for b in buckets if b not in resources]
    return document


def run(args: list[str]) -> int:
    """Run one `mc` command line; return its exit code."""
    match args:
        case ["alias", "set", name, url, user, password]:
            known = _aliases() | {name: {"url": url, "user": user, "password": password}}
            path = _aliases_file()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_text(json.dumps(known))
            print(f"Added `{name}` successfully.")
        case ["ready", name]:
            url = alias(name)["url"] + "/minio/health/ready"
            try:
                with urllib.request.urlopen(url, timeout=4) as answer:  # noqa: S310 - http(s) alias
                    return 0 if answer.status == 200 else 1
            except OSError:
                return 1
        case ["mb", *options, where] if set(options) <= {"--ignore-existing", "-p"}:
            name, _, bucket = where.partition("/")
            s3 = _client("s3", alias(name))
            try:
                s3.create_bucket(Bucket=bucket)
            except s3.exceptions.BucketAlreadyOwnedByYou:
                if "--ignore-existing" not in options and "-p" not in options:
                    msg = f"mc: bucket `{bucket}` already exists"
                    raise SystemExit(msg) from None
            print(f"Bucket created successfully `{where}`.")
        case ["admin", "policy", "create", name, policy, file]:
            iam = _client("iam", alias(name))
            document = json.dumps(_stand_in_grants(json.loads(Path(file).read_text())))
            try:
                iam.create_policy(PolicyName=policy, PolicyDocument=document)
            except iam.exceptions.EntityAlreadyExistsException:
                arn = _policy_arn(iam, policy)
                iam.create_policy_version(PolicyArn=arn, PolicyDocument=document, SetAsDefault=True)
            print(f"Created policy `{policy}` successfully.")
        case ["admin", "user", "add", name, key, secret]:
            target = alias(name)
            body = {
                "root_user": target["user"],
                "root_password": target["password"],
                "access_key": key,
                "secret_key": secret,
            }
            request = urllib.request.Request(  # noqa: S310 - the alias's http(s) URL
                target["url"] + ADMIN_PATH, data=json.dumps(body).encode(), method="POST"
            )
            with urllib.request.urlopen(request, timeout=30):  # noqa: S310
                pass
            print(f"Added user `{key}` successfully.")
        case ["admin", "user", "info", name, key]:
            iam = _client("iam", alias(name))
            attached = iam.list_attached_user_policies(UserName=key)["AttachedPolicies"]
            print(f"AccessKey: {key}\nStatus: enabled")
            if attached:
                print("PolicyName: " + ",".join(p["PolicyName"] for p in attached))
        case ["admin", "policy", "attach", name, policy, "--user", key]:
            iam = _client("iam", alias(name))
            attached = iam.list_attached_user_policies(UserName=key)["AttachedPolicies"]
            if any(p["PolicyName"] == policy for p in attached):
                msg = f"mc: policy `{policy}` is already attached to `{key}`"
                raise SystemExit(msg)
            iam.attach_user_policy(UserName=key, PolicyArn=_policy_arn(iam, policy))
            print(f"Attached policy `{policy}` to user `{key}`.")
        case _:
            sys.stderr.write(
                f"mc stand-in: `mc {' '.join(args)}` is not a command the rehearsal plays; "
                "teach lakehouse/deploy/mc.py, or rehearse without it\n"
            )
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
