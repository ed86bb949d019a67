"""The prediction API: FastAPI over Feast's online store and the registered model.

`POST /predict` takes an `application_id` (every feature from the online store), or an
`applicant_id` plus the loan's attributes (the applicant's features from the online
store, the loan's from the request). Every answer carries a request id (the client's
`X-Request-ID`, or one made here), returned in the body and the `X-Request-ID` header,
and is logged with it in `bronze.predictions` (`lakehouse.ml.monitor.inference_log`).
`GET /health`, `GET /models`; OpenAPI at `/docs` and `/openapi.json`. For orchestrators:
`GET /healthz` answers while the process serves (liveness), `GET /readyz` only once a
model, its feature service and a non-empty online store are loaded (readiness); each
worker loads them before it accepts a request.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, cast

import pydantic_core
from fastapi import FastAPI, Header, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, StrictInt, model_validator
from starlette.concurrency import run_in_threadpool

from lakehouse import log
from lakehouse.errors import described
from lakehouse.ml import features, fresh, models
from lakehouse.ml import online as online_store
from lakehouse.ml import tasks as ml_tasks
from lakehouse.ml.fastpath import PredictFastPath
from lakehouse.ml.monitor.inference_log import InferenceLog
from lakehouse.settings import Settings
from lakehouse.source.schema import APPLICANTS
from lakehouse.storage import Storage

if TYPE_CHECKING:
    from lakehouse.ml.online.reader import ServiceReader

ONLINE_STORE_MISSING = "online store empty or missing: run `lakehouse run`"
INTENTS = ("PERSONAL", "EDUCATION", "MEDICAL", "VENTURE", "HOMEIMPROVEMENT", "DEBTCONSOLIDATION")


class Loan(BaseModel):
    """The loan attributes of an application not yet in the source.

    The bounds are silver's rules (`amount_range`, `interest_rate_range`): the API scores
    no loan that the lakehouse itself would reject.
    """

    loan_amnt: float = Field(ge=100, le=1_000_000, allow_inf_nan=False)
    loan_intent: Literal[INTENTS]  # type: ignore[valid-type]
    loan_int_rate: float = Field(ge=1, le=36, allow_inf_nan=False)


class PredictRequest(BaseModel):
    """Either `application_id`, or `applicant_id` with `loan`.

    Ids are JSON integers (not `true`, not "7") that a bigint key can hold.
    """

    application_id: StrictInt | None = Field(default=None, ge=1, le=2**63 - 1)
    applicant_id: StrictInt | None = Field(default=None, ge=1, le=2**63 - 1)
    loan: Loan | None = None

    @model_validator(mode="after")
    def one_form(self) -> PredictRequest:
        """Accept exactly one of the two forms."""
        if self.application_id is not None and (self.applicant_id or self.loan):
            msg = "give either application_id, or applicant_id with loan, not both"
            raise ValueError(msg)
        if self.application_id is None and (self.applicant_id is None or self.loan is None):
            msg = "give application_id, or applicant_id together with loan"
            raise ValueError(msg)
        return self


class Prediction(BaseModel):
    """A decision with its probability, the model version and the features it used."""

    request_id: str
    probability: float
    decision: Literal["approve", "reject"]
    threshold: float
    model_version: str
    features: dict[str, Any]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


REFRESH_SECONDS = 10.0
"""How often the API looks for a newer model version and re-reads the feature service."""

REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
BAD_REQUEST_ID = (
    "X-Request-ID must be 1 to 128 letters, digits or `._:/+=@-`; "
    "leave it out and the API makes one"
)


def request_id_of(given: str | None) -> str:
    """Return the client's request id when it is a sane one, a new one when none is given."""
    if not given:  # none, or an empty header
        return uuid.uuid4().hex
    if not REQUEST_ID.fullmatch(given):
        raise HTTPException(400, BAD_REQUEST_ID)
    return given


class _Current(NamedTuple):
    """What a request needs, replaced whole every `REFRESH_SECONDS`.

    One tuple: an answer never names one model version while scoring with another.
    """

    version: str
    trained: models.Trained
    service: Any
    checked_at: float
    reader: ServiceReader | None
    online_written_at: float | None
    """When the online store was last written (materialization or stream refresh)."""


def online_written_at(settings: Settings) -> float | None:
    """Return when this home's online store was last written; None if it never was.

    From the records both of its writers keep: a materialization and a stream refresh.
    """
    times = []
    for path in (ml_tasks.state_file(settings), fresh.record_path(settings)):
        with contextlib.suppress(OSError):
            times.append(path.stat().st_mtime)
    return max(times, default=None)


