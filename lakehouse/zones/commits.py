"""Recording progress in Delta commits themselves, so completion checks are cheap and exact."""

from __future__ import annotations

from collections.abc import Mapping

from deltalake import CommitProperties, DeltaTable, Transaction

from lakehouse import __version__


def app_id(zone: str, table: str, source: str = "") -> str:
    """Return the Delta app id under which `zone.table` records its progress (from `source`)."""
    base = f"lakehouse.{zone}.{table}"
    return f"{base}<-{source}" if source else base


def recorded(dt: DeltaTable | None, app: str) -> int | None:
    """Return the version recorded under `app` in the table's log, or None."""
    if dt is None:
        return None
    version = dt.transaction_version(app)
    return None if version is None else int(version)


def commit_properties(
    progress: Mapping[str, int], *, operation: str, metadata: Mapping[str, str] | None = None
) -> CommitProperties:
    """Build commit properties that record `progress` atomically with the data."""
    return CommitProperties(
        app_transactions=[Transaction(app, version) for app, version in progress.items()],
        custom_metadata={
            "lakehouse.operation": operation,
            "lakehouse.version": __version__,
            **{f"lakehouse.progress.{k}": str(v) for k, v in progress.items()},
            **(metadata or {}),
        },
    )
