"""The lakehouse's error hierarchy: every message names the problem and the fix."""


def first_line(exc: BaseException) -> str:
    """Return an exception's first line of text (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def described(exc: BaseException) -> str:
    """Return `Type: first line`, or just `Type` when the exception has no text."""
    name = type(exc).__name__
    return f"{name}: {first_line(exc)}" if str(exc).strip() else name


class LakehouseError(Exception):
    """Base class: the CLI prints the message on one line and exits with `exit_code`."""

    exit_code = 1


class ConfigError(LakehouseError):
    """A setting is missing or has a bad value."""

    exit_code = 2


class UsageError(LakehouseError):
    """A command was called with bad arguments."""

    exit_code = 2


class SourceError(LakehouseError):
    """The source Postgres cannot be reached or is not set up as needed."""


class StorageError(LakehouseError):
    """The object store or local folder holding the Delta tables is unusable."""


class TableNotFoundError(LakehouseError):
    """A table that a command needs does not exist (yet)."""


class SqlError(LakehouseError):
    """A query is invalid, or tries to write through the read-only SQL command."""


class PipelineError(LakehouseError):
    """A pipeline run failed; the Luigi summary says which task."""