def app_from_env() -> PredictFastPath:
    """Build the app from the `LAKEHOUSE_*` environment (uvicorn's factory, one per worker)."""
    return create_app(Settings.from_env())


def create_app(settings: Settings) -> PredictFastPath:
    """Build the app; the store, the service and the model are opened lazily and cached.

    The FastAPI app is wrapped in `PredictFastPath`, which answers the common `/predict`
    without FastAPI's per-request machinery and hands everything else to it.

    Every `REFRESH_SECONDS` a request checks the registry for a newer model version (a
    newly trained model is picked up without a restart) and re-reads the feature service.
    """
    from threadpoolctl import threadpool_limits

    # One request scores one row: OpenMP threads per tree cost more than they save, and
    # concurrent requests already use the cores.
    threadpool_limits(limits=1)
    storage = Storage.from_settings(settings)
    inference = InferenceLog(settings, storage) if settings.prediction_log == "on" else None

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        # Before the first request: a worker that has just started answers its first
        # requests as fast as the others, and `/readyz` is true from the start.
        await run_in_threadpool(preload)
        yield
        log.event("serve.stop", "stop signal: requests in progress answered, stopping")
        # uvicorn has stopped accepting and finished the requests in progress: every
        # answered prediction is buffered. Land them all before the process ends.
        if inference is not None:
            await run_in_threadpool(inference.close)
            state = inference.state()
            log.event(
                "serve.prediction_log",
                f"prediction log closed: {state['landed']:,} predictions landed in "
                f"bronze.predictions, {state['buffered']:,} not landed, "
                f"{state['dropped']:,} dropped",
                **{k: state[k] for k in ("landed", "buffered", "dropped")},
            )

    app = FastAPI(title="lakehouse loan approval", version="1", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422 echoes the input, and cannot write a NaN or Infinity it was
        # sent (a 500): name where and what, without the value.
        detail = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": e.get("type")}
            for e in exc.errors()
        ]
        return JSONResponse(status_code=422, content={"detail": detail})

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Anything unexpected (the online store down, a corrupt model file): a JSON detail
        # naming it, without secrets; uvicorn logs the traceback.
        detail = log.redact(f"internal error: {described(exc)}; see the server log")
        return JSONResponse(status_code=500, content={"detail": detail})

    lock = threading.Lock()
    # "store": Feast; "current": a `_Current`, replaced whole under the lock.
    state: dict[str, Any] = {}

    def store() -> Any:
        with lock:
            if "store" not in state:
                fs = features.feature_store(settings, storage)
                from lakehouse.ml.online.store import _LakehouseOnlineStore  # after Feast's

                online = fs._get_provider().online_store
                if isinstance(online, _LakehouseOnlineStore):
                    # The API reads: SQLite opened read-only (never created), a Postgres
                    # session with read-only transactions.
                    online.read_only = True
                state["store"] = fs
            return state["store"]

    def lookup(read: Any, *args: Any) -> tuple[dict[str, Any], int | None]:
        """Read from the online store; a lost or empty store is a 503 that says what to do."""
        try:
            return cast(tuple[dict[str, Any], int | None], read(*args))
        except HTTPException as exc:
            if exc.status_code == 404 and online_store.empty_or_missing(settings):
                raise HTTPException(503, ONLINE_STORE_MISSING) from None
            raise
        except Exception as exc:
            if online_store.empty_or_missing(settings):
                raise HTTPException(503, ONLINE_STORE_MISSING) from None
            raise exc from None

    def model() -> _Current:
        current: _Current | None = state.get("current")
        if current is not None and time.monotonic() - current.checked_at <= REFRESH_SECONDS:
            return current
        fs = store()
        with lock:
            current = state.get("current")
            now = time.monotonic()
            if current is None or now - current.checked_at > REFRESH_SECONDS:
                try:
                    latest = models.Registry(storage).latest()
                except models.ModelError:
                    # Named, not located: the warehouse's path is the server's business.
                    msg = "no trained model yet: run `lakehouse train` (or `lakehouse run`)"
                    raise HTTPException(503, msg) from None
                try:
                    features.require_applied(fs)
                except features.FeatureStoreError as exc:
                    raise HTTPException(503, str(exc)) from None
                trained = current.trained if current and current.version == latest else None
                if trained is None:
                    latest, trained = models.load(storage, latest)
                service = fs.get_feature_service(features.SERVICE)
                from lakehouse.ml.online.reader import ServiceReader  # after Feast's

                current = _Current(
                    latest,
                    trained,
                    service,
                    now,
                    ServiceReader.of(fs, service),
                    online_written_at(settings),
                )
                state["current"] = current
        assert current is not None
        return current

    def not_ready() -> str | None:
        """Return why this worker cannot answer `/predict` yet; None when it can."""
        try:
            model()
        except HTTPException as exc:
            return str(exc.detail)
        except Exception as exc:
            return log.redact(f"cannot load the model: {described(exc)}")
        try:
            if online_store.empty_or_missing(settings):
                return ONLINE_STORE_MISSING
        except Exception as exc:  # the online store's Postgres down: not ready, not dead
            return log.redact(f"cannot read the online store: {described(exc)}")
        return None

    def preload() -> None:
        # Never raises: a worker whose model or store is not there yet still starts,
        # answers /healthz, and says why on /readyz.
        reason = not_ready()
        current = state.get("current")
        if reason is None and current is not None:
            log.event(
                "serve.ready", f"model {current.version} loaded: ready", version=current.version
            )
        else:
            log.event("serve.not_ready", f"not ready yet: {reason}", reason=reason)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """Liveness: the process answers.

        Nothing else is checked: a failing probe means a stuck server, not a missing model
        (which a restart would not bring).
        """
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        """Readiness: 200 once `/predict` can answer, 503 with the reason until then."""
        reason = not_ready()
        if reason is not None:
            return JSONResponse(status_code=503, content={"status": "not ready", "detail": reason})
        current = state["current"]
        return JSONResponse(content={"status": "ready", "model_version": current.version})

    @app.get("/health")
    def health() -> dict[str, Any]:
        versions = models.Registry(storage).versions()
        return {"status": "ok", "model_version": versions[-1] if versions else None}

    @app.get("/models")
    def list_models() -> list[dict[str, Any]]:
        return [
            {
                "version": m["version"],
                "test": m["metrics"]["test"],
                "features": m["lineage"]["features"],
            }
            for m in models.describe(storage)
        ]

    def answer(request: PredictRequest, given_id: str | None, started: float) -> Prediction:
        """Answer one request and hand it to the inference log (before it is sent).

        `given_id` is the client's `X-Request-ID`; `started` the `perf_counter` at its
        arrival (the latency logged runs from there to here).
        """
        served_at = time.time()
        request_id = request_id_of(given_id)
        current = model()
        trained = current.trained
        fs = store()
        if request.application_id is not None:
            # Everything as of the application's applied_at, as in training.
            row, event_us = lookup(
                _online, fs, current.service, current.reader, request.application_id
            )
        else:
            assert request.applicant_id is not None and request.loan is not None
            row, event_us = lookup(_new_loan, fs, request.applicant_id, request.loan, served_at)
        used = {c: _clean(row.get(c)) for c in trained.columns}
        probability = trained.predict_one(used)
        decision: Literal["approve", "reject"] = (
            "approve" if probability >= trained.threshold else "reject"
        )
        prediction = Prediction(
            request_id=request_id,
            probability=probability,
            decision=decision,
            threshold=trained.threshold,
            model_version=current.version,
            features=used,
        )
        if inference is not None:
            inference.record(
                request_id=request_id,
                served_at=served_at,
                model_version=current.version,
                application_id=request.application_id,
                applicant_id=request.applicant_id,
                features=pydantic_core.to_json(used).decode(),
                probability=probability,
                decision=decision,
                threshold=trained.threshold,
                latency_ms=(time.perf_counter() - started) * 1000,
                features_event_ts=event_us,
                online_refreshed_at=current.online_written_at,
            )
        return prediction

    local_reads = settings.feast_online_store == "sqlite"

    def on_loop() -> bool:
        # With the model in memory and a local SQLite store, a request is about 0.4 ms of
        # CPU and no waiting: answered on the event loop. A thread pool's hand-off costs
        # 0.4 ms at the median and milliseconds in the tail on two cores (a bare FastAPI
        # endpoint: p99 2.2 ms in a thread, 0.8 ms on the loop). A Postgres read waits on
        # the network, and a model check reads the registry: those go to the pool.
        current = state.get("current")
        checked = current is not None and time.monotonic() - current.checked_at <= REFRESH_SECONDS
        return local_reads and checked

    @app.post("/predict", response_model=Prediction)
    async def predict(
        request: PredictRequest,
        response: Response,
        x_request_id: str | None = Header(default=None, description="kept as the request id"),
    ) -> Prediction:
        started = time.perf_counter()
        if on_loop():
            prediction = answer(request, x_request_id, started)
        else:
            prediction = await run_in_threadpool(answer, request, x_request_id, started)
        response.headers["X-Request-ID"] = prediction.request_id
        return prediction

    return PredictFastPath(app, PredictRequest, on_loop, answer)


