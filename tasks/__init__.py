"""Luigi tasks: ingest bronze, promote silver, build gold, and the `Pipeline` wrapper.

Run with `luigi --module tasks Pipeline --local-scheduler` (or against `luigid`).
Completion is read from the Delta log (app transaction versions), so finished work is
skipped without scanning data.

Importing this module applies the lakehouse's Luigi settings (`tasks.configure`): the
`luigi` command line offers no other hook before it builds its worker, and `lakehouse run`
makes the same call itself.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable
from contextvars import ContextVar
from functools import cache
from typing import TypeVar

import luigi

from lakehouse import environment
from lakehouse.errors import LakehouseError, described, first_line
from lakehouse.settings import Settings
from lakehouse.source.schema import TABLES
from lakehouse.storage import Storage, opened_once
from lakehouse.transforms.gold import ALL_GOLD, GOLD, MONITORING
from lakehouse.zones import bronze, gold, gold_marks, silver
from tasks.config import configure

_log = logging.getLogger("luigi-interface")
COMPLETION_ERRORS: list[BaseException] = []
T = TypeVar("T", bound=luigi.Task)


_CHECKED: ContextVar[dict[str, bool] | None] = ContextVar("lakehouse_checked", default=None)


def _recorded(complete: Callable[[T], bool]) -> Callable[[T], bool]:
    """Keep a failed completion check's error for `lakehouse run`'s one-line message.

    Luigi itself keeps only the traceback text. One check (with the checks of its inputs,
    recursively) opens each Delta table once and checks each task once: every task checks
    its inputs first, so the sources' checks ran once per path through the graph, and a
    run with nothing to do took 28 s on S3, 9-13 s of it opening the same tables again.
    """

    @functools.wraps(complete)
    def check(self: T) -> bool:
        checked = _CHECKED.get()
        if checked is not None and self.task_id in checked:
            return checked[self.task_id]
        token = None
        if checked is None:  # the outermost check: its own tables and results
            checked = {}
            token = _CHECKED.set(checked)
        try:
            # The outermost check opens its own tables (never a caller's, which a writer
            # may have moved); the checks of its inputs run inside it.
            with opened_once() if token is not None else contextlib.nullcontext():
                checked[self.task_id] = done = complete(self)
            return done
        except Exception as exc:
            # Each task checks its inputs first, so one failure rises through every
            # dependent's check: said once, by the task that failed.
            if not any(seen is exc for seen in COMPLETION_ERRORS):
                COMPLETION_ERRORS.append(exc)
                # One line with the cause, above the traceback Luigi logs next (a plain
                # `luigi` run showed only "failed scheduling" in its summary).
                why = first_line(exc) if isinstance(exc, LakehouseError) else described(exc)
                _log.error("%s could not check what is done: %s", self, why)
            raise
        finally:
            if token is not None:
                _CHECKED.reset(token)

    return check


def forget_context() -> None:
    """Read the settings again at the next task: a new run in this process may have others.

    Worker processes start empty; in-process runs (`lakehouse run`, tests) call this first.
    """
    _context.cache_clear()


@cache
def _context() -> tuple[Settings, Storage]:
    environment.private_files()
    settings = Settings.from_env()
    if "LAKEHOUSE_HOME" not in os.environ:
        _log.warning(
            "lakehouse home: %s (LAKEHOUSE_HOME is not set: the current folder's .lakehouse)",
            settings.home,
        )
    # Before the first task reads from S3 (lakehouse.environment says why).
    environment.export_for_feast(settings)
    storage = Storage.from_settings(settings)
    storage.check()
    return settings, storage


class _Task(luigi.Task):
    """A task is complete only if its inputs are *and* its own output is current.

    Without this, new source rows would never trigger a run: gold built from the current
    silver looks complete although bronze is behind the source.
    """

    def output_current(self) -> bool:
        """Tell whether this task's own Delta output is up to date."""
        raise NotImplementedError

    @_recorded
    def complete(self) -> bool:
        # Inputs first: an output's check may read its inputs (the ML tasks compare the
        # versions they were built from), which need not exist before their tasks ran.
        return (
            all(dep.complete() for dep in luigi.task.flatten(self.requires()))
            and self.output_current()
        )


class IngestBronze(_Task):
    """Append the source rows changed since the last batch to `bronze.<table>`."""

    table = luigi.ChoiceParameter(choices=sorted(TABLES))

    def requires(self) -> list[luigi.Task]:
        if self.table == "applicants":
            # Applicants are extracted after the applications, from a later snapshot: every
            # application's applicant (the foreign key guarantees it existed then) is in.
            return [IngestBronze(table="loan_applications")]
        return []

    def output_current(self) -> bool:
        settings, storage = _context()
        return bronze.is_current(settings, storage, self.table)

    def run(self) -> None:
        settings, storage = _context()
        result = bronze.ingest(settings, storage, self.table)
        self.set_status_message(f"{result.mode}: {result.rows} rows, {result.deletes} deletes")


class PromoteSilver(_Task):
    """Validate and merge new bronze batches into `silver.<table>` and its history."""

    table = luigi.ChoiceParameter(choices=sorted(TABLES))

    def requires(self) -> list[luigi.Task]:
        deps: list[luigi.Task] = [IngestBronze(table=self.table)]
        if self.table == "loan_applications":
            # The applicant_exists rule checks against the promoted applicants.
            deps.append(PromoteSilver(table="applicants"))
        return deps

    def output_current(self) -> bool:
        _, storage = _context()
        return silver.is_current(storage, self.table)

    def run(self) -> None:
        _, storage = _context()
        result = silver.promote(storage, self.table)
        self.set_status_message(f"rows {result.rows}; rejects {result.rejects_by_rule}")


