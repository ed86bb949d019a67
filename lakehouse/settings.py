"""One typed settings object, read from `LAKEHOUSE_*` environment variables."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from lakehouse.errors import ConfigError

PREFIX = "LAKEHOUSE_"
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class Secret:
    """A string that never shows itself in reprs, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get(self) -> str:
        """Return the secret value; call this only where it is handed to a client."""
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __repr__(self) -> str:
        return "Secret('****')" if self._value else "Secret('')"

    __str__ = __repr__


def _default_home() -> str:
    return str(Path.cwd() / ".lakehouse")


# ---------------------------------------------------------------- parsers
# Each takes the variable's name (for the message) and its text, and returns the value or
# raises `ConfigError` naming the variable and the fix. Every field names its own parser.

Parser = Callable[[str, str], Any]


def _text(var: str, raw: str) -> str:
    return raw


def _whole(low: int) -> Parser:
    def parse(var: str, raw: str) -> int:
        try:
            value = int(raw.replace("_", ""))
        except ValueError:
            msg = f"{var} is `{raw}`; it must be a whole number"
            raise ConfigError(msg) from None
        if value < low:
            msg = f"{var} is `{raw}`; it must be at least {low}"
            raise ConfigError(msg)
        return value

    return parse


def _seconds(var: str, raw: str) -> float:
    try:
        seconds = float(raw)
    except ValueError:
        msg = f"{var} is `{raw}`; it must be a number of seconds"
        raise ConfigError(msg) from None
    if not 0.01 <= seconds <= 3600:
        msg = f"{var} is `{raw}`; give between 0.01 and 3600 seconds"
        raise ConfigError(msg)
    return seconds