def score_band(score: Any) -> str | None:
    """Return the credit score band, as `gold.application_features` computes it."""
    if score is None:
        return None
    for limit, band in ((580, "poor"), (670, "fair"), (740, "good"), (800, "very_good")):
        if score < limit:
            return band
    return "exceptional"


def _online(
    fs: Any, service: Any, reader: ServiceReader | None, application_id: int
) -> tuple[dict[str, Any], int | None]:
    """Return the service's values of one application, and its rows' newest event time.

    The time is in µs since the epoch. Through the lakehouse store's reader (the same
    values, a tenth of the time), or through Feast when the store or the service is not
    one it reads.
    """
    entity = {"application_id": application_id}
    if reader is not None:
        row, event_us = reader.read_timed(entity)
    else:
        result = fs.get_online_features(features=service, entity_rows=[entity]).to_dict(
            include_event_timestamps=True
        )
        row = {k: v[0] for k, v in result.items() if k != "application_id"}
        event_us = _newest_event_us(row)
        row = {k: v for k, v in row.items() if not k.endswith("__ts")}
    if row.get("loan_amnt") is None:
        raise HTTPException(404, f"application {application_id} has no features online")
    return row, event_us


def _newest_event_us(row: dict[str, Any]) -> int | None:
    """Return the newest of Feast's `<feature>__ts` event times (whole seconds) in µs."""
    times = [v for k, v in row.items() if k.endswith("__ts") and v]
    return int(max(times)) * 1_000_000 if times else None


