"""Feast definitions over the gold Delta tables: entities, feature views, a feature service.

The gold tables are point-in-time step functions keyed by `event_timestamp`; Feast's
as-of join (latest row with `event_timestamp <= t`) picks the values in force at `t`.
Sources follow the storage: local Delta folders or `s3://` paths. `feature_repo/features.py`
(what the `feast` CLI reads) builds them from here; nothing here imports the repository.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.data_format import DeltaFormat
from feast.types import Bool, Float64, Int64, String

from lakehouse.storage import Storage

# The applicant's attributes (a version of `silver.applicants`).
PERSON = [
    Field(name="person_age", dtype=Int64),
    Field(name="person_gender", dtype=String),
    Field(name="person_education", dtype=String),
    Field(name="person_income", dtype=Float64),
    Field(name="person_emp_exp", dtype=Int64),
    Field(name="person_home_ownership", dtype=String),
    Field(name="cb_person_cred_hist_length", dtype=Int64),
    Field(name="credit_score", dtype=Int64),
    Field(name="previous_loan_defaults_on_file", dtype=Bool),
]
# The applicant's history of applications before a time (earlier applications only).
HISTORY = [
    Field(name="application_count", dtype=Int64),
    Field(name="approved_count", dtype=Int64),
    Field(name="rejected_count", dtype=Int64),
    Field(name="mean_loan_amnt", dtype=Float64),
    Field(name="days_since_last_application", dtype=Float64),
]


@dataclass(frozen=True)
class Definitions:
    """The repository's Feast objects."""

    applicant: Entity
    application: Entity
    application_features: FeatureView
    applicant_features: FeatureView
    applicant_profile: FeatureView
    loan_approval_v1: FeatureService

    def all(self) -> list[Entity | FeatureView | FeatureService]:
        """Return every object, in the order `FeatureStore.apply` takes them."""
        return [
            self.applicant,
            self.application,
            self.application_features,
            self.applicant_features,
            self.applicant_profile,
            self.loan_approval_v1,
        ]


def build(storage: Storage) -> Definitions:
    """Build the repository's objects with their sources in this storage."""
    applicant = Entity(
        name="applicant",
        join_keys=["applicant_id"],
        value_type=ValueType.INT64,
        description="A person applying for loans (source table lending.applicants).",
    )
    application = Entity(
        name="application",
        join_keys=["application_id"],
        value_type=ValueType.INT64,
        description="One loan application (source table lending.loan_applications).",
    )

    application_source = FileSource(
        name="gold_application_features",
        path=storage.uri("gold", "application_features"),
        timestamp_field="event_timestamp",
        file_format=DeltaFormat(),
    )
    applicant_source = FileSource(
        name="gold_applicant_features",
        path=storage.uri("gold", "applicant_features"),
        timestamp_field="event_timestamp",
        file_format=DeltaFormat(),
    )

    # The application's own attributes, and the applicant and their history as of
    # `applied_at`: one row per application, so training (as of applied_at) and serving by
    # application_id (online, later) see the same values. No label here: `loan_status` is
    # decided later and comes from silver when a training set is built.
    application_features = FeatureView(
        name="application_features",
        entities=[application],
        ttl=timedelta(0),
        schema=[
            Field(name="loan_amnt", dtype=Float64),
            Field(name="loan_intent", dtype=String),
            Field(name="loan_int_rate", dtype=Float64),
            Field(name="loan_percent_income", dtype=Float64),
            Field(name="loan_to_income", dtype=Float64),
            Field(name="rate_spread", dtype=Float64),
            Field(name="credit_score_band", dtype=String),
            *PERSON,
            *HISTORY,  # as of applied_at: earlier applications only
        ],
        source=application_source,
        online=True,
        tags={"zone": "gold", "table": "application_features"},
    )

    # The applicant's history of applications before `t` (strictly), at every change: the
    # latest row (online) is the history a new loan, not yet in the source, is scored with.
    applicant_features = FeatureView(
        name="applicant_features",
        entities=[applicant],
        ttl=timedelta(0),
        schema=list(HISTORY),
        source=applicant_source,
        online=True,
        tags={"zone": "gold", "table": "applicant_features"},
    )

    # The applicant's latest attributes, for scoring a loan that is not in the source yet.
    applicant_profile = FeatureView(
        name="applicant_profile",
        entities=[applicant],
        ttl=timedelta(0),
        schema=list(PERSON),
        source=applicant_source,
        online=True,
        tags={"zone": "gold", "table": "applicant_features"},
    )

    loan_approval_v1 = FeatureService(
        name="loan_approval_v1",
        features=[application_features],
        description="Features of the loan approval model, version 1.",
    )

    return Definitions(
        applicant,
        application,
        application_features,
        applicant_features,
        applicant_profile,
        loan_approval_v1,
    )
