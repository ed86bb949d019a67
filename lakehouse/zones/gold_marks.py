"""What a gold build records in its commit, and reading it back: is the table current.

Each build commits progress marks (`commits.commit_properties`) beside its files, so the
answer is in the table itself, read in one place with its data and never out of step:
- per input, the data version it read (`lakehouse maintain` commits are no new input);
- a fingerprint of the table's definition, its SQL and its code (`definition`);
- a fingerprint of the inputs' Delta table ids: a table deleted and written again counts
  its versions anew, and its version 40 is not the old one's.

Luigi asks `is_current` on every completeness check, so it opens each input once.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass

from deltalake import DeltaTable

from lakehouse import __version__
from lakehouse.errors import TableNotFoundError
from lakehouse.storage import Storage
from lakehouse.transforms.gold import ALL_GOLD
from lakehouse.zones.commits import app_id, fingerprint, recorded
from lakehouse.zones.silver_state import as_one_promotion_left


@dataclass(frozen=True)
class Inputs:
    """The inputs of one gold build, pinned, by source (`table`, `gold.table`, ...)."""

    versions: dict[str, int]
    """Data versions: recorded, so that a maintenance commit is no new input."""
    reads: dict[str, int]
    """Current versions: the same rows as `versions`, whose files exist (a vacuum may
    have removed those of the data version)."""
    ids: dict[str, str]
    """Delta table ids: which tables these version numbers count in."""

    @property
    def mark(self) -> int:
        """Return the ids as one number: recorded as a progress mark, read with the rest."""
        return fingerprint(json.dumps(self.ids, sort_keys=True))


def located(source: str) -> tuple[str, str]:
    """Return (zone, table) of a gold source: `table` (silver), `gold.table` or `bronze.table`."""
    zone, _, table = source.rpartition(".")
    return (zone or "silver"), table


def pinned(storage: Storage, name: str) -> Inputs:
    """Pin the inputs of `gold.<name>` at their current versions, opening each once."""
    versions: dict[str, int] = {}
    reads: dict[str, int] = {}
    ids: dict[str, str] = {}
    sources = ALL_GOLD[name].sources
    silver = [t for z, t in map(located, sources) if z == "silver"]
    # Never half a promotion (the stream's may be committing): a table's targets agree.
    consistent = as_one_promotion_left(storage, silver)
    for source in sources:
        zone, table = located(source)
        dt = consistent.get(table) if zone == "silver" else storage.table_or_none(zone, table)
        if dt is None:
            msg = f"gold.{name} needs `{zone}.{table}`, which does not exist; run the pipeline"
            raise TableNotFoundError(msg)
        versions[source], reads[source] = storage.data_version(zone, table, dt), dt.version()
        ids[source] = str(dt.metadata().id)
    return Inputs(versions, reads, ids)


def definition(name: str) -> int:
    """Return a fingerprint of `gold.<name>`'s definition: its SQL, its code, what it reads.

    Recorded with every build: a table built by another definition (an upgrade changed
    its SQL, say added a column) is not current, whatever its inputs, and is rebuilt once.
    The code counts too: the Polars transforms (their module's text) and the lakehouse
    version; so does the definition of a gold table it reads. Otherwise an update by
    touched entities (`gold_update`) would leave the other rows as the old code made them.
    """
    spec = ALL_GOLD[name]
    gold_sources = [s for s in spec.sources if located(s)[0] == "gold"]
    text = "\n".join(
        [
            spec.sql,
            *spec.sources,
            *(d.sql for d in spec.derived),
            spec.references or "",
            __version__,
            _TRANSFORMS_TEXT,
            *(str(definition(located(s)[1])) for s in gold_sources),
        ]
    )
    return fingerprint(text)


def _transforms_text() -> str:
    """Return the text of the modules gold's Polars transforms live in ("" if unreadable)."""
    from lakehouse.transforms import gold as transforms
    from lakehouse.transforms import segments

    try:
        return "\n".join(inspect.getsource(m) for m in (transforms, segments))
    except (OSError, TypeError):  # installed without sources: the version alone
        return ""


_TRANSFORMS_TEXT = _transforms_text()


def progress(name: str, inputs: Inputs) -> dict[str, int]:
    """Return the progress marks a build of `gold.<name>` over `inputs` commits."""
    marks = {_source_app(name, src): v for src, v in inputs.versions.items()}
    marks[_definition_app(name)] = definition(name)
    marks[_ids_app(name)] = inputs.mark
    return marks


def is_current(storage: Storage, name: str) -> bool:
    """Tell whether `gold.<name>` is its definition over its inputs' current versions (cheap).

    The same silver tables, too: one deleted and promoted again counts its versions anew.
    """
    dt = storage.table_or_none("gold", name)
    if not same_definition(dt, name):  # before opening the inputs
        return False
    try:
        inputs = pinned(storage, name)
    except TableNotFoundError:
        return False
    return _same_versions(dt, name, inputs) and same_tables(dt, name, inputs)


def current(dt: DeltaTable | None, name: str, inputs: Inputs) -> bool:
    """Tell whether `dt`, read as `gold.<name>`, was built by this definition over `inputs`."""
    return (
        same_definition(dt, name)
        and _same_versions(dt, name, inputs)
        and same_tables(dt, name, inputs)
    )


def _same_versions(dt: DeltaTable | None, name: str, inputs: Inputs) -> bool:
    return all(recorded(dt, _source_app(name, s)) == v for s, v in inputs.versions.items())


def same_definition(dt: DeltaTable | None, name: str) -> bool:
    """Tell whether `dt` (`gold.<name>`) was built by this version's `definition`."""
    return dt is not None and recorded(dt, _definition_app(name)) == definition(name)


def same_tables(dt: DeltaTable | None, name: str, inputs: Inputs) -> bool:
    """Tell whether `dt` (`gold.<name>`) was built from the tables `inputs` are, by id.

    Not from tables deleted and written again since: the versions it recorded
    (`built_from`) would then name states of other tables.
    """
    return recorded(dt, _ids_app(name)) == inputs.mark


def same_inputs(storage: Storage, name: str) -> bool:
    """Tell whether `gold.<name>` was last built from the tables its inputs are now."""
    try:
        inputs = pinned(storage, name)
    except TableNotFoundError:
        return False
    return same_tables(storage.table_or_none("gold", name), name, inputs)


def built_from(storage: Storage, name: str, dt: DeltaTable | None = None) -> dict[str, int]:
    """Return the data versions of the silver tables `gold.<name>` was last built from."""
    dt = dt if dt is not None else storage.table_or_none("gold", name)
    out = {}
    for source in ALL_GOLD[name].sources:
        zone, table = located(source)
        version = recorded(dt, _source_app(name, source))
        if zone == "silver" and version is not None:
            out[table] = version
    return out


def inputs_mark(dt: DeltaTable | None, name: str) -> int | None:
    """Return which tables `gold.<name>` (`dt`) was built from, as one number (None: unknown).

    A different number: another incarnation of an input (deleted and written again).
    """
    return recorded(dt, _ids_app(name))


def newer_than(storage: Storage, name: str, versions: dict[str, int]) -> bool:
    """Tell whether gold.<name> was built from inputs at least as new as `versions`."""
    dt = storage.table_or_none("gold", name)
    return dt is not None and all(
        (recorded(dt, _source_app(name, src)) or -1) >= v for src, v in versions.items()
    )


def _source_app(name: str, source: str) -> str:
    zone, table = located(source)
    return app_id("gold", name, f"{zone}.{table}")


def _definition_app(name: str) -> str:
    return app_id("gold", name, "definition")


def _ids_app(name: str) -> str:
    return app_id("gold", name, "input-ids")