def _positive(var: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        msg = f"{var} is `{raw}`; give a positive number"
        raise ConfigError(msg)
    return value


def _choice(*options: str) -> Parser:
    def parse(var: str, raw: str) -> str:
        if raw not in options:
            listed = " or ".join(f"`{o}`" for o in options)
            msg = f"{var} is `{raw}`; use {listed}"
            raise ConfigError(msg)
        return raw

    return parse


def _probability(var: str, raw: str) -> float:
    try:
        probability = float(raw)
    except ValueError:
        probability = -1.0
    if not 0 < probability < 1:
        msg = f"{var} is `{raw}`; give a probability between 0 and 1"
        raise ConfigError(msg)
    return probability


def _size(var: str, raw: str) -> str:
    if not re.fullmatch(r"\d+(\.\d+)?\s*(KB|MB|GB|TB|KiB|MiB|GiB|TiB)", raw, re.IGNORECASE):
        msg = f"{var} is `{raw}`; give a size like `2GB` or `512MB`"
        raise ConfigError(msg)
    return raw


def _path(var: str, raw: str) -> Path:
    return Path(raw).expanduser().resolve()


def _identifier(var: str, raw: str) -> str:
    if not raw.replace("_", "").isalnum() or raw[0].isdigit():
        msg = (
            f"{var} is `{raw}`; use letters, digits and underscores only, not starting with a digit"
        )
        raise ConfigError(msg)
    return raw


def _secret(var: str, raw: str) -> Secret:
    return Secret(raw)


def _by(parse: Parser) -> dict[str, Parser]:
    """Field metadata naming the parser of the field's variable."""
    return {"parse": parse}


@dataclass(frozen=True)
class Settings:
    """Everything the lakehouse reads from its environment.

    Each field `name` is read from `LAKEHOUSE_<NAME>` by the parser declared with it; the
    defaults need no set-up: local Delta tables under `.lakehouse/warehouse` and an
    embedded Postgres cluster under `.lakehouse/postgres`.
    """

    home: Path = field(default_factory=lambda: Path(_default_home()), metadata=_by(_path))
    """Folder for the embedded Postgres cluster, local tables and caches."""
    storage_uri: str = field(default="", metadata=_by(_text))
    """Where Delta tables live: a local folder (default `<home>/warehouse`) or `s3://bucket/prefix`."""
    s3_endpoint: str = field(default="", metadata=_by(_text))
    """S3-compatible endpoint, e.g. `http://localhost:9000` for MinIO; empty for AWS."""
    s3_region: str = field(default="us-east-1", metadata=_by(_text))
    s3_access_key_id: str = field(default="", metadata=_by(_text))
    s3_secret_access_key: Secret = field(default_factory=lambda: Secret(""), metadata=_by(_secret))
    pg_dsn: Secret = field(default_factory=lambda: Secret(""), metadata=_by(_secret))
    """Source Postgres DSN; empty means the embedded cluster (`lakehouse db start`)."""
    pg_schema: str = field(default="lending", metadata=_by(_identifier))
    """Postgres schema holding the source tables."""
    pg_bin: str = field(default="", metadata=_by(_text))
    """Folder with initdb/pg_ctl for the embedded cluster; found automatically when empty."""
    batch_rows: int = field(default=250_000, metadata=_by(_whole(1)))
    """Rows per Arrow batch when extracting from Postgres (bounds memory)."""
    seed: int | None = field(default=None, metadata=_by(_whole(0)))
    """Random seed: `lakehouse seed` and training draw with it (42 when unset); `lakehouse
    simulate` writes a new mix each call unless it is set."""
    vacuum_retention_hours: int = field(default=168, metadata=_by(_whole(0)))
    """`lakehouse maintain` keeps this much time travel."""
    duckdb_memory: str = field(default="2GB", metadata=_by(_size))
    """DuckDB's memory limit; larger queries spill to `<home>/duckdb_tmp`."""
    feast_online_store: str = field(default="sqlite", metadata=_by(_choice("sqlite", "postgres")))
    """Feast's online store: `sqlite` (under `<home>/feast`) or `postgres`."""
    feast_pg_dsn: Secret = field(default_factory=lambda: Secret(""), metadata=_by(_secret))
    """With `postgres`: the online store's server and role; empty means LAKEHOUSE_PG_DSN."""
    model_threshold: float = field(default=0.5, metadata=_by(_probability))
    """Probability above which `lakehouse serve` answers `approve`."""
    prediction_log: str = field(default="on", metadata=_by(_choice("on", "off")))
    """`on`: `lakehouse serve` lands every prediction in `bronze.predictions`; `off`: none."""
    prediction_log_seconds: float = field(default=10.0, metadata=_by(_seconds))
    """The API lands its buffered predictions this often (each landing costs the requests
    served meanwhile: fewer, larger ones cost less, BENCHMARKS.md)."""
    prediction_log_records: int = field(default=10_000, metadata=_by(_whole(1)))
    """... and as soon as this many are waiting (also the most one commit holds)."""
    prediction_log_capacity: int = field(default=100_000, metadata=_by(_whole(1)))
    """Predictions the API holds while the table cannot be written; past it, they are
    counted as dropped (serving never waits for the log)."""
    drift_psi: float = field(default=0.2, metadata=_by(_positive))
    """`lakehouse status` flags a numeric feature whose day's PSI against the serving model's
    training set is above this (0.1-0.25: a shift worth a look; above 0.25: a new population)."""
    drift_js: float = field(default=0.1, metadata=_by(_positive))
    """... a categorical feature whose Jensen-Shannon distance (base 2, 0 to 1) is above this."""
    drift_missing: float = field(default=0.1, metadata=_by(_positive))
    """... a feature whose share of missing values is this much above its training share."""
    quality_auc_margin: float = field(default=0.05, metadata=_by(_positive))
    """... a model whose day's ROC AUC is this much below its evaluation ROC AUC."""
    monitor_min_count: int = field(default=100, metadata=_by(_whole(1)))
    """Fewest predictions (for drift) or outcomes (for AUC) a day needs to be judged: fewer
    give estimates too noisy to flag on."""
    stream_batch_rows: int = field(default=100_000, metadata=_by(_whole(1)))
    """CDC: a micro-batch closes at this many changes (also splits huge transactions)."""
    stream_batch_seconds: float = field(default=1.0, metadata=_by(_seconds))
    """CDC: under a backlog, a micro-batch closes this long after its first change
    (between transactions)."""
    stream_quiet_seconds: float = field(default=0.3, metadata=_by(_seconds))
    """CDC: while the stream keeps up, a micro-batch closes this soon instead: small
    batches and low latency under steady load, large ones to work through a backlog."""
    stream_heartbeat_seconds: float = field(default=5.0, metadata=_by(_seconds))
    """CDC: while a table is idle, record the slot's position this often (a Delta commit)."""
    log_format: str = field(default="text", metadata=_by(_choice("text", "json")))
    """`text` (lines for people) or `json` (one JSON object per event); `--log-format`."""

    @property
    def warehouse(self) -> str:
        """Return the root URI of the Delta tables."""
        return self.storage_uri or str(self.home / "warehouse")

    @property
    def repeatable_seed(self) -> int:
        """Return the seed of what must come out the same each time (the dataset, the split)."""
        return 42 if self.seed is None else self.seed

    @property
    def is_s3(self) -> bool:
        """Tell whether tables live on S3 (or MinIO) rather than local disk."""
        return self.warehouse.startswith("s3://")

    @property
    def embedded_pg(self) -> bool:
        """Tell whether the source is the embedded cluster."""
        return not self.pg_dsn

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read settings from `LAKEHOUSE_*` variables; a bad value names its variable."""
        env = os.environ if environ is None else environ
        known = {PREFIX + f.name.upper(): f for f in fields(cls)}
        # FAILPOINT: fault-injection tests only (lakehouse.failpoints); FEAST_PG_*: derived
        # from LAKEHOUSE_PG_DSN for Feast's YAML by `lakehouse.ml.features`.
        internal = {PREFIX + "FAILPOINT", PREFIX + "FAILPOINT_PAUSE"} | {
            f"{PREFIX}FEAST_PG_{k}"
            for k in ("HOST", "PORT", "DATABASE", "USER", "PASSWORD", "SCHEMA", "SSLMODE")
        }
        unknown = sorted(
            k for k in env if k.startswith(PREFIX) and k not in known and k not in internal
        )
        if unknown:
            msg = f"unknown setting `{unknown[0]}`; known settings are: " + ", ".join(sorted(known))
            raise ConfigError(msg)
        values: dict[str, Any] = {}
        for var, f in known.items():
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            values[f.name] = f.metadata["parse"](var, raw.strip())
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Check cross-field rules; raise `ConfigError` naming the variable."""
        uri = self.warehouse
        if "://" in uri and not uri.startswith(("s3://", "file://")):
            msg = f"LAKEHOUSE_STORAGE_URI is `{uri}`; use a local folder or `s3://bucket/prefix`"
            raise ConfigError(msg)
        if self.is_s3:
            bucket = urlsplit(uri).netloc
            if not _BUCKET.match(bucket):
                msg = (
                    f"LAKEHOUSE_STORAGE_URI is `{uri}`; the bucket name must be 3-63 lower-case "
                    "letters, digits, dots or hyphens: `s3://bucket/prefix`"
                )
                raise ConfigError(msg)
            if not self.s3_access_key_id or not self.s3_secret_access_key:
                msg = (
                    "LAKEHOUSE_STORAGE_URI is on S3 but LAKEHOUSE_S3_ACCESS_KEY_ID or "
                    "LAKEHOUSE_S3_SECRET_ACCESS_KEY is not set; set both (credentials are "
                    "never taken implicitly)"
                )
                raise ConfigError(msg)
        if self.s3_endpoint:
            parts = urlsplit(self.s3_endpoint)
            try:
                port_ok = parts.port is None or parts.port > 0
            except ValueError:  # not a number, or past 65535
                port_ok = False
            if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
                msg = (
                    f"LAKEHOUSE_S3_ENDPOINT is `{self.s3_endpoint}`; "
                    "give a URL like `http://localhost:9000`"
                )
                raise ConfigError(msg)
        for var, secret in (
            ("LAKEHOUSE_PG_DSN", self.pg_dsn),
            ("LAKEHOUSE_FEAST_PG_DSN", self.feast_pg_dsn),
        ):
            dsn = secret.get()
            if dsn and not dsn.startswith(("postgresql://", "postgres://")) and "=" not in dsn:
                msg = (
                    f"{var} is not a Postgres connection string; use "
                    "`postgresql://user:password@host:port/dbname` or `host=... dbname=...`"
                )
                raise ConfigError(msg)
        if self.prediction_log_records > self.prediction_log_capacity:
            msg = (
                f"LAKEHOUSE_PREDICTION_LOG_RECORDS ({self.prediction_log_records}) is more than "
                f"LAKEHOUSE_PREDICTION_LOG_CAPACITY ({self.prediction_log_capacity}): a landing "
                "would never fill; lower the first or raise the second"
            )
            raise ConfigError(msg)
        if self.feast_pg_dsn and self.feast_online_store != "postgres":
            msg = (
                "LAKEHOUSE_FEAST_PG_DSN is set but LAKEHOUSE_FEAST_ONLINE_STORE is "
                f"`{self.feast_online_store}`; set LAKEHOUSE_FEAST_ONLINE_STORE=postgres or "
                "unset the DSN"
            )
            raise ConfigError(msg)
