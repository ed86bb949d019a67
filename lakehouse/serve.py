"""The prediction API: FastAPI over Feast's online store and the registered model.

`POST /predict` takes an `application_id` (every feature from the online store), or an
`applicant_id` plus the loan's attributes (the applicant's features from the online
store, the loan's from the request). `GET /health`, `GET /models`; OpenAPI at `/docs`
and `/openapi.json`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field, model_validator

from lakehouse import features, models
from lakehouse.settings import Settings
from lakehouse.storage import Storage

INTENTS = ("PERSONAL", "EDUCATION", "MEDICAL", "VENTURE", "HOMEIMPROVEMENT", "DEBTCONSOLIDATION")


class Loan(BaseModel):
    """The loan attributes of an application not yet in the source."""

    loan_amnt: float = Field(gt=0, le=1_000_000)
    loan_intent: Literal[INTENTS]  # type: ignore[valid-type]
    loan_int_rate: float = Field(gt=0, le=100)


class PredictRequest(BaseModel):
    """Either `application_id`, or `applicant_id` with `loan`."""

    application_id: int | None = Field(default=None, ge=1)
    applicant_id: int | None = Field(default=None, ge=1)
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

    probability: float
    decision: Literal["approve", "reject"]
    threshold: float
    model_version: str
    features: dict[str, Any]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def create_app(settings: Settings) -> FastAPI:
    """Build the app; the store and the model are opened lazily and cached."""
    storage = Storage.from_settings(settings)
    app = FastAPI(title="lakehouse loan approval", version="1")
    state: dict[str, Any] = {}

    def store() -> Any:
        if "store" not in state:
            state["store"] = features.feature_store(settings, storage)
        return state["store"]

    def model() -> tuple[str, models.Trained]:
        try:
            latest = models.Registry(storage).latest()
        except models.ModelError as exc:
            raise HTTPException(503, str(exc)) from None
        if state.get("version") != latest:
            state["version"], state["model"] = models.load(storage, latest)
        return state["version"], state["model"]

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

    @app.post("/predict", response_model=Prediction)
    def predict(request: PredictRequest) -> Prediction:
        version, trained = model()
        fs = store()
        service = fs.get_feature_service(features.SERVICE)
        if request.application_id is not None:
            row = _online(fs, service, {"application_id": request.application_id})
            if row.get("loan_amnt") is None:
                raise HTTPException(
                    404, f"application {request.application_id} has no features online"
                )
            applicant_id = row.get("applicant_id")
            if applicant_id is not None:
                row |= _applicant(fs, int(applicant_id))
        else:
            assert request.applicant_id is not None and request.loan is not None
            row = _applicant_attributes(fs, request.applicant_id)
            if row.get("person_income") is None:
                raise HTTPException(404, f"applicant {request.applicant_id} has no features online")
            loan = request.loan
            income = row["person_income"]
            row |= {
                "loan_amnt": loan.loan_amnt,
                "loan_intent": loan.loan_intent,
                "loan_int_rate": loan.loan_int_rate,
                "loan_percent_income": round(loan.loan_amnt / income, 2) if income else None,
                "loan_to_income": loan.loan_amnt / income if income else None,
                "rate_spread": None,  # needs the market's 30-day rate: unknown to the model
                "credit_score_band": score_band(row.get("credit_score")),
            }
        import pandas as pd

        used = {c: _clean(row.get(c)) for c in trained.columns}
        probability = float(trained.predict_proba(pd.DataFrame([used]))[0])
        decision: Literal["approve", "reject"] = (
            "approve" if probability >= trained.threshold else "reject"
        )
        return Prediction(
            probability=probability,
            decision=decision,
            threshold=trained.threshold,
            model_version=version,
            features=used,
        )

    return app


def score_band(score: Any) -> str | None:
    """Return the credit score band, as `gold.application_features` computes it."""
    if score is None:
        return None
    for limit, band in ((580, "poor"), (670, "fair"), (740, "good"), (800, "very_good")):
        if score < limit:
            return band
    return "exceptional"


def _online(fs: Any, service: Any, entity: dict[str, int]) -> dict[str, Any]:
    result = fs.get_online_features(
        features=[f"application_features:{f.name}" for f in _view(service, "application_features")],
        entity_rows=[entity],
    ).to_dict()
    row = {k: v[0] for k, v in result.items()}
    return row


def _view(service: Any, name: str) -> list[Any]:
    for projection in service.feature_view_projections:
        if projection.name_to_use() == name:
            return list(projection.features)
    return []


def _applicant(fs: Any, applicant_id: int) -> dict[str, Any]:
    service = fs.get_feature_service(features.SERVICE)
    result = fs.get_online_features(
        features=[f"applicant_features:{f.name}" for f in _view(service, "applicant_features")],
        entity_rows=[{"applicant_id": applicant_id}],
    ).to_dict()
    return {k: v[0] for k, v in result.items() if k != "applicant_id"}


def _applicant_attributes(fs: Any, applicant_id: int) -> dict[str, Any]:
    """Return the applicant's attributes and history from the online store (for a new loan)."""
    row = _applicant(fs, applicant_id)
    attrs = fs.get_online_features(
        features=[
            f"applicant_profile:{name}"
            for name in (
                "person_age",
                "person_gender",
                "person_education",
                "person_income",
                "person_emp_exp",
                "person_home_ownership",
                "cb_person_cred_hist_length",
                "credit_score",
                "previous_loan_defaults_on_file",
            )
        ],
        entity_rows=[{"applicant_id": applicant_id}],
    ).to_dict()
    row |= {k: v[0] for k, v in attrs.items() if k != "applicant_id"}
    return row
