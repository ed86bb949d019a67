"""MinIO's part in a rehearsal: moto's S3 server, with every request authenticated.

MinIO has no wheel and no Debian package, so the rehearsal runs moto's server in its
place: the S3 server the test suite uses, the one that passed everything delta-rs needs
(conditional puts among it). Like MinIO it checks every request's signature against its
users and their policies: the root user (`MINIO_ROOT_USER`/`MINIO_ROOT_PASSWORD`) may do
anything, a user made by `mc admin user add` only what its attached policies allow. It
also answers MinIO's health paths, and the one admin call moto has no form of: a user
whose access key is the name given (`mc admin user add ALIAS KEY SECRET`; moto makes up
its own keys).

    python -m lakehouse.deploy.s3 --address 127.0.0.1:9000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

ADMIN_PATH = "/minio-standin/user"
HEALTH_PATHS = ("/minio/health/live", "/minio/health/ready")
ROOT_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
}

Wsgi = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def add_user(access_key: str, secret_key: str, *, policy: dict[str, Any] | None = None) -> None:
    """Create an IAM user whose access key is `access_key` (moto would draw one)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.iam.models import iam_backends

    backend = iam_backends[DEFAULT_ACCOUNT_ID]["aws"]
    try:
        user = backend.get_user(access_key)
    except Exception:
        user = backend.create_user(region_name="us-east-1", user_name=access_key, path="/")
    if policy is not None:
        backend.put_user_policy(access_key, "root", json.dumps(policy))
    if not user.access_keys:
        backend.create_access_key(access_key)
    key = user.access_keys[0]
    key.access_key_id = access_key
    key.secret_access_key = secret_key


def app(root_user: str, root_password: str) -> Wsgi:
    """Moto's WSGI app behind MinIO's health paths and the admin call."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    moto = DomainDispatcherApplication(create_backend_app)

    def respond(start: Callable[..., Any], status: str, body: dict[str, Any]) -> list[bytes]:
        data = json.dumps(body).encode()
        start(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]

    def wsgi(environ: dict[str, Any], start: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in HEALTH_PATHS:
            return respond(start, "200 OK", {"status": "ok"})
        if path.startswith("/moto-api"):  # moto's own controls (auth off, reset): not MinIO's
            return respond(start, "403 Forbidden", {"error": "not served by the stand-in"})
        if path == ADMIN_PATH and environ.get("REQUEST_METHOD") == "POST":
            size = int(environ.get("CONTENT_LENGTH") or 0)
            body = json.loads(environ["wsgi.input"].read(size) or b"{}")
            if (body.get("root_user"), body.get("root_password")) != (root_user, root_password):
                return respond(start, "403 Forbidden", {"error": "root credentials required"})
            add_user(body["access_key"], body["secret_key"])
            return respond(start, "200 OK", {"user": body["access_key"]})
        return moto(environ, start)

    return wsgi


def serve(host: str, port: int, root_user: str, root_password: str) -> None:
    """Serve until SIGTERM or SIGINT, then exit 0 (as MinIO does)."""
    from moto import settings
    from moto.moto_server.werkzeug_app import MotoRequestHandler
    from moto.s3.responses import ACTION_MAP
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    # S3 and MinIO authorize HEAD on a bucket as s3:ListBucket; moto asks for an action
    # named s3:HeadBucket, which no IAM policy grants.
    ACTION_MAP["BUCKET"]["HEAD"]["DEFAULT"] = "ListBucket"
    add_user(root_user, root_password, policy=ROOT_POLICY)
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # every request from now on is checked
    server = make_server(
        host, port, app(root_user, root_password), True, request_handler=MotoRequestHandler
    )

    def stop(signum: int, frame: Any) -> None:
        print(f"{signal.Signals(signum).name} received: stopping", flush=True)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"S3 stand-in for MinIO listening on {host}:{port}", flush=True)
    server.serve_forever()
    print("stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Parse `--address HOST:PORT` and serve; the root credentials come from MinIO's env."""
    parser = argparse.ArgumentParser(prog="python -m lakehouse.deploy.s3")
    parser.add_argument("--address", default="127.0.0.1:9000")
    args = parser.parse_args(argv)
    host, _, port = args.address.rpartition(":")
    user, password = os.environ.get("MINIO_ROOT_USER"), os.environ.get("MINIO_ROOT_PASSWORD")
    if not user or not password:
        sys.stderr.write("MINIO_ROOT_USER and MINIO_ROOT_PASSWORD must be set, as for MinIO\n")
        return 2
    serve(host or "127.0.0.1", int(port), user, password)
    return 0


if __name__ == "__main__":
    sys.exit(main())
