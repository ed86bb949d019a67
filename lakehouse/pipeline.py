"""Run the Luigi pipeline in-process, with progress lines and one-line failures."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import luigi
import luigi.execution_summary
import luigi.rpc

from lakehouse import log
from lakehouse.errors import LakehouseError, PipelineError
from lakehouse.storage import Storage


@dataclass
class PipelineRun:
    """Which tasks ran, which were already done, and how long it took."""

    ran: list[str] = field(default_factory=list)
    already_done: list[str] = field(default_factory=list)
    elsewhere: list[str] = field(default_factory=list)
    """Tasks another worker of the same central scheduler ran meanwhile."""
    seconds: float = 0.0


def run_pipeline(
    *,
    workers: int = 1,
    scheduler_host: str | None = None,
    scheduler_port: int | None = None,
    progress: Callable[[str], None] | None = None,
    debug: bool = False,
    ml: bool = True,
    record: Storage | None = None,
) -> PipelineRun:
    """Build `tasks.Pipeline`; raise `PipelineError` naming the first failed task.

    With `ml`, the pipeline goes on to Feast (apply, materialize) and training. With
    `record`, the run's outcome is appended to `_meta.pipeline_runs` there (for `lakehouse
    status`), failed runs included; a failure to record only warns.
    """
    from lakehouse import runs

    started = runs.now()
    outcome, ran, error = "failed", [], None
    try:
        run = _run(
            workers=workers,
            scheduler_host=scheduler_host,
            scheduler_port=scheduler_port,
            progress=progress,
            debug=debug,
            ml=ml,
        )
        outcome, ran = ("ran" if run.ran else "up to date"), run.ran
        return run
    except LakehouseError as exc:
        error = str(exc)
        raise
    finally:
        if record is not None:
            try:
                runs.record(record, runs.RunRecord(started, runs.now(), outcome, ran, error))
            except Exception as exc:  # the run's own outcome matters more
                log.event(
                    "pipeline.record_failed",
                    f"warning: could not record the run in _meta.pipeline_runs: {exc}",
                    level="warning",
                )


def _run(
    *,
    workers: int,
    scheduler_host: str | None,
    scheduler_port: int | None,
    progress: Callable[[str], None] | None,
    debug: bool,
    ml: bool,
) -> PipelineRun:
    import tasks

    tasks.configure()  # also made on import; explicit here, where the run is built
    tasks.forget_context()  # an earlier run in this process may have had other settings

    failures: list[str] = []
    tasks.COMPLETION_ERRORS.clear()
    started: dict[str, float] = {}

    def on_start(task: luigi.Task) -> None:
        started[task.task_id] = time.monotonic()

    def on_success(task: luigi.Task) -> None:
        if progress and not isinstance(task, luigi.WrapperTask):
            took = time.monotonic() - started.get(task.task_id, time.monotonic())
            progress(f"  done  {_label(task)} ({took:.1f}s)")

    def on_failure(task: luigi.Task, exc: BaseException) -> None:
        reason = str(exc) if isinstance(exc, LakehouseError) else f"{type(exc).__name__}: {exc}"
        failures.append(f"{_label(task)} failed: {reason}")

    handlers: list[tuple[str, Callable[..., Any]]] = [
        (luigi.Event.START, on_start),
        (luigi.Event.SUCCESS, on_success),
        (luigi.Event.FAILURE, on_failure),
        (luigi.Event.BROKEN_TASK, on_failure),
    ]
    for event, handler in handlers:
        luigi.Task.event_handler(event)(handler)
    params: dict[str, Any] = {
        "workers": workers,
        "detailed_summary": True,
        "log_level": "DEBUG" if debug else "CRITICAL",
    }
    if scheduler_host:
        params["scheduler_host"] = scheduler_host
        params["scheduler_port"] = scheduler_port or 8082
    else:
        params["local_scheduler"] = True
    start = time.monotonic()
    try:
        result = luigi.build([tasks.Pipeline(ml=ml)], **params)
    except luigi.rpc.RPCError:
        port = params.get("scheduler_port")
        msg = (
            f"the Luigi scheduler at {scheduler_host}:{port} is not reachable; start "
            f"`luigid --port {port}` there or fix --scheduler-host/--scheduler-port"
        )
        raise PipelineError(msg) from None
    finally:
        for event, handler in handlers:
            luigi.Task._event_callbacks.get(luigi.Task, {}).get(event, set()).discard(handler)
    summary = luigi.execution_summary._summary_dict(result.worker)
    if tasks.COMPLETION_ERRORS:
        first = tasks.COMPLETION_ERRORS[0]
        if isinstance(first, LakehouseError):
            raise first
        msg = f"checking what is done failed: {type(first).__name__}: {first}"
        raise PipelineError(msg)
    if failures or summary.get("failed") or summary.get("scheduling_error"):
        detail = (
            failures[0]
            if failures
            else (
                "a task could not be scheduled (its completion check or requirements failed); "
                "rerun with --debug for Luigi's summary"
            )
        )
        raise PipelineError(detail)
    elsewhere = summary.get("run_by_other_worker", set()) | summary.get("not_run", set())
    # NOT_RUN: the central scheduler gave some tasks to another worker (another `lakehouse
    # run` or `luigi` process), which is how several runners share the work, not a failure.
    shared = result.status == luigi.LuigiStatusCode.NOT_RUN and scheduler_host
    if (
        result.status
        not in (
            luigi.LuigiStatusCode.SUCCESS,
            luigi.LuigiStatusCode.SUCCESS_WITH_RETRY,
        )
        and not shared
    ):
        msg = f"the pipeline did not finish ({result.status.name}); rerun with --debug for details"
        raise PipelineError(msg)
    return PipelineRun(
        ran=sorted(
            _label(t)
            for t in summary.get("completed", set())
            if not isinstance(t, luigi.WrapperTask)
        ),
        already_done=sorted(_label(t) for t in summary.get("already_done", set())),
        elsewhere=sorted(_label(t) for t in elsewhere if not isinstance(t, luigi.WrapperTask)),
        seconds=time.monotonic() - start,
    )


def _label(task: luigi.Task) -> str:
    params = ",".join(str(v) for v in task.param_kwargs.values())
    return f"{task.get_task_family()}({params})"
