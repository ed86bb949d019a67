"""Recording progress in Delta commits themselves, so completion checks are cheap and exact.

Every writer commits against the table version it read its progress from. delta-rs then
checks, at commit time, every commit made since: one that recorded the same application
transaction (the same progress mark) makes this commit fail (`ConcurrentTransaction`),
as does one that added or removed files this one read. So two writers that start from
the same progress can never both land the same step; the loser learns it at commit time
and nothing of its work is visible. (A lease would also need fencing against a paused
holder; the commit-time check needs none.)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping

from deltalake import CommitProperties, DeltaTable, Transaction
from deltalake.exceptions import CommitFailedError

from lakehouse import __version__
from lakehouse.errors import LakehouseError


class ConcurrentWriteError(LakehouseError):
    """Another writer committed the same step first; this one landed nothing."""


def app_id(zone: str, table: str, source: str = "") -> str:
    """Return the Delta app id under which `zone.table` records its progress (from `source`)."""
    base = f"lakehouse.{zone}.{table}"
    return f"{base}<-{source}" if source else base


#: Table properties every lakehouse table is created with (Delta ignores them on appends to
#: an existing table). A checkpoint every 10 commits instead of Delta's 100: opening a
#: table replays the JSON commits since its last checkpoint, and the stream commits to
#: bronze and silver every second or so. With 100, each open read up to 100 files (25 ms
#: at 70 commits against 5 ms after a checkpoint), and a speed-layer cycle opens a dozen.
TABLE_CONFIGURATION = {"delta.checkpointInterval": "10"}

#: Operations that rewrite or delete files, never what the table holds (`lakehouse maintain`).
MAINTENANCE = frozenset({"OPTIMIZE", "VACUUM START", "VACUUM END"})


def data_version(dt: DeltaTable, read_commit: Callable[[int], bytes | None]) -> int:
    """Return the newest version of the table whose commit changed what it holds.

    `lakehouse maintain` commits compactions and vacuums: new versions, same rows. A
    completion check that compared plain versions took them for new data, and the next
    run rebuilt gold, re-materialized and trained a new model on an identical training
    set. Reading this version gives exactly the rows of the current one. `read_commit`
    returns a version's log entry (None once cleaned up: then all kept are maintenance).
    """
    version = dt.version()
    while version > 0:
        raw = read_commit(version)
        if raw is None or _operation(raw) not in MAINTENANCE:
            return version
        version -= 1
    return version


def _operation(raw: bytes) -> str | None:
    for line in raw.splitlines():
        action = json.loads(line) if line.strip() else {}
        if "commitInfo" in action:
            return str(action["commitInfo"].get("operation"))
    return None


def recorded(dt: DeltaTable | None, app: str) -> int | None:
    """Return the version recorded under `app` in the table's log, or None."""
    if dt is None:
        return None
    version = dt.transaction_version(app)
    return None if version is None else int(version)


def fingerprint(text: str) -> int:
    """Return `text` as a number a progress mark can record (app transactions hold ints)."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def is_conflict(exc: BaseException) -> bool:
    """Tell whether a Delta write failed because another writer committed first."""
    if isinstance(exc, CommitFailedError):
        return True
    text = str(exc).lower()
    # Two writers creating the same table: the second finds version 0 taken.
    return "already exists" in text and ("table" in text or "version" in text)


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
