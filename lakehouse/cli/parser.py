"""The `lakehouse` commands and their options; each command names its handler."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from lakehouse.cli import ml, pipeline, query, source, stream
from lakehouse.errors import UsageError
from lakehouse.settings import Settings

Handler = Callable[[Settings, argparse.Namespace], int]
HANDLERS: dict[str, Handler] = {
    "demo": pipeline.demo,
    "db": source.db,
    "seed": source.seed,
    "simulate": source.simulate,
    "run": pipeline.run,
    "sql": query.sql,
    "tables": query.tables,
    "verify": pipeline.verify,
    "status": query.status,
    "stream": stream.stream,
    "features": ml.features,
    "train": ml.train,
    "models": ml.models,
    "serve": ml.serve,
    "predictions": ml.predictions,
    "report": ml.report,
    "maintain": pipeline.maintain,
}
"""Each command's handler, by area: a handler takes the settings and the parsed options."""


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        msg = f"`{text}` is not a whole number"
        raise argparse.ArgumentTypeError(msg) from None
    if value < 1:
        msg = f"`{text}` must be at least 1"
        raise argparse.ArgumentTypeError(msg)
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        msg = f"`{text}` is not a number"
        raise argparse.ArgumentTypeError(msg) from None
    if value <= 0:
        msg = f"`{text}` must be above 0"
        raise argparse.ArgumentTypeError(msg)
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        msg = f"{self.prog}: {message}"
        raise UsageError(msg)


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser."""
    parser = _Parser(
        prog="lakehouse",
        description="A single-node lakehouse for ML: Postgres -> Delta bronze/silver/gold.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and Luigi logs")
    parser.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="text lines, or one JSON object per event (default LAKEHOUSE_LOG_FORMAT, text)",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("demo", help="start Postgres, seed, run the pipeline, print a summary")
    p.add_argument(
        "--rows", type=_positive_int, default=45_000, help="rows to seed (default 45,000)"
    )
    p.add_argument("--workers", type=_positive_int, default=1, help="Luigi workers")

    p = sub.add_parser("db", help="the embedded Postgres (or check the configured one)")
    p.add_argument("action", choices=["start", "stop", "status", "url"])
    p.add_argument("--show-password", action="store_true", help="with `url`: include it")

    p = sub.add_parser("seed", help="create the lending schema and load the dataset")
    p.add_argument(
        "--rows",
        type=_positive_int,
        default=45_000,
        help="rows to load; above 45,000 they are drawn from the dataset",
    )
    p.add_argument("--reset", action="store_true", help="drop and reload the source schema")

    p = sub.add_parser("simulate", help="write a realistic change stream to the source")
    p.add_argument(
        "--changes",
        type=_positive_int,
        help="how many changes (default 1,000); a new customer's first application also "
        "inserts the applicant",
    )
    p.add_argument(
        "--rate",
        type=_positive_float,
        help="changes per second, for --duration seconds or until SIGTERM/Ctrl-C",
    )
    p.add_argument("--duration", type=_positive_float, help="seconds to run at --rate")
    p.add_argument(
        "--batch-size", type=_positive_int, default=100, help="changes per source transaction"
    )
    p.add_argument(
        "--seed",
        type=int,
        help="repeat a run's mix of changes (default: a new one each call, or LAKEHOUSE_SEED; "
        "the seed used is printed)",
    )

    p = sub.add_parser("run", help="run the Luigi pipeline (bronze, silver, gold, features, model)")
    p.add_argument("--workers", type=_positive_int, default=1)
    p.add_argument("--no-ml", action="store_true", help="stop at gold (no Feast, no training)")
    p.add_argument("--scheduler-host", help="use a luigid central scheduler at this host")
    p.add_argument("--scheduler-port", type=_positive_int, default=8082)
    p.add_argument(
        "--every",
        type=_positive_float,
        metavar="SECONDS",
        help="run again every SECONDS until SIGTERM/Ctrl-C (a failed run is retried)",
    )

    p = sub.add_parser("sql", help="run a read-only DuckDB query over bronze/silver/gold")
    p.add_argument("query")
    p.add_argument(
        "--format",
        choices=["table", "csv", "json"],
        default="table",
        help="table (aligned), csv, or json: JSON Lines, one object per row",
    )
    p.add_argument("--as-of-version", type=int, help="time travel: read version N of each table")
    p.add_argument(
        "--max-rows",
        type=_positive_int,
        default=100,
        help="rows fetched and shown in table format (default 100); csv and json stream all",
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SECONDS",
        help="stop the query after SECONDS (default: no limit); Ctrl-C stops it too",
    )

    sub.add_parser("tables", help="list tables with version, rows, size and last update")

    p = sub.add_parser(
        "verify",
        help="compare silver with the source (keys and a checksum per column); --repair fixes",
    )
    p.add_argument("--table", choices=["applicants", "loan_applications"], help="one table only")
    p.add_argument(
        "--repair", action="store_true", help="re-read the differing keys from the source"
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for the stream to land up to the comparison point (default 60)",
    )

    p = sub.add_parser(
        "status", help="tables and their freshness, the CDC slots, the last pipeline runs, model"
    )
    p.add_argument("--format", choices=["table", "json"], default="table")

    p = sub.add_parser(
        "stream",
        help="CDC: stream source changes into bronze (setup|run|status|alive|teardown)",
    )
    p.add_argument(
        "action",
        nargs="?",
        default="run",
        choices=["run", "setup", "status", "alive", "teardown"],
        help="run (default): stream until SIGTERM/Ctrl-C; setup: publications, slots and "
        "the aligned snapshot; status: slot lag and freshness; alive: exit 0 if the "
        "stream running with this home has turned within --max-age (a liveness probe); "
        "teardown: drop them",
    )
    p.add_argument(
        "--max-age",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with alive: the oldest heartbeat that counts as alive (default 120)",
    )
    p.add_argument(
        "--promote",
        action="store_true",
        help="with run: also merge each micro-batch into silver and refresh the online "
        "features it touched",
    )
    p.add_argument(
        "--setup",
        action="store_true",
        help="with run: first set up the slots and snapshot if they are missing",
    )

    p = sub.add_parser("features", help="Feast: register the repository, or materialize")
    p.add_argument("action", choices=["apply", "materialize"])

    sub.add_parser("train", help="train, evaluate and register a loan-approval model")
    sub.add_parser("models", help="list registered model versions with their metrics")

    p = sub.add_parser("predictions", help="the inference log: explain a logged prediction")
    p.add_argument("action", choices=["explain"])
    p.add_argument("request_id", help="the request id the API answered with (X-Request-ID)")
    p.add_argument("--format", choices=["table", "json"], default="table")

    p = sub.add_parser(
        "report", help="write one self-contained HTML page of figures: rows, freshness, model"
    )
    p.add_argument("--output", default="report.html", help="file to write (default report.html)")

    p = sub.add_parser("serve", help="the prediction API (FastAPI + uvicorn)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_positive_int, default=8000)
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="server processes (each loads the model and opens the online store)",
    )

    p = sub.add_parser("maintain", help="compact, checkpoint and vacuum every table")
    p.add_argument(
        "--retention-hours",
        type=int,
        help="time travel to keep (default LAKEHOUSE_VACUUM_RETENTION_HOURS)",
    )
    p.add_argument(
        "--every",
        type=_positive_float,
        metavar="SECONDS",
        help="maintain again every SECONDS until SIGTERM/Ctrl-C",
    )
    for name, command_parser in sub.choices.items():
        command_parser.set_defaults(handler=HANDLERS[name])
    # The global options are accepted after the command too (`lakehouse run --debug`).
    for command_parser in sub.choices.values():
        command_parser.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
        command_parser.add_argument(
            "--log-format",
            choices=["text", "json"],
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
        )
    return parser
