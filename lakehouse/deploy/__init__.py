"""Deployments: the compose file read as data, and its rehearsal without a container engine.

`compose` reads a compose file as `docker compose` would (anchors, merges, `.env`
interpolation, `depends_on` conditions, the project image's Dockerfile). `rehearse` starts
every service of it as a local process (`supervisor`) and checks that the whole system
converges (`converge`, through `probes`); `postgres`, `s3` and `mc` play the parts no
wheel carries: the postgres image's entrypoint, MinIO, and its `mc` client.
"""
