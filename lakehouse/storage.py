"""Where the Delta tables live: local disk or S3/MinIO, with options built once from settings."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError as DeltaTableNotFound

from lakehouse.environment import s3_options
from lakehouse.errors import StorageError, TableNotFoundError, first_line
from lakehouse.settings import Settings

ZONES = ("bronze", "silver", "gold")
_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


class KeptTables:
    """Tables one thread keeps open between uses, brought up to date at each use.

    Opening a table reads its last checkpoint and replays the commits since: 5-20 ms on
    local disk, more on S3 or a busy machine. Bringing an open one up to date reads only
    the new commits (under a millisecond locally). For the stream's loops, which use the
    same few tables every second. Not for sharing between threads.
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._tables: dict[str, tuple[DeltaTable, bytes | None]] = {}

    def latest(self, zone: str, table: str) -> DeltaTable:
        """Return `zone.table` at its newest version (`TableNotFoundError` if none).

        A kept table is used only if the log entry of the version it holds is still the
        one it read: a table deleted and created again (its log restarted) is opened
        anew, where `update_incremental` alone would mix the two tables' states.
        """
        uri = self.storage.uri(zone, table)
        kept = self._tables.get(uri)
        if kept is not None:
            dt, entry = kept
            try:
                if entry is not None and self._entry(zone, table, dt) == entry:
                    dt.update_incremental()
                    self._tables[uri] = (dt, self._entry(zone, table, dt))
                    return dt
            except Exception:  # noqa: S110 (gone or unreadable: open it again below)
                pass
        dt = self.storage.table(zone, table, fresh=True)
        self._tables[uri] = (dt, self._entry(zone, table, dt))
        return dt

    def _entry(self, zone: str, table: str, dt: DeltaTable) -> bytes | None:
        return self.storage.commit_log(zone, table, dt.version())


_OPENED: ContextVar[tuple[dict[tuple[str, int | None], DeltaTable], KeptTables | None] | None] = (
    ContextVar("lakehouse_opened", default=None)
)


@contextmanager
def opened_once(kept: KeptTables | None = None) -> Iterator[None]:
    """Open each table once in this block (this thread only), and reuse it after.

    One silver promotion opened the same bronze tables three times (its end marks, the
    count, the read), a dozen opens per speed-layer cycle. Inside the block,
    `Storage.table` returns the object opened first, so every read of the block also
    sees one snapshot of each table. A write through such an object moves it to the
    version it committed, which is then what the block reads (also a lazy scan made
    before the write and collected after it: collect first); `fresh=True` opens anew
    (to see other writers' commits). With `kept` (or an enclosing block's), a table's
    first use in the block takes it from there, brought up to date, instead of opening it.
    """
    outer = _OPENED.get()
    if kept is None and outer is not None:
        kept = outer[1]
    token = _OPENED.set(({}, kept))
    try:
        yield
    finally:
        _OPENED.reset(token)


