"""`lakehouse features`, `train`, `models` and `serve`: the feature store and the model."""

from __future__ import annotations

import argparse
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lakehouse import log
from lakehouse.errors import LakehouseError, described
from lakehouse.settings import Settings

if TYPE_CHECKING:  # imported when a command runs: `lakehouse --help` stays quick
    from lakehouse.storage import Storage


def _guarded(settings: Settings, args: argparse.Namespace, work: Callable[[Storage], int]) -> int:
    """Run an ML command: Feast, the online store and scikit-learn fail in one line."""
    from lakehouse.ml import features
    from lakehouse.storage import Storage

    features.check_repo_is_shipped()
    storage = Storage.from_settings(settings)
    storage.check()
    try:
        return work(storage)
    except LakehouseError:
        raise
    except Exception as exc:
        if args.debug:
            raise
        msg = (
            f"`lakehouse {args.command}` failed: {described(exc)}; "
            "rerun with --debug for the traceback"
        )
        raise LakehouseError(msg) from None


def features(settings: Settings, args: argparse.Namespace) -> int:
    """Register the Feast repository, or materialize the online store."""
    from lakehouse.ml import tasks as ml_tasks

    def work(storage: Storage) -> int:
        if args.action == "apply":
            names = ml_tasks.apply(settings, storage)
            log.event(
                "features.apply",
                f"registered {len(names)} Feast objects: {', '.join(names)}",
                objects=names,
            )
        else:
            done = ml_tasks.materialize(settings, storage)
            log.event(
                "features.materialize",
                f"online store holds feature values up to {done.end:%Y-%m-%d %H:%M:%S} UTC "
                f"({done.summary()})",
                up_to=done.end,
                views=[vars(w) for w in done.views],
            )
        return 0

    return _guarded(settings, args, work)


def train(settings: Settings, args: argparse.Namespace) -> int:
    """Train, evaluate and register a model version."""
    from lakehouse.ml import models
    from lakehouse.ml import tasks as ml_tasks

    def work(storage: Storage) -> int:
        result = ml_tasks.train(settings, storage)
        log.event(
            "train.done",
            f"model {models.MODEL} version {result.version}\n{models.summary(result.metrics)}",
            model=models.MODEL,
            version=result.version,
            metrics=result.metrics["test"],
        )
        return 0

    return _guarded(settings, args, work)


def models(settings: Settings, args: argparse.Namespace) -> int:
    """List registered model versions with their metrics."""
    from lakehouse.ml import models as registry

    def work(storage: Storage) -> int:
        entries = registry.describe(storage)
        if not entries:
            log.event("models.empty", "no model yet; run `lakehouse train`")
        for entry in entries:
            log.event(
                "models.version",
                f"{entry['version']}  {registry.summary(entry['metrics'])}",
                version=entry["version"],
                metrics=entry["metrics"]["test"],
            )
        return 0

    return _guarded(settings, args, work)


def predictions(settings: Settings, args: argparse.Namespace) -> int:
    """Explain a logged prediction: its features, model lineage and a point-in-time replay."""
    import json
    import sys

    from lakehouse.ml.monitor import explain

    def work(storage: Storage) -> int:
        explained = explain.explain(settings, storage, args.request_id)
        if args.format == "json":
            text = json.dumps(explained, default=_json_default, indent=2) + "\n"
        else:
            text = explain.render(explained)
        sys.stdout.write(log.redact(text))
        return 0

    return _guarded(settings, args, work)


def report(settings: Settings, args: argparse.Namespace) -> int:
    """Write the HTML report: rows and rejects, freshness, the model, quality and drift."""
    from pathlib import Path

    from lakehouse.report import data, page

    def work(storage: Storage) -> int:
        text = page.render(data.collect(settings, storage), settings)
        written = page.write(text, Path(args.output))
        log.event("report.written", f"report written to {written}", path=str(written))
        return 0

    return _guarded(settings, args, work)


def _json_default(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def serve(settings: Settings, args: argparse.Namespace) -> int:
    """Serve the prediction API until SIGTERM or Ctrl-C; exit 0."""

    def work(storage: Storage) -> int:
        import uvicorn

        from lakehouse.ml.serve import create_app

        # One process builds the app here (errors surface before serving); several run
        # uvicorn's factory in each worker process, from the same environment.
        app: Any = create_app(settings) if args.workers == 1 else "lakehouse.ml.serve:app_from_env"
        log.event(
            "serve.start",
            f"serving the prediction API on http://{args.host}:{args.port} with "
            f"{args.workers} worker(s) (docs at /docs)",
            host=args.host,
            port=args.port,
            workers=args.workers,
        )
        # In JSON, uvicorn's records go through the root logger's JSON handler.
        log_config = None if log.is_json() else uvicorn.config.LOGGING_CONFIG
        # uvicorn drains, restores the handlers it found, then raises the signal again:
        # with these, that lands here and `serve` exits 0 like the other services.
        for stop_signal in (signal.SIGTERM, signal.SIGINT):
            signal.signal(stop_signal, lambda *_: None)
        uvicorn.run(
            app,
            host=args.host,
            port=args.port,
            workers=args.workers,
            factory=args.workers > 1,
            log_level="warning",
            log_config=log_config,
        )
        return 0

    return _guarded(settings, args, work)
