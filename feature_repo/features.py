"""The Feast repository's objects, for the `feast` CLI (`feast apply`, `feast ui`).

They are defined in `lakehouse.ml.definitions`; this file builds them for the storage the
LAKEHOUSE_* settings name, and gives the CLI's DuckDB the offline extensions (and the S3
secret). Imports go one way: this repository uses the lakehouse, never the reverse.
"""

from __future__ import annotations

from lakehouse.ml.definitions import build
from lakehouse.ml.features import prepare_duckdb
from lakehouse.settings import Settings
from lakehouse.storage import Storage

_settings = Settings.from_env()
_storage = Storage.from_settings(_settings)
prepare_duckdb(_settings, _storage)
_defs = build(_storage)

applicant = _defs.applicant
application = _defs.application
application_features = _defs.application_features
applicant_features = _defs.applicant_features
applicant_profile = _defs.applicant_profile
loan_approval_v1 = _defs.loan_approval_v1
