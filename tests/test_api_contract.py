"""The OpenAPI document checked against the implementation: schemathesis generates requests from
/api/v1/openapi.json for every operation and validates each response (status code documented,
content type, body schema)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from dermascan.infra.db import session_factory
from dermascan.security.accounts import create_token
from dermascan.security.identity import get_or_create_program


def test_api_conforms_to_its_openapi_document(pg_settings, app_factory):
    app = app_factory(pg_settings)
    with session_factory(pg_settings.database_url)() as session, session.begin():
        _, token = create_token(session, get_or_create_program(session, "contract").id, "contract")
    headers = {"Authorization": f"Bearer {token}"}
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} == {
        "GET /api/v1/batches",
        "POST /api/v1/batches",
        "GET /api/v1/batches/{batch_id}",
        "GET /api/v1/batches/{batch_id}/results",
        "GET /api/v1/batches/{batch_id}/export",
        "GET /api/v1/studies/{study_id}",
        "GET /api/v1/studies/{study_id}/fhir",
        "GET /api/v1/lesions/{lesion_id}",
        "PUT /api/v1/studies/{study_id}/outcome",
        "POST /api/v1/outcomes",
    }
    for operation in operations:
        check_operation(operation, headers)


def check_operation(operation, headers: dict) -> None:
    # a schema-valid upload can still be a bad ZIP, CSV or image: for the upload, the check that
    # every schema-valid request is accepted does not hold (the reply must still be documented)
    excluded = [positive_data_acceptance] if operation.method.upper() in ("POST", "PUT") else []

    @given(case=operation.as_strategy())
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def check(case):
        case.call_and_validate(headers=headers, excluded_checks=excluded)

    check()


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_every_timestamp_has_an_explicit_utc_offset(database, make_settings, request, app_factory, ham_dir):
    """On SQLite as on PostgreSQL: times in the batch list, the batch, its results (JSON and CSV)
    and the OpenAPI document's date-time formats."""
    import csv
    import datetime as dt
    import io

    from dermascan.infra import migrate
    from tests.ham_files import json_records

    if database == "sqlite":
        settings = make_settings()
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        migrate.upgrade(settings.database_url)
    else:
        settings = request.getfixturevalue("pg_settings")
    app = app_factory(settings)
    with session_factory(settings.database_url)() as session, session.begin():
        _, token = create_token(session, get_or_create_program(session, "times").id, "times")
    client = app.test_client()
    headers = {"Authorization": f"Bearer {token}"}
    created = client.post("/api/v1/batches", headers=headers, json={"records": json_records(ham_dir, 2), "label": "t"})
    batch_id = created.json["batch_id"]

    def utc(value):
        parsed = dt.datetime.fromisoformat(value)
        assert parsed.utcoffset() == dt.timedelta(0), value

    listed = client.get("/api/v1/batches?label=t", headers=headers).json
    assert [b["batch_id"] for b in listed["batches"]] == [batch_id]
    utc(listed["batches"][0]["created_at"])
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
    assert client.get("/api/v1/batches", headers=headers, query_string={"created_after": later}).json["total"] == 0
    before = client.get("/api/v1/batches", headers=headers, query_string={"created_before": later}).json
    assert before["total"] == 1 and before["batches"][0]["label"] == "t"
    assert client.get("/api/v1/batches?created_after=yesterday", headers=headers).status_code == 400
    assert client.get("/api/v1/batches?label=other", headers=headers).json["batches"] == []
    utc(client.get(f"/api/v1/batches/{batch_id}", headers=headers).json["created_at"])
    for row in client.get(f"/api/v1/batches/{batch_id}/results", headers=headers).json["results"]:
        utc(row["created_at"])
    text = client.get(f"/api/v1/batches/{batch_id}/results?format=csv", headers=headers).text
    for row in csv.DictReader(io.StringIO(text)):
        utc(row["created_at"])
    document = client.get("/api/v1/openapi.json").json
    for schema in ("Batch", "Result"):
        props = document["components"]["schemas"][schema]["properties"]
        assert all(props[k]["format"] == "date-time" for k in props if k.endswith("_at"))
