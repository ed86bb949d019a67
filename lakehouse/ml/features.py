"""Feast wiring: the repository, its environment, and S3 access for its DuckDB offline store.

The repository lives in the `feature_repo` package (shipped in the wheel). Its
`feature_store.yaml` reads `${LAKEHOUSE_HOME}`; every command exports that (and the
Postgres online store's connection when selected) from the settings when it starts
(`lakehouse.environment`), so Feast and the rest of the lakehouse always agree on where
things are.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lakehouse import duck
from lakehouse.environment import export_for_feast
from lakehouse.errors import LakehouseError, UsageError
from lakehouse.settings import Settings
from lakehouse.storage import Storage

if TYPE_CHECKING:
    from feast import FeatureStore

SERVICE = "loan_approval_v1"


def _not_the_file_registry_warning(record: logging.LogRecord) -> bool:
    # Feast warns that `serve_features_while_materializing` "typically has no effect" on a
    # file registry; it does have one (feast.utils reads it from any registry), and the
    # lakehouse's registry relies on it (see feature_store.yaml).
    return "serve_features_while_materializing` is enabled but" not in record.getMessage()


logging.getLogger("feast.repo_config").addFilter(_not_the_file_registry_warning)


def _unchecked(target: Any = None, **_: Any) -> Any:
    return target if target is not None else (lambda t: t)


def import_feast() -> None:
    """Import Feast without typeguard instrumenting its classes as they load.

    Feast decorates its classes with typeguard's `@typechecked`, which re-parses and
    recompiles each one's source at import time: 6-10 s of a 2-core machine's time before
    the first feature is read, in every process (the API, each Luigi worker). The checks
    are a development aid (typeguard skips them under `python -O`); the lakehouse's feature
    definitions are still checked by the `feast` CLI, which imports Feast as usual. Only
    Feast's own import runs with the no-op; typeguard is restored for everything else.
    """
    if "feast" in sys.modules:
        return
    try:
        import typeguard
    except ImportError:  # a Feast release without typeguard
        import feast

        return
    checked = typeguard.typechecked
    typeguard.typechecked = _unchecked
    try:
        import feast  # noqa: F401
    finally:
        typeguard.typechecked = checked


def _quiet_ibis() -> None:
    # ibis (under Feast's DuckDB offline store) calls a method DuckDB 1.5 deprecates. Set
    # after importing Feast, whose modules put their own DeprecationWarning filter first.
    warnings.filterwarnings("ignore", message=".*fetch_arrow_table", category=DeprecationWarning)


class FeatureStoreError(LakehouseError):
    """Feast cannot do what was asked; the message says what to run."""


def repo_path() -> Path:
    """Return the folder of the Feast repository (the `feature_repo` package).

    Found, not imported: the repository imports the lakehouse, never the reverse.
    """
    import importlib.util

    spec = importlib.util.find_spec("feature_repo")
    if spec is None or spec.origin is None:
        msg = "the `feature_repo` package is missing; reinstall the project: pip install ."
        raise UsageError(msg)
    return Path(spec.origin).resolve().parent


def prepare_duckdb(settings: Settings, storage: Storage) -> None:
    """Give Feast's DuckDB (the ibis default backend) the offline extensions and S3 secret.

    Feast's own `s3_endpoint_override` breaks `delta_scan`, so the secret goes on the
    connection instead; the extensions come from the same wheels as `lakehouse sql`.
    """
    import duckdb
    import ibis

    # Also into DuckDB's default extension directory, where the `feast` CLI's DuckDB
    # looks: it cannot download them here, and they are the same signed binaries.
    default = duckdb.connect()
    try:
        for name in ["delta"] + (["httpfs", "aws"] if storage.is_s3 else []):
            duck.load_extension(default, name)
    finally:
        default.close()
    backend: Any = ibis.get_backend()
    con = backend.con
    ext_dir = settings.home / "duckdb_extensions"
    ext_dir.mkdir(parents=True, exist_ok=True)
    con.execute(f"SET extension_directory = {duck.literal(str(ext_dir))}")
    con.execute("SET TimeZone = 'UTC'")
    for name in ["delta"] + (["httpfs", "aws"] if storage.is_s3 else []):
        duck.load_extension(con, name)
    if storage.is_s3:
        duck.create_secret(con, settings, storage)


def feature_store(settings: Settings, storage: Storage) -> FeatureStore:
    """Open the Feast store for these settings (local disk or S3)."""
    import_feast()
    from feast import FeatureStore

    _quiet_ibis()
    (settings.home / "feast").mkdir(parents=True, exist_ok=True)
    # A no-op when the command exported it at start, as every command does (see there).
    export_for_feast(settings)
    prepare_duckdb(settings, storage)
    yaml = "feature_store.postgres.yaml" if settings.feast_online_store == "postgres" else None
    path = repo_path()
    if yaml:
        return FeatureStore(fs_yaml_file=path / yaml)
    return FeatureStore(repo_path=str(path))


def definitions() -> list[Any]:
    """Return the repository's Feast objects, built for the current environment."""
    from lakehouse.ml.definitions import build

    # Sources follow LAKEHOUSE_STORAGE_URI, as the `feast` CLI's repository does.
    return build(Storage.from_settings(Settings.from_env())).all()


def apply(store: FeatureStore) -> list[str]:
    """Register the repository's objects (what `feast apply` does); return their names."""
    objects = definitions()
    store.apply(objects)
    return sorted(o.name for o in objects)


def require_applied(store: FeatureStore) -> None:
    """Fail with the fix when the repository has not been applied."""
    try:
        store.get_feature_service(SERVICE)
    except Exception:  # Feast raises several types for a missing registry or object
        msg = f"the feature service `{SERVICE}` is not registered; run `lakehouse features apply`"
        raise FeatureStoreError(msg) from None


def check_repo_is_shipped() -> None:
    """Fail clearly if Feast is missing (it is a dependency; this catches broken installs)."""
    try:
        import_feast()
    except ImportError as exc:
        msg = f"Feast is not installed ({exc}); reinstall the project: pip install ."
        raise UsageError(msg) from None
