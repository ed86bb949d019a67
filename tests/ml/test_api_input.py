"""The prediction API answers bad input with a 422 and a JSON detail, never a 500."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from lakehouse.ml.serve import create_app
from lakehouse.settings import Settings

LOAN = {"loan_amnt": 5000, "loan_intent": "EDUCATION", "loan_int_rate": 11.5}


def test_bad_requests_are_422_with_a_detail(base_settings: Settings) -> None:
    client = TestClient(create_app(base_settings), raise_server_exceptions=False)
    bodies = [
        '{"application_id": 9223372036854775808}',  # one past bigint
        '{"applicant_id": 9223372036854775808, "loan": ' + json.dumps(LOAN) + "}",
        '{"application_id": 99999999999999999999999999}',
        '{"application_id": true}',
        '{"application_id": "7"}',
        '{"application_id": 1.5}',
        '{"applicant_id": 1, "loan": {"loan_amnt": NaN, "loan_intent": "EDUCATION", '
        '"loan_int_rate": 11.5}}',
        '{"applicant_id": 1, "loan": {"loan_amnt": 5000, "loan_intent": "EDUCATION", '
        '"loan_int_rate": Infinity}}',
        '{"applicant_id": 1, "loan": {"loan_amnt": -Infinity, "loan_intent": "EDUCATION", '
        '"loan_int_rate": 11.5}}',
    ]
    for body in bodies:
        answer = client.post("/predict", content=body, headers={"content-type": "application/json"})
        assert answer.status_code == 422, (body, answer.status_code, answer.text)
        detail = answer.json()["detail"]
        assert detail and all(d["msg"] and d["loc"] for d in detail), (body, detail)


def test_a_missing_model_is_named_without_the_servers_folders(base_settings: Settings) -> None:
    client = TestClient(create_app(base_settings), raise_server_exceptions=False)
    answer = client.post("/predict", json={"application_id": 1})
    assert answer.status_code == 503
    detail = answer.json()["detail"]
    assert "run `lakehouse train`" in detail
    assert str(base_settings.home) not in detail and base_settings.storage_uri not in detail
