"""`lakehouse predictions explain`: what a logged prediction used, and whether it replays.

A prediction in `bronze.predictions` holds the exact feature vector the model scored and
the model version. The explanation adds the version's lineage (the Delta version of
every table its training set was built from, the training set's hash) and a *replay*:
the same features rebuilt from the lakehouse as of the prediction's time, through Feast's
point-in-time historical retrieval over the gold tables, compared value by value with
what was served.

- Asked by `application_id`: the feature service's values for the application at
  `served_at` (the row of the application, whose event time is its `applied_at`).
- Asked by `applicant_id` with a loan: the applicant's profile and history as of
  `served_at`, composed with the loan as it was given (from the log) exactly as serving
  composes them (`serve.new_loan_row`).

A difference means the online store served something the lakehouse does not hold as of
that time: the online store was behind (see `features_event_ts` and
`online_refreshed_at`), or gold was rebuilt since with different values for the entity.
Because gold keeps every version of an applicant (SCD type 2 in silver, every change in
`applicant_features`), a change in the source after the prediction does not change the
replay: it still explains the old answer.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

from lakehouse import duck
from lakehouse.errors import LakehouseError
from lakehouse.ml import models
from lakehouse.settings import Settings
from lakehouse.storage import Storage

DAY_TOLERANCE = 1e-6 / 86_400
"""`days_since_last_application` of a new loan moves from the row's time (whole seconds,
as Feast gives it) to `served_at`, in serving and in the replay alike: equal up to the
rounding of `served_at` to the microsecond the log stores."""


class ExplainError(LakehouseError):
    """No such prediction, or nothing to explain it with; the message says why."""


def logged(settings: Settings, storage: Storage, request_id: str) -> list[dict[str, Any]]:
    """Return the logged predictions with this request id (a client may reuse one)."""
    if storage.table_or_none("bronze", "predictions") is None:
        msg = "no prediction has been logged yet (bronze.predictions does not exist)"
        raise ExplainError(msg)
    rows = _query(
        settings,
        storage,
        f"SELECT * FROM {duck.scan(storage.uri('bronze', 'predictions'))} "
        "WHERE request_id = ? ORDER BY served_at",
        [request_id],
    )
    if not rows:
        msg = (
            f"no prediction with request id `{request_id}` in bronze.predictions; the API "
            f"lands its log every {settings.prediction_log_seconds:g} s, so a prediction "
            "just made may not be there yet"
        )
        raise ExplainError(msg)
    return rows


def _plain(value: Any) -> Any:
    """Return a value as JSON would carry it: numpy scalars as Python, NaN and NA as None."""
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    try:
        import pandas as pd

        if value is pd.NA or value is pd.NaT:
            return None
    except ImportError:  # pragma: no cover - pandas comes with Feast
        pass
    return value


def same(feature: str, served: Any, replayed: Any) -> bool:
    """Tell whether a replayed value is the served one (numbers to their precision)."""
    if served is None or replayed is None:
        return served is None and replayed is None
    if isinstance(served, bool) or isinstance(replayed, bool):
        return bool(served) == bool(replayed) and type(served) is type(replayed)
    if isinstance(served, int | float) and isinstance(replayed, int | float):
        tolerance = DAY_TOLERANCE if feature == "days_since_last_application" else 0.0
        return math.isclose(served, replayed, rel_tol=1e-12, abs_tol=tolerance)
    return bool(served == replayed)


def replay(settings: Settings, storage: Storage, prediction: dict[str, Any]) -> dict[str, Any]:
    """Rebuild a prediction's features as of its time through Feast; compare with the log."""
    import pandas as pd

    from lakehouse.ml import features
    from lakehouse.ml.serve import HISTORY, PROFILE, new_loan_row

    served = json.loads(prediction["features"])
    at: datetime = prediction["served_at"]
    store = features.feature_store(settings, storage)
    features.require_applied(store)
    if prediction["application_id"] is not None:
        entity = {"application_id": [prediction["application_id"]]}
        wanted: Any = store.get_feature_service(features.SERVICE)
        tables = [("gold", "application_features")]
    else:
        entity = {"applicant_id": [prediction["applicant_id"]]}
        wanted = [f"applicant_profile:{n}" for n in PROFILE]
        wanted += [f"applicant_features:{n}" for n in HISTORY]
        tables = [("gold", "applicant_features")]
    frame = store.get_historical_features(
        entity_df=pd.DataFrame({**entity, "event_timestamp": [pd.Timestamp(at)]}),
        features=wanted,
    ).to_df()
    row = {k: _plain(v) for k, v in frame.iloc[0].to_dict().items()}
    if prediction["application_id"] is None:
        if row.get("person_income") is None:
            row = {}  # the applicant had no features yet at that time
        else:
            row_at = _applicant_row_time(settings, storage, prediction["applicant_id"], at)
            loan = {k: served.get(k) for k in ("loan_amnt", "loan_intent", "loan_int_rate")}
            row = new_loan_row(row, loan, row_at, at.timestamp())
    compared = [
        {
            "feature": name,
            "served": value,
            "replayed": row.get(name),
            "same": same(name, value, row.get(name)),
        }
        for name, value in served.items()
    ]
    return {
        "as_of": at.isoformat(),
        "read": {f"{z}.{t}": storage.data_version(z, t) for z, t in tables},
        "features": compared,
        "matches": all(c["same"] for c in compared),
    }