class BuildGold(_Task):
    """Bring `gold.<name>` to the current silver versions (and the gold it reads).

    Built whole, or for a feature table, the rows of the entities a change touched
    replaced (`lakehouse.zones.gold_update`).
    """

    name = luigi.ChoiceParameter(choices=sorted(ALL_GOLD))

    def requires(self) -> list[luigi.Task]:
        sources = ALL_GOLD[self.name].sources
        gold_inputs = [BuildGold(name=s.split(".", 1)[1]) for s in sources if s.startswith("gold.")]
        log_input = [PredictionLog()] if "bronze.predictions" in sources else []
        return [*(PromoteSilver(table=t) for t in sorted(TABLES)), *gold_inputs, *log_input]

    def output_current(self) -> bool:
        _, storage = _context()
        return gold_marks.is_current(storage, self.name)

    def run(self) -> None:
        settings, storage = _context()
        if ALL_GOLD[self.name].references:
            # The ML side provides the drift references and registers them on import.
            from lakehouse.ml.monitor import drift  # noqa: F401
        gold.build(settings, storage, self.name)


class PredictionLog(_Task):
    """The API's inference log `bronze.predictions` exists (the monitoring marts read it).

    Created empty when no API has landed a prediction yet.
    """

    def output_current(self) -> bool:
        _, storage = _context()
        return storage.exists("bronze", "predictions")

    def run(self) -> None:
        from lakehouse.ml.monitor import inference_log

        inference_log.ensure_table(_context()[1])


class ApplyFeatures(_Task):
    """Register the Feast repository (`feast apply`); complete once the service exists."""

    def output_current(self) -> bool:
        from lakehouse.ml import tasks as ml_tasks

        return ml_tasks.applied(*_context())

    def run(self) -> None:
        from lakehouse.ml import tasks as ml_tasks

        ml_tasks.apply(*_context())


class Materialize(_Task):
    """Load the gold feature values into Feast's online store, incrementally."""

    def requires(self) -> list[luigi.Task]:
        return [ApplyFeatures(), *[BuildGold(name=n) for n in sorted(GOLD)]]

    def output_current(self) -> bool:
        from lakehouse.ml import tasks as ml_tasks

        return ml_tasks.materialized(*_context())

    def run(self) -> None:
        from lakehouse.ml import tasks as ml_tasks

        ml_tasks.materialize(*_context())


class BuildTrainingSet(_Task):
    """Build the training set through Feast (point in time) and store it with its manifest."""

    def requires(self) -> list[luigi.Task]:
        return [ApplyFeatures(), *[BuildGold(name=n) for n in sorted(GOLD)]]

    def output_current(self) -> bool:
        from lakehouse.ml import tasks as ml_tasks

        return ml_tasks.training_set_built(*_context())

    def run(self) -> None:
        from lakehouse.ml import tasks as ml_tasks

        manifest = ml_tasks.build_training_set(*_context())
        self.set_status_message(f"training set {manifest['sha256'][:12]}: {manifest['rows']} rows")


class Train(_Task):
    """Fit a new model version on the stored training set's stratified split.

    With it, the comparison model without the leaky feature; the version is complete (and
    served) once evaluated.
    """

    def requires(self) -> BuildTrainingSet:
        return BuildTrainingSet()

    def output_current(self) -> bool:
        from lakehouse.ml import tasks as ml_tasks

        return ml_tasks.fitted(*_context())

    def run(self) -> None:
        from lakehouse.ml import tasks as ml_tasks

        self.set_status_message(f"fitted version {ml_tasks.fit(*_context())}")


class Evaluate(_Task):
    """Evaluate the fitted version on its hold-out; write its metrics and lineage.

    From then on the version is complete, listed and served.
    """

    def requires(self) -> Train:
        return Train()

    def output_current(self) -> bool:
        from lakehouse.ml import tasks as ml_tasks

        return ml_tasks.trained(*_context())

    def run(self) -> None:
        from lakehouse.ml import tasks as ml_tasks

        result = ml_tasks.evaluate(*_context())
        self.set_status_message(f"model {result.version}: {result.metrics['test']}")


class Pipeline(luigi.WrapperTask):
    """Everything: bronze, silver and gold for every table, then (with `ml`) features and model."""

    ml = luigi.BoolParameter(default=True, parsing=luigi.BoolParameter.EXPLICIT_PARSING)  # type: ignore[call-arg]

    def requires(self) -> list[luigi.Task]:
        data: list[luigi.Task] = [BuildGold(name=n) for n in sorted(GOLD)]
        if not self.ml:
            return data
        # The marts over the inference log: predictions joined to their outcomes, and
        # each model version's daily quality.
        monitoring = [BuildGold(name=n) for n in sorted(MONITORING)]
        return [*data, Materialize(), Evaluate(), *monitoring]

    @_recorded
    def complete(self) -> bool:
        # Luigi checks the wrapper first: one check of the whole graph, each task and
        # table once, and a run with nothing to do stops there.
        return bool(super().complete())


configure()

__all__ = [
    "ApplyFeatures",
    "BuildGold",
    "BuildTrainingSet",
    "Evaluate",
    "IngestBronze",
    "Materialize",
    "Pipeline",
    "PromoteSilver",
    "Train",
    "configure",
    "forget_context",
]