PROFILE = APPLICANTS.attributes  # the applicant's attributes
HISTORY = (
    "application_count",
    "approved_count",
    "rejected_count",
    "mean_loan_amnt",
    "days_since_last_application",
)


def _new_loan(
    fs: Any, applicant_id: int, loan: Loan, now: float
) -> tuple[dict[str, Any], int | None]:
    """Features of a loan not in the source: the applicant now, plus the loan as given.

    The applicant's attributes and history are their latest `applicant_features` row
    (history strictly before now, like an application's history before its applied_at);
    `days_since_last_application` is moved from that row's time to `now`, the request's
    `served_at` (so that a replay at the logged time composes exactly the same value).
    """
    result = fs.get_online_features(
        features=[f"applicant_profile:{n}" for n in PROFILE]
        + [f"applicant_features:{n}" for n in HISTORY],
        entity_rows=[{"applicant_id": applicant_id}],
    ).to_dict(include_event_timestamps=True)
    row = {k: v[0] for k, v in result.items() if k in PROFILE or k in HISTORY}
    if row.get("person_income") is None:
        raise HTTPException(404, f"applicant {applicant_id} has no features online")
    # Feast gives the row's event time in whole seconds: close enough for days.
    event_us = _newest_event_us({k: v[0] for k, v in result.items()})
    at = result.get("days_since_last_application__ts", [0])[0]
    return new_loan_row(row, loan.model_dump(), at, now), event_us


def new_loan_row(
    applicant: dict[str, Any], loan: dict[str, Any], row_at: float | None, now: float
) -> dict[str, Any]:
    """Compose a new loan's features from the applicant's row (as of `row_at`) and the loan.

    `days_since_last_application` moves from the row's time to `now` (seconds since the
    epoch); the loan's own ratios are computed as gold computes them. Serving composes
    with the online row and the clock; a replay (`lakehouse predictions explain`) with the
    row as of the prediction's time.
    """
    row = dict(applicant)
    if row.get("days_since_last_application") is not None and row_at:
        row["days_since_last_application"] += (now - row_at) / 86400
    income = row["person_income"]
    amount = loan["loan_amnt"]
    row |= {
        "loan_amnt": amount,
        "loan_intent": loan["loan_intent"],
        "loan_int_rate": loan["loan_int_rate"],
        "loan_percent_income": round(amount / income, 2) if income else None,
        "loan_to_income": amount / income if income else None,
        # The market's 30-day rate of the intent is computed in gold per application;
        # a loan not in the source has none, and the model treats it as missing.
        "rate_spread": None,
        "credit_score_band": score_band(row.get("credit_score")),
    }
    return row
