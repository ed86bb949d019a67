"""`lakehouse maintain`: compact small files, write checkpoints and vacuum old files."""

from __future__ import annotations

from dataclasses import dataclass

from lakehouse.errors import StorageError, first_line
from lakehouse.storage import Storage


@dataclass(frozen=True)
class MaintainResult:
    """What maintenance did to one table."""

    table: str
    files_removed: int
    files_added: int
    vacuumed: int
    version: int


def maintain(storage: Storage, *, retention_hours: int) -> list[MaintainResult]:
    """Compact, checkpoint and vacuum every table, keeping `retention_hours` of time travel.

    Compaction only rewrites files (the data does not change); vacuum deletes files that
    no version inside the retention window needs, so time travel to those versions works.

    Gold tables are not compacted: each build writes a gold table whole, in files of its
    own size, so there is nothing to gain; and a build replaces the files it read, so a
    compaction landing in between would survive beside the build's files, every row
    twice (delta-rs does not see the two commits as conflicting).
    """
    from lakehouse import catalog

    # The _meta tables take one small commit per pipeline run and per verification.
    tables = storage.list_tables() + catalog.meta_tables(storage)
    results = []
    for zone, name in tables:
        dt = storage.table(zone, name)
        try:
            metrics = dt.optimize.compact() if zone != "gold" else {}
            dt.create_checkpoint()
            vacuumed = dt.vacuum(
                retention_hours=retention_hours,
                dry_run=False,
                enforce_retention_duration=False,
            )
            dt.cleanup_metadata()
        except Exception as exc:
            # Most often a writer committed to the table meanwhile: the compaction is
            # discarded (the data is untouched) and the next run tries again.
            msg = (
                f"maintaining {zone}.{name} failed ({first_line(exc)}); the table is unchanged: "
                "rerun `lakehouse maintain` (a pipeline run committing at the same time is the "
                "usual cause)"
            )
            raise StorageError(msg) from exc
        results.append(
            MaintainResult(
                table=f"{zone}.{name}",
                files_removed=int(metrics.get("numFilesRemoved", 0)),
                files_added=int(metrics.get("numFilesAdded", 0)),
                vacuumed=len(vacuumed),
                version=dt.version(),
            )
        )
    return results