def _applicant_row_time(
    settings: Settings, storage: Storage, applicant_id: int, at: datetime
) -> float | None:
    """Return the event time of the applicant's row in force at `at`, in whole seconds.

    Serving moves `days_since_last_application` from that time (Feast gives it in whole
    seconds).
    """
    found = _query(
        settings,
        storage,
        f"SELECT max(event_timestamp) AS at FROM "
        f"{duck.scan(storage.uri('gold', 'applicant_features'))} "
        "WHERE applicant_id = ? AND event_timestamp <= ?",
        [applicant_id, at],
    )
    if not found or found[0]["at"] is None:
        return None
    return float(math.floor(found[0]["at"].timestamp()))


def _query(settings: Settings, storage: Storage, sql: str, params: list[Any]) -> list[dict]:
    """Run one parameterized query over the lake's tables; return its rows."""
    con = duck.connect(settings, storage)
    try:
        rows: list[dict[str, Any]] = con.execute(sql, params).to_arrow_table().to_pylist()
    finally:
        con.close()
    return rows


def explain(settings: Settings, storage: Storage, request_id: str) -> list[dict[str, Any]]:
    """Explain every logged prediction with this request id."""
    registry = models.Registry(storage)
    out = []
    for prediction in logged(settings, storage, request_id):
        version = prediction["model_version"]
        model: dict[str, Any] = {"version": version}
        if version in registry.versions():
            model["lineage"] = json.loads(registry.get(version, "lineage.json"))
            model["summary"] = models.summary(json.loads(registry.get(version, "metrics.json")))
        else:
            model["missing"] = "no longer in the registry"
        out.append(
            {
                "prediction": {k: v for k, v in prediction.items() if k != "features"},
                "model": model,
                "replay": replay(settings, storage, prediction),
            }
        )
    return out


def _when(value: Any) -> str:
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"
    return "unknown" if value is None else str(value)


def render(explained: list[dict[str, Any]]) -> str:
    """Render explanations for a terminal."""
    parts = []
    for item in explained:
        p, model, rep = item["prediction"], item["model"], item["replay"]
        asked = (
            f"application {p['application_id']}"
            if p["application_id"] is not None
            else f"applicant {p['applicant_id']} with a new loan"
        )
        parts.append(
            f"request {p['request_id']}: {asked}, served {_when(p['served_at'])} by "
            f"{p['writer']}\n"
            f"  answer: {p['decision']} (probability {p['probability']:.6f}, threshold "
            f"{p['threshold']:g}), {p['latency_ms']:.2f} ms\n"
            f"  online store: newest feature event {_when(p['features_event_ts'])}, "
            f"last written {_when(p['online_refreshed_at'])}\n"
            f"  model {model['version']}"
        )
        if "lineage" in model:
            lineage = model["lineage"]
            inputs = ", ".join(f"{t} v{v}" for t, v in sorted(lineage["inputs"].items()))
            parts.append(
                f": trained {lineage['trained_at']} on {lineage['training_set']['rows']:,} rows "
                f"(training set sha256 {lineage['training_set']['sha256'][:12]}...) built by "
                f"Feast service {lineage['feature_service']} from {inputs}\n"
                f"    {model['summary']}\n"
            )
        else:
            parts.append(f": {model['missing']}\n")
        read = ", ".join(f"{t} v{v}" for t, v in rep["read"].items())
        verdict = (
            "every value served is the lakehouse's as of that time"
            if rep["matches"]
            else f"{sum(not c['same'] for c in rep['features'])} value(s) differ"
        )
        parts.append(
            f"  replay through Feast as of {rep['as_of']} (from {read}): {verdict}\n"
            f"    {'feature':<32} {'served':>22} {'replayed':>22}\n"
        )
        for c in rep["features"]:
            mark = "" if c["same"] else "   <- differs"
            parts.append(
                f"    {c['feature']:<32} {_shown(c['served']):>22} "
                f"{_shown(c['replayed']):>22}{mark}\n"
            )
    return "".join(parts)


def _shown(value: Any) -> str:
    if value is None:
        return "(missing)"
    if isinstance(value, float):
        return f"{value:.10g}"
    return str(value)
