"""Events for people (plain lines) or for log shippers (one JSON object per line).

Every event goes through `redact` first: the secret settings' values, passwords inside
connection strings and `password=` pairs are replaced by `****`. In JSON, the records of
the libraries underneath (Luigi, uvicorn, Feast) become JSON lines too, redacted alike.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from lakehouse.settings import Settings

FORMATS = ("text", "json")
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]+@", re.IGNORECASE)
_PAIR_PASSWORD = re.compile(
    r"(\b(?:password|secret_access_key|aws_secret_access_key)\s*[=:]\s*)('[^']*'|\"[^\"]*\"|\S+)",
    re.IGNORECASE,
)


class _State:
    format = "text"
    secrets: frozenset[str] = frozenset()


def configure(fmt: str, settings: Settings | None = None) -> None:
    """Choose the format and learn the secret values to hide; route library logs too."""
    if fmt not in FORMATS:
        msg = f"unknown log format `{fmt}`"
        raise ValueError(msg)
    _State.format = fmt
    if settings is not None:
        _State.secrets = frozenset(s for s in _secret_values(settings) if len(s) >= 4)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_lakehouse", False)]:
        root.removeHandler(old)
    if fmt == "json":  # plain text leaves the libraries' own logging as it is
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_JsonFormatter())
        handler._lakehouse = True  # type: ignore[attr-defined]
        root.addHandler(handler)


def _secret_values(settings: Settings) -> list[str]:
    from psycopg.conninfo import conninfo_to_dict

    values = [settings.s3_secret_access_key.get()]
    for dsn in (settings.pg_dsn.get(), settings.feast_pg_dsn.get()):
        if not dsn:
            continue
        values.append(dsn)
        try:
            password = conninfo_to_dict(dsn).get("password")
        except Exception:  # a malformed DSN fails elsewhere, with its own message
            password = None
        if password:
            values.append(str(password))
    return [v for v in values if v]


def redact(text: str) -> str:
    """Hide secrets: known secret values, URL passwords and `password=` pairs."""
    for secret in sorted(_State.secrets, key=len, reverse=True):
        text = text.replace(secret, "****")
    text = _URL_PASSWORD.sub(r"\1****@", text)
    return _PAIR_PASSWORD.sub(r"\1****", text)


def is_json() -> bool:
    """Tell whether events are JSON lines."""
    return _State.format == "json"


def event(name: str, message: str, *, level: str = "info", **fields: Any) -> None:
    """Emit one event: the message as a line, or a JSON object with the fields.

    Errors and warnings go to standard error, everything else to standard output.
    """
    stream: TextIO = sys.stderr if level in ("error", "warning") else sys.stdout
    if _State.format == "json":
        record: dict[str, Any] = {
            "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "level": level,
            "event": name,
            "message": redact(message),
        }
        for key, value in fields.items():
            record[key] = _clean(value)
        stream.write(json.dumps(record, default=str) + "\n")
    else:
        stream.write(redact(message) + "\n")
    stream.flush()


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if value is None or isinstance(value, bool | int | float):
        return value
    return redact(str(value))


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": "log",
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        if record.exc_info:
            out["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, default=str)