@dataclass(frozen=True)
class Storage:
    """The root of the lakehouse and the options every Delta call needs."""

    root: str
    options: dict[str, str]
    s3: dict[str, str]

    @classmethod
    def from_settings(cls, settings: Settings) -> Storage:
        """Build storage options once; credentials come only from settings, never implicitly."""
        root = settings.warehouse.rstrip("/")
        if root.startswith("file://"):
            root = root[len("file://") :]
        if not settings.is_s3:
            return cls(root=str(Path(root).resolve()), options={}, s3={})
        options = s3_options(settings)
        s3 = {"region": settings.s3_region}
        if "AWS_ENDPOINT_URL" in options:
            s3["endpoint"] = options["AWS_ENDPOINT_URL"]
        return cls(root=root, options=options, s3=s3)

    @property
    def is_s3(self) -> bool:
        """Tell whether the tables are on S3."""
        return self.root.startswith("s3://")

    def uri(self, zone: str, table: str) -> str:
        """Return the URI of `zone.table`."""
        if zone not in ZONES and zone != "_meta":
            msg = f"unknown zone `{zone}`; use one of {', '.join(ZONES)}"
            raise TableNotFoundError(msg)
        if not _NAME.match(table):
            msg = f"bad table name `{table}`; use lower-case letters, digits and underscores"
            raise TableNotFoundError(msg)
        return f"{self.root}/{zone}/{table}"

    def exists(self, zone: str, table: str) -> bool:
        """Tell whether `zone.table` is a Delta table."""
        # Not DeltaTable.is_deltatable: against some S3 servers (moto) it retries for minutes.
        return self.table_or_none(zone, table) is not None

    def table(
        self, zone: str, table: str, *, version: int | None = None, fresh: bool = False
    ) -> DeltaTable:
        """Open `zone.table`, or raise `TableNotFoundError` saying how to create it.

        Inside `opened_once`, a table already opened there is returned as it is (unless
        `fresh`); at a `version`, only an object still at that version.
        """
        block = None if fresh else _OPENED.get()
        uri = self.uri(zone, table)
        if block is None:
            return self._open(zone, table, version)
        opened, kept = block
        for key in ((uri, version), (uri, None)):
            found = opened.get(key)
            if found is not None and (version is None or found.version() == version):
                return found
        if version is None and kept is not None:
            dt = kept.latest(zone, table)
        else:
            dt = self._open(zone, table, version)
        opened[(uri, version)] = dt
        return dt

    def _open(self, zone: str, table: str, version: int | None) -> DeltaTable:
        try:
            return DeltaTable(self.uri(zone, table), version=version, storage_options=self.options)
        except DeltaTableNotFound:
            msg = f"table `{zone}.{table}` does not exist yet; run `lakehouse run` to build it"
            raise TableNotFoundError(msg) from None
        except Exception as exc:
            if version is not None and "version" in str(exc).lower():
                msg = f"table `{zone}.{table}` has no version {version}: {first_line(exc)}"
                raise TableNotFoundError(msg) from None
            raise StorageError(explain(exc, self.root)) from exc

    def table_or_none(self, zone: str, table: str, *, fresh: bool = False) -> DeltaTable | None:
        """Open `zone.table` if it exists."""
        try:
            return self.table(zone, table, fresh=fresh)
        except TableNotFoundError:
            return None

    def commit_log(self, zone: str, table: str, version: int) -> bytes | None:
        """Return the Delta log entry of one version (its JSON lines), or None if gone.

        Read directly, not through delta-rs's `history()`, which holds the GIL while it
        lists the log over HTTP (a deadlock against an S3 server in the same process).
        """
        name = f"_delta_log/{version:020d}.json"
        if not self.is_s3:
            path = Path(self.uri(zone, table)) / name
            return path.read_bytes() if path.is_file() else None
        from minio.error import S3Error

        bucket, key = _split_s3(f"{self.uri(zone, table)}/{name}")
        client = minio_client(self.s3, self.options)
        try:
            response = client.get_object(bucket, key)
        except S3Error as exc:
            if exc.code == "NoSuchKey":
                return None
            raise StorageError(explain(exc, self.root)) from exc
        try:
            return bytes(response.read())
        finally:
            response.close()
            response.release_conn()

    def data_version(self, zone: str, table: str, dt: DeltaTable | None = None) -> int:
        """Return the table's newest version that changed its rows (see `commits`)."""
        from lakehouse.zones.commits import data_version

        dt = dt if dt is not None else self.table(zone, table)
        return data_version(dt, lambda v: self.commit_log(zone, table, v))

    def list_tables(self) -> list[tuple[str, str]]:
        """List `(zone, table)` pairs that hold a Delta table."""
        found: list[tuple[str, str]] = []
        for zone in ZONES:
            for name in self._children(zone):
                if _NAME.match(name) and self.exists(zone, name):
                    found.append((zone, name))
        return found

    def _children(self, zone: str) -> list[str]:
        if not self.is_s3:
            path = Path(self.root) / zone
            return sorted(p.name for p in path.iterdir() if p.is_dir()) if path.is_dir() else []
        bucket, prefix = _split_s3(self.root)
        client = minio_client(self.s3, self.options)
        key = f"{prefix}/{zone}/" if prefix else f"{zone}/"
        names = {
            obj.object_name[len(key) :].strip("/")
            for obj in client.list_objects(bucket, prefix=key)
            if obj.is_dir and obj.object_name
        }
        return sorted(names)

    def check(self, *, create_bucket: bool = True) -> None:
        """Check the object store at start-up: endpoint up, keys valid, bucket present."""
        if not self.is_s3:
            try:
                Path(self.root).mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a file, /proc, no permission: a setting to fix
                msg = (
                    f"the warehouse folder `{self.root}` cannot be used ({exc.strerror}); set "
                    "LAKEHOUSE_STORAGE_URI (or LAKEHOUSE_HOME) to a folder you can write"
                )
                raise StorageError(msg) from None
            if not Path(self.root).is_dir():
                msg = (
                    f"the warehouse `{self.root}` is not a folder; set LAKEHOUSE_STORAGE_URI "
                    "(or LAKEHOUSE_HOME) to a folder you can write"
                )
                raise StorageError(msg)
            return
        bucket, _ = _split_s3(self.root)
        client = minio_client(self.s3, self.options)
        endpoint = self.s3.get("endpoint", "AWS S3")
        try:
            if not client.bucket_exists(bucket):
                if not create_bucket:
                    msg = (
                        f"bucket `{bucket}` does not exist at {endpoint}; `lakehouse run` "
                        "creates it (or fix LAKEHOUSE_STORAGE_URI)"
                    )
                    raise StorageError(msg)
                client.make_bucket(bucket, location=self.s3["region"])
        except StorageError:
            raise
        except Exception as exc:
            raise StorageError(explain(exc, endpoint)) from exc


def minio_client(s3: dict[str, str], options: dict[str, str]) -> Any:
    """Return a MinIO SDK client for the configured endpoint."""
    import urllib3
    from minio import Minio

    endpoint = s3.get("endpoint", "https://s3.amazonaws.com")
    parts = urlsplit(endpoint)
    # Fail fast on a dead endpoint: two quick retries rather than urllib3's long backoff.
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=3, read=30),
        retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]),
    )
    return Minio(
        parts.netloc,
        access_key=options["AWS_ACCESS_KEY_ID"],
        secret_key=options["AWS_SECRET_ACCESS_KEY"],
        secure=parts.scheme == "https",
        region=s3["region"],
        http_client=http,
    )


def _split_s3(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    return parts.netloc, parts.path.strip("/")


def explain(exc: BaseException, where: str) -> str:
    """Turn a client error into one line that says what to do."""
    text = str(exc)
    lowered = text.lower()
    code = getattr(exc, "code", "") or ""
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied") or any(
        s in lowered
        for s in ("invalidaccesskeyid", "signaturedoesnotmatch", "access denied", "403")
    ):
        return (
            f"S3 at {where} refused the credentials ({code or 'forbidden'}); check "
            "LAKEHOUSE_S3_ACCESS_KEY_ID and LAKEHOUSE_S3_SECRET_ACCESS_KEY"
        )
    if any(
        s in lowered
        for s in (
            "connection refused",
            "max retries",
            "failed to connect",
            "name or service",
            "error sending request",
            "connect error",
            "timed out",
        )
    ):
        return f"S3 endpoint {where} is not reachable; start it or fix LAKEHOUSE_S3_ENDPOINT"
    return f"storage error at {where}: {first_line(exc)}"
