"""Where each silver target of a table stands, and what the next promotion must do.

A table's silver is three Delta tables (targets): `<table>_rejected`, `<table>_history`
and `<table>` (current), committed in that order, each recording in its own commit the
*marks* of what it has taken in: the last bronze batch, the WAL position below which CDC
changes are in, and (for loan applications) the versions of the applicant tables its
rules were checked against. Delta has no transaction across tables, so a crash, or a
writer that lost a race, can leave the first targets one promotion ahead of the others.
Then the next promotion first *finishes* that one: the same input range, the same
applicant versions, and the lagging targets' own prior state (the leading ones are read
at the version where they had the same marks), so every target ends up exactly as one
uninterrupted promotion would have left it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from deltalake import DeltaTable

from lakehouse.errors import StorageError
from lakehouse.storage import Storage
from lakehouse.zones.bronze import changes_landed, changes_table, last_batch
from lakehouse.zones.commits import app_id, fingerprint, recorded

# Commit order; the first may be ahead of the others, never behind.
TARGETS = ("rejected", "history", "current")
# The applicant tables a loan application's rules read (the context).
CONTEXT_TABLES = ("applicants_history", "applicants_rejected")
# A context entry `<table>#id` holds that table's identity (`context_versions`).
IDENTITY = "#id"


def target_name(table: str, target: str) -> str:
    """Return the silver table name of one target: `applicants`, `applicants_history`, ..."""
    return table if target == "current" else f"{table}_{target}"


@dataclass(frozen=True)
class Marks:
    """What a target has taken in."""

    batch: int | None = None
    """The last bronze batch (its snapshot's LSN)."""
    changes: int | None = None
    """Every CDC change committed below this LSN."""
    context: tuple[tuple[str, int], ...] = ()
    """(table, version) of the applicant tables the rules were checked against, and
    (`<table>#id`, the table's identity): see `context_versions`."""

    def progress(self, table: str, target: str) -> dict[str, int]:
        """Return the app transactions that record these marks in a commit."""
        name = target_name(table, target)
        out = {}
        if self.batch is not None:
            out[app_id("silver", name, f"bronze.{table}")] = self.batch
        if self.changes is not None:
            out[app_id("silver", name, f"bronze.{changes_table(table)}")] = self.changes
        for source, version in self.context:
            out[app_id("silver", name, f"silver.{source}")] = version
        return out

    @property
    def position(self) -> int:
        """The WAL position silver has reached through these marks (0: none)."""
        return max(self.batch or 0, self.changes or 0)


def read_marks(dt: DeltaTable | None, table: str, target: str) -> Marks | None:
    """Read a target's marks from its log (None when the table does not exist)."""
    if dt is None:
        return None
    name = target_name(table, target)
    context = tuple(
        (source, version)
        for source in _context_names(table)
        if (version := recorded(dt, app_id("silver", name, f"silver.{source}"))) is not None
    )
    marks = Marks(
        recorded(dt, app_id("silver", name, f"bronze.{table}")),
        recorded(dt, app_id("silver", name, f"bronze.{changes_table(table)}")),
        context,
    )
    # A table created empty by a writer that has not landed its first load yet: nothing.
    return None if marks == Marks() else marks


@dataclass
class Targets:
    """The three targets of a table as read now: their tables and marks."""

    table: str
    tables: dict[str, DeltaTable | None] = field(default_factory=dict)
    marks: dict[str, Marks | None] = field(default_factory=dict)

    @classmethod
    def read(cls, storage: Storage, table: str) -> Targets:
        """Open every target (the snapshot each commit is checked against).

        They are read against commit order (current first): a writer commits rejected,
        history, current, so a target read later is never behind one read earlier, and
        the view is one a writer could have left, even while writers commit meanwhile.
        """
        out = cls(table)
        for target in reversed(TARGETS):
            dt = storage.table_or_none("silver", target_name(table, target))
            out.tables[target] = dt
            out.marks[target] = read_marks(dt, table, target)
        return out

    def moved(self, storage: Storage) -> bool:
        """Tell whether a writer committed to a target since this view was read."""
        for target in TARGETS:
            dt = storage.table_or_none("silver", target_name(self.table, target), fresh=True)
            was = self.tables[target]
            if (dt is None) != (was is None) or (
                dt is not None and was is not None and dt.version() != was.version()
            ):
                return True
        return False

    @property
    def settled(self) -> Marks | None:
        """The marks every target shares (None: not all targets exist or they differ)."""
        values = {self.marks[t] for t in TARGETS}
        if len(values) != 1:
            return None
        return next(iter(values))

    @property
    def leader(self) -> Marks | None:
        """The marks of the target furthest ahead (the first in commit order that exists)."""
        for target in TARGETS:
            if self.marks[target] is not None:
                return self.marks[target]
        return None


def silver_position(storage: Storage, table: str) -> int:
    """Return the WAL position below which `silver.<table>` (current) reflects the source."""
    dt = storage.table_or_none("silver", table)
    marks = read_marks(dt, table, "current")
    return 0 if marks is None else marks.position


def changes_upto(storage: Storage, table: str) -> int | None:
    """Return the LSN below which CDC changes of `table` may be promoted (None: no CDC).

    That is the end of the last transaction fully landed in `bronze.<table>_changes`.
    Loan applications are also held below what `silver.applicants` reflects, so an
    application is never checked against an applicant state older than itself (one LSN
    cut); before the applicants have any position, no application change is promoted.
    """
    flushed = changes_landed(storage, table)
    if flushed is None:
        return None
    if table == "loan_applications":
        flushed = min(flushed, silver_position(storage, "applicants"))
    return flushed


def wanted(storage: Storage, table: str, context: tuple[tuple[str, int], ...]) -> Marks:
    """Return the marks a fresh promotion would reach now."""
    return Marks(last_batch(storage, table), changes_upto(storage, table), context)


def context_versions(storage: Storage, table: str) -> tuple[tuple[str, int], ...]:
    """Return the versions of the applicant tables (loan applications' rule context).

    With each version, the table's identity (`<table>#id`: its Delta table id as a
    number). A version number names a state of one table: applicant tables deleted and
    promoted again (Troubleshooting's advice) count from 0, and their version 1 is not
    the old tables' version 1, whose applicants the rules were checked against.
    """
    if table != "loan_applications":
        return ()
    out = []
    for source in CONTEXT_TABLES:
        dt = storage.table_or_none("silver", source)
        if dt is not None:
            out.append((source, dt.version()))
            out.append((source + IDENTITY, fingerprint(str(dt.metadata().id))))
    return tuple(out)


def _context_names(table: str) -> tuple[str, ...]:
    if table != "loan_applications":
        return ()
    return tuple(n for source in CONTEXT_TABLES for n in (source, source + IDENTITY))


def at_marks(storage: Storage, table: str, target: str, dt: DeltaTable, marks: Marks) -> DeltaTable:
    """Return `dt` as of the newest version whose marks were `marks` (time travel).

    Only a target that ran ahead needs this, and it is at most one promotion ahead, so
    the search goes back a few commits (maintenance commits keep the marks).
    """
    version = dt.version()
    name = target_name(table, target)
    while version >= 0:
        old = storage.table("silver", name, version=version)
        if read_marks(old, table, target) == marks:
            return old
        version -= 1
    msg = (
        f"silver.{name} is one promotion ahead of the other silver tables of `{table}`, and "
        "the version needed to finish that promotion is gone (vacuumed or never written); "
        f"rebuild silver `{table}`: delete its three tables and `lakehouse run`"
    )
    raise StorageError(msg)


def as_one_promotion_left(storage: Storage, names: list[str]) -> dict[str, DeltaTable]:
    """Open silver tables as a promotion leaves them: a table's targets at the same marks.

    A promotion commits rejected, history, then current, so a reader that opens them while
    one commits can find history moved and current not yet (features joining the two
    would then miss a new application, and nothing would show it again). Current is
    opened first; a history or rejects table read after it is never behind, and when
    ahead it is read at the version with current's marks (`at_marks`). Tables whose
    current is not among `names` are opened as they are; tables that do not exist are
    left out.
    """
    tables = {name: _split(name) for name in names}
    opened: dict[str, DeltaTable | None] = {}
    marks: dict[str, Marks | None] = {}
    for name, (table, target) in tables.items():
        if target == "current":
            opened[name] = dt = storage.table_or_none("silver", name)
            marks[table] = read_marks(dt, table, target)
    for name, (table, target) in tables.items():
        if target == "current":
            continue
        dt = storage.table_or_none("silver", name)
        want = marks.get(table)
        if dt is not None and want is not None and read_marks(dt, table, target) != want:
            dt = at_marks(storage, table, target, dt, want)
        opened[name] = dt
    return {name: dt for name in names if (dt := opened[name]) is not None}


def _split(name: str) -> tuple[str, str]:
    """Return (source table, target) of a silver table name."""
    for target in ("history", "rejected"):
        if name.endswith(f"_{target}"):
            return name[: -len(target) - 1], target
    return name, "current"
