"""`lakehouse sql`, `tables` and `status`: read-only views of the lakehouse."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from lakehouse import log
from lakehouse.settings import Settings


def sql(settings: Settings, args: argparse.Namespace) -> int:
    """Run one read-only DuckDB query over the Delta tables; rows on standard output."""
    from lakehouse import sql as query
    from lakehouse.storage import Storage

    storage = Storage.from_settings(settings)
    storage.check()
    if args.format == "table":
        answer = query.run_query(
            settings,
            storage,
            args.query,
            as_of_version=args.as_of_version,
            max_rows=args.max_rows,
            timeout=args.timeout,
        )
        sys.stdout.write(query.render(answer))
    else:
        query.export_query(
            settings,
            storage,
            args.query,
            args.format,
            sys.stdout,
            as_of_version=args.as_of_version,
            timeout=args.timeout,
        )
    return 0


def tables(settings: Settings, args: argparse.Namespace) -> int:
    """List tables with version, rows, size and last update."""
    from lakehouse import catalog
    from lakehouse.sql import QueryResult, render
    from lakehouse.storage import Storage

    storage = Storage.from_settings(settings)
    storage.check()
    infos = catalog.describe(storage, meta=True)
    rows = [
        (
            f"{i.zone}.{i.name}",
            i.version,
            i.rows,
            i.files,
            catalog.human_size(i.size_bytes),
            i.last_update.strftime("%Y-%m-%d %H:%M:%S UTC") if i.last_update else "",
        )
        for i in infos
    ]
    sys.stdout.write(
        render(QueryResult(["table", "version", "rows", "files", "size", "last update"], rows))
    )
    return 0


def status(settings: Settings, args: argparse.Namespace) -> int:
    """Tables and freshness, the CDC slots, the last runs, the model: a table or JSON."""
    from lakehouse import status as state_of
    from lakehouse.ml import status as ml_status
    from lakehouse.storage import Storage

    storage = Storage.from_settings(settings)
    storage.check(create_bucket=False)
    state = state_of.collect(settings, storage, ml_status.features)
    if args.format == "json":
        text = json.dumps(state.to_dict(), default=_json_default, indent=2) + "\n"
    else:
        text = state_of.render(state)
    sys.stdout.write(log.redact(text))
    return 0


def _json_default(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else str(value)
