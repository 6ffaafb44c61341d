"""The OpenAPI 3.0 document of ``/api/v1`` (checked against the implementation by schemathesis
in ``tests/test_api_contract.py``)."""

from __future__ import annotations

# lesion follow-up: a study's lesion and its comparison with the lesion's previous visit
FOLLOW_UP = {
    "lesion_id": {
        "type": "string",
        "nullable": True,
        "description": "the followed lesion as the sender named it (GET /api/v1/lesions/{lesion_id}; a lesion "
        "number such as #3 with ?patient_id=)",
    },
    "dermascan_lesion_id": {"type": "integer", "nullable": True, "description": "DermaScan's own id of the lesion"},
    "acquired_at": {
        "type": "string",
        "format": "date-time",
        "nullable": True,
        "description": "the visit's date, as sent",
    },
    "previous_study_id": {"type": "integer", "nullable": True, "description": "the lesion's previous visit"},
    "probability_change": {"type": "number", "nullable": True},
    "change_measure": {
        "type": "number",
        "nullable": True,
        "description": "image change since the previous visit, in units of a typical unchanged same-lesion pair",
    },
    "change_percentile": {"type": "number", "nullable": True, "minimum": 0, "maximum": 1},
    "changed_since_last_visit": {"type": "boolean", "nullable": True},
    "newly_high_risk": {"type": "boolean", "nullable": True},
}
VISIT = {
    "type": "object",
    "properties": {
        "study_id": {"type": "integer"},
        "external_id": {"type": "string", "nullable": True},
        "visit_at": {"type": "string", "format": "date-time", "nullable": True},
        "acquired_at": {"type": "string", "format": "date-time", "nullable": True},
        "received_at": {"type": "string", "format": "date-time", "nullable": True},
        "status": {"type": "string", "enum": ["queued", "processing", "done", "failed"]},
        "probability": {"type": "number", "nullable": True},
        "assessable": {"type": "boolean", "nullable": True},
        "not_assessable_reason": {"type": "string", "nullable": True},
        "referred": {"type": "boolean", "nullable": True},
        "referral_category": {"type": "string", "nullable": True},
        "decision": {"type": "string", "nullable": True},
        "outcome": {"type": "string", "nullable": True},
        "bundle_version": {"type": "string", "nullable": True},
        "has_heatmap": {"type": "boolean"},
        **{k: v for k, v in FOLLOW_UP.items() if k not in ("lesion_id", "acquired_at")},
    },
    "required": ["study_id", "visit_at", "status"],
}
LESION = {
    "type": "object",
    "properties": {
        "lesion_id": {"type": "string", "nullable": True, "description": "the sender's name of the lesion"},
        "dermascan_lesion_id": {"type": "integer"},
        "visits": {"type": "integer"},
        "first_seen_at": {"type": "string", "format": "date-time"},
        "last_seen_at": {"type": "string", "format": "date-time"},
        "history": {"type": "array", "items": VISIT},
    },
    "required": ["lesion_id", "dermascan_lesion_id", "visits", "history"],
}
EDGE_RESULT = {
    "type": "object",
    "nullable": True,
    "description": "A score the edge scorer (dermascan-edge) made offline, uploaded with the study and kept beside the "
    "server's own; it decides nothing on the server.",
    "properties": {
        "probability": {"type": "number", "minimum": 0, "maximum": 1, "nullable": True},
        "score": {"type": "number", "minimum": 0, "maximum": 1, "nullable": True},
        "threshold": {"type": "number", "minimum": 0, "maximum": 1, "nullable": True},
        "referred": {"type": "boolean", "nullable": True},
        "assessable": {"type": "boolean", "nullable": True},
        "reason": {"type": "string", "nullable": True, "maxLength": 200},
        "bundle_version": {"type": "string", "maxLength": 200},
        "runtime": {"type": "string", "nullable": True, "maxLength": 200},
        "precision": {"type": "string", "nullable": True, "maxLength": 200},
        "made_at": {"type": "string", "format": "date-time", "nullable": True},
    },
    "required": ["bundle_version"],
    "additionalProperties": False,
}
RESULT = {
    "type": "object",
    "properties": {
        "study_id": {"type": "integer"},
        "external_id": {"type": "string", "nullable": True},
        "status": {"type": "string", "enum": ["queued", "processing", "done", "failed"]},
        "assessable": {
            "type": "boolean",
            "nullable": True,
            "description": "false when the image could not be assessed (quality or not a lesion image): "
            "then probability and referred are null and the study waits for a person to check the image",
        },
        "not_assessable_reason": {"type": "string", "nullable": True, "example": "too dark"},
        "probability": {
            "type": "number",
            "nullable": True,
            "minimum": 0,
            "maximum": 1,
            "description": "calibrated probability of malignancy (at the development data's prevalence)",
        },
        "probability_at_program_prevalence": {
            "type": "number",
            "nullable": True,
            "minimum": 0,
            "maximum": 1,
            "description": "the probability re-weighed to the program's expected prevalence, when it has set one",
        },
        "threshold": {"type": "number", "nullable": True},
        "referred": {"type": "boolean", "nullable": True},
        "referral_category": {
            "type": "string",
            "nullable": True,
            "enum": ["newly_high_risk", "high_risk", "changed", "not_assessable", None],
            "description": "why the study is in the specialists' queue (the referral rule's reasons, each its own tier)",
        },
        "referral_reason": {"type": "string", "nullable": True, "example": "changed since last visit"},
        "spread": {"type": "number", "nullable": True},
        "bundle_version": {"type": "string", "nullable": True},
        "missing_fields": {
            "type": "array",
            "nullable": True,
            "items": {"type": "string", "enum": ["age_approx", "sex", "anatom_site_general"]},
            "description": "the metadata fields the score was made without (for them it rests on the image); "
            "empty when every field was given, null before scoring",
        },
        "missing_fields_note": {"type": "string", "nullable": True},
        "decision": {
            "type": "string",
            "nullable": True,
            "enum": [
                "urgent_in_person_review",
                "biopsy_or_excision",
                "routine_follow_up",
                "benign_no_action",
                "image_quality_insufficient",
                None,
            ],
            "description": "the specialist's decision on a referred study, once made",
        },
        "decision_label": {"type": "string", "nullable": True},
        "referral_id": {"type": "integer", "nullable": True, "description": "the case in the specialists' queue"},
        "decided_at": {"type": "string", "format": "date-time", "nullable": True},
        "specialist_diagnosis": {
            "type": "string",
            "enum": ["mel", "nv", "bcc", "akiec", "bkl", "df", "vasc", "other", None],
            "nullable": True,
            "description": "the deciding specialist's diagnosis, in the differential's codes",
        },
        "differential": {
            "type": "array",
            "nullable": True,
            "description": "the differential diagnosis over the seven HAM10000 / ISIC 2018 classes, most likely first "
            "(probabilities sum to 1; re-weighted to equal class priors, as ISIC 2018 scores); null for a bundle "
            "without it or an image that could not be assessed",
            "items": {
                "type": "object",
                "properties": {
                    "diagnosis": {"type": "string", "enum": ["mel", "nv", "bcc", "akiec", "bkl", "df", "vasc"]},
                    "label": {"type": "string"},
                    "snomed": {"type": "string"},
                    "probability": {"type": "number", "minimum": 0, "maximum": 1},
                },
            },
        },
        "error": {"type": "string", "nullable": True},
        "age_approx": {"type": "number", "nullable": True},
        "sex": {"type": "string", "nullable": True},
        "anatom_site_general": {"type": "string", "nullable": True},
        "sop_instance_uid": {"type": "string", "nullable": True},
        "edge_result": EDGE_RESULT,
        **FOLLOW_UP,
        "created_at": {"type": "string", "format": "date-time", "nullable": True},
        "finished_at": {"type": "string", "format": "date-time", "nullable": True},
    },
    "required": ["study_id", "status"],
}
ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
RECORD_REPORT = {
    "type": "object",
    "properties": {
        "row": {"type": "integer"},
        "status": {"type": "string", "enum": ["accepted", "rejected"]},
        "study_id": {"type": "integer"},
        "external_id": {"type": "string"},
        "duplicate": {"type": "boolean"},
        "reason": {"type": "string"},
        "field": {"type": "string"},
    },
    "required": ["status"],
}
SUBMISSION = {
    "type": "object",
    "properties": {
        "batch_id": {"type": "string", "nullable": True},
        "accepted": {"type": "integer"},
        "rejected": {"type": "integer"},
        "duplicates": {"type": "integer"},
        "replayed": {"type": "boolean"},
        "status_url": {"type": "string"},
        "records": {"type": "array", "items": RECORD_REPORT},
    },
    "required": ["batch_id", "accepted", "rejected", "records"],
}
COUNTS = {
    "type": "object",
    "properties": {
        k: {"type": "integer"}
        for k in ("queued", "processing", "done", "failed", "total", "referred", "not_assessable")
    },
}
BATCH = {
    "type": "object",
    "properties": {
        "batch_id": {"type": "string"},
        "label": {"type": "string", "nullable": True},
        "source": {"type": "string"},
        "created_at": {"type": "string", "format": "date-time", "nullable": True},
        "completed_at": {"type": "string", "format": "date-time", "nullable": True},
        "state": {"type": "string", "enum": ["running", "complete", "empty"]},
        "counts": COUNTS,
        "rejected_records": {"type": "integer"},
        "progress": {"type": "number"},
    },
    "required": ["batch_id", "state", "counts"],
}
JSON_RECORD = {
    "type": "object",
    "properties": {
        "external_id": {"type": "string"},
        "patient_id": {"type": "string"},
        "age_approx": {"type": "number", "nullable": True},
        "sex": {"type": "string", "nullable": True},
        "anatom_site_general": {"type": "string", "nullable": True},
        "idempotency_key": {"type": "string"},
        "image_base64": {"type": "string", "format": "byte"},
        "edge_result": EDGE_RESULT,
        "lesion_id": {
            "type": "string",
            "maxLength": 64,
            "description": "the lesion this image shows (ISIC-2024 "
            "column); the same id in a later visit of the same patient links the two",
        },
        "acquired_at": {
            "type": "string",
            "description": "the visit's date (ISO 8601); aliases acquisition_date, study_date, visit_date",
        },
    },
    "required": ["image_base64"],
}


OUTCOME_IN = {
    "type": "object",
    "required": ["outcome"],
    "properties": {
        "outcome": {"type": "string", "enum": ["malignant", "benign", "not_biopsied"]},
        "diagnosis": {"type": "string", "maxLength": 200, "nullable": True},
    },
}
OUTCOME_OUT = {
    "type": "object",
    "required": ["study_id", "outcome", "diagnosis", "recorded_at"],
    "properties": {
        "study_id": {"type": "integer"},
        "outcome": {"type": "string", "enum": ["malignant", "benign", "not_biopsied"]},
        "diagnosis": {"type": "string", "nullable": True},
        "recorded_at": {"type": "string", "format": "date-time"},
    },
}
DELIVERY = {
    "type": "object",
    "properties": {
        "destination": {"type": "string"},
        "target": {"type": "string"},
        "object": {"type": "string", "enum": ["ai_sr", "heatmap", "verified_sr"]},
        "status": {"type": "string", "enum": ["pending", "retrying", "sent", "failed"]},
        "attempts": {"type": "integer"},
        "detail": {"type": ["string", "null"]},
        "sop_instance_uid": {"type": ["string", "null"]},
        "updated_at": {"type": ["string", "null"]},
    },
}
STUDY = {
    "allOf": [
        RESULT,
        {
            "type": "object",
            "properties": {
                "deliveries": {"type": "array", "items": DELIVERY},
                "earlier_visits": {
                    "type": "array",
                    "items": VISIT,
                    "description": "the lesion's earlier visits, in time order",
                },
                "later_visits": {"type": "integer"},
            },
        },
    ]
}
FHIR_RESOURCE = {
    "type": "object",
    "required": ["resourceType"],
    "properties": {"resourceType": {"type": "string"}},
    "description": "A FHIR R4 resource (DiagnosticReport, or a collection Bundle of them)",
}
CALLBACK_DOC = (
    "https URL POSTed when the batch completes, signed in X-DermaScan-Signature (t=<unix time>,v1=<HMAC-SHA256 "
    "of '<t>.<body>'>) with the program's own callback secret (issued by an administrator). Loopback, private and "
    "link-local addresses are refused; redirects are not followed."
)


def _paging(per_page_max: int) -> list[dict]:
    """The ``page`` and ``per_page`` query parameters (web/api.py: _pagination checks them)."""
    return [
        {"name": "page", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1_000_000}},
        {"name": "per_page", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": per_page_max}},
    ]


def _page_of(key: str, items: dict, **extra: dict) -> dict:
    """A paginated reply: ``key`` holds one page of ``items``."""
    return {
        "type": "object",
        "properties": {
            **extra,
            "page": {"type": "integer"},
            "per_page": {"type": "integer"},
            "pages": {"type": "integer"},
            "total": {"type": "integer"},
            key: {"type": "array", "items": items},
        },
        "required": [key, "page", "pages", "total"],
    }


def _errors(*codes: int) -> dict:
    text = {
        400: "Bad request",
        401: "Missing or invalid token",
        404: "Not found (or another program's)",
        413: "Too large",
        415: "Unsupported content type",
        422: "No record was accepted",
    }
    return {str(c): {"description": text[c], "content": {"application/json": {"schema": ERROR}}} for c in codes}


def document() -> dict:
    batch_id = {"name": "batch_id", "in": "path", "required": True, "schema": {"type": "string"}}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "DermaScan screening API",
            "version": "1.0.0",
            "description": "Nightly batch screening of skin-lesion images. Not a medical device.",
        },
        "servers": [{"url": "/"}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Result": RESULT, "Error": ERROR, "Submission": SUBMISSION, "Batch": BATCH},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/api/v1/batches": {
                "get": {
                    "operationId": "listBatches",
                    "summary": "The program's batches, newest first (filter by label and creation time; paginated)",
                    "parameters": [
                        {
                            "name": "label",
                            "in": "query",
                            "schema": {"type": "string", "maxLength": 200, "pattern": "^[^\\x00]*$"},
                        },
                        {
                            "name": "created_after",
                            "in": "query",
                            "description": "ISO 8601 date-time (a date alone, or no offset, is read as UTC)",
                            "schema": {"type": "string", "format": "date-time"},
                        },
                        {"name": "created_before", "in": "query", "schema": {"type": "string", "format": "date-time"}},
                        *_paging(100),
                    ],
                    "responses": {
                        "200": {
                            "description": "One page of batches",
                            "content": {"application/json": {"schema": _page_of("batches", BATCH)}},
                        },
                        **_errors(400, 401),
                    },
                },
                "post": {
                    "operationId": "createBatch",
                    "summary": "Submit a batch (ZIP + manifest CSV, or JSON records with base64 images)",
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "required": False,
                            "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "archive": {"type": "string", "format": "binary"},
                                        "manifest": {"type": "string", "format": "binary"},
                                        "label": {"type": "string"},
                                        "callback_url": {
                                            "type": "string",
                                            "format": "uri",
                                            "maxLength": 2000,
                                            "description": CALLBACK_DOC,
                                        },
                                    },
                                    "required": ["archive"],
                                }
                            },
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {
                                        "label": {"type": "string"},
                                        "callback_url": {
                                            "type": "string",
                                            "format": "uri",
                                            "maxLength": 2000,
                                            "description": CALLBACK_DOC,
                                        },
                                        "records": {"type": "array", "items": JSON_RECORD},
                                    },
                                    "required": ["records"],
                                }
                            },
                        },
                    },
                    "responses": {
                        "201": {
                            "description": "Batch accepted (see per-record report)",
                            "content": {"application/json": {"schema": SUBMISSION}},
                        },
                        "200": {
                            "description": "Replay of an earlier upload with the same Idempotency-Key",
                            "content": {"application/json": {"schema": SUBMISSION}},
                        },
                        "422": {
                            "description": "No record was accepted: nothing stored, no batch; each record's reason",
                            "content": {"application/json": {"schema": SUBMISSION}},
                        },
                        **_errors(400, 401, 413, 415),
                    },
                },
            },
            "/api/v1/batches/{batch_id}": {
                "get": {
                    "operationId": "getBatch",
                    "parameters": [batch_id],
                    "responses": {
                        "200": {"description": "Status counts", "content": {"application/json": {"schema": BATCH}}},
                        **_errors(401, 404),
                    },
                }
            },
            "/api/v1/batches/{batch_id}/results": {
                "get": {
                    "operationId": "getBatchResults",
                    "parameters": [
                        batch_id,
                        {
                            "name": "format",
                            "in": "query",
                            "schema": {"type": "string", "enum": ["json", "csv", "fhir"]},
                        },
                        *_paging(1000),
                    ],
                    "responses": {
                        "200": {
                            "description": "One page of results",
                            "content": {
                                "application/json": {
                                    "schema": _page_of("results", RESULT, batch_id={"type": "string"})
                                },
                                "text/csv": {"schema": {"type": "string"}},
                                "application/fhir+json": {"schema": FHIR_RESOURCE},
                            },
                        },
                        **_errors(400, 401, 404),
                    },
                }
            },
            "/api/v1/batches/{batch_id}/export": {
                "get": {
                    "operationId": "exportBatch",
                    "description": "The whole batch's results as one download, streamed (flat memory however large "
                    "the batch).",
                    "parameters": [
                        batch_id,
                        {
                            "name": "format",
                            "in": "query",
                            "schema": {"type": "string", "enum": ["json", "csv", "fhir"]},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "Every result of the batch",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "required": ["batch", "results"],
                                        "properties": {"batch": BATCH, "results": {"type": "array", "items": RESULT}},
                                    }
                                },
                                "text/csv": {"schema": {"type": "string"}},
                                "application/fhir+json": {"schema": FHIR_RESOURCE},
                            },
                        },
                        **_errors(400, 401, 404),
                    },
                }
            },
            "/api/v1/studies/{study_id}/outcome": {
                "put": {
                    "operationId": "recordOutcome",
                    "description": "Record (or replace) the study's outcome; audited.",
                    "parameters": [{"name": "study_id", "in": "path", "required": True, "schema": {"type": "integer"}}],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": OUTCOME_IN}},
                    },
                    "responses": {
                        "200": {
                            "description": "The recorded outcome",
                            "content": {"application/json": {"schema": OUTCOME_OUT}},
                        },
                        **_errors(400, 401, 404),
                    },
                }
            },
            "/api/v1/outcomes": {
                "post": {
                    "operationId": "importOutcomes",
                    "description": "A CSV of study_id,outcome,diagnosis: all rows or none; every bad row is reported.",
                    "requestBody": {"required": True, "content": {"text/csv": {"schema": {"type": "string"}}}},
                    "responses": {
                        "200": {
                            "description": "Imported",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "required": ["imported"],
                                        "properties": {"imported": {"type": "integer"}},
                                    }
                                }
                            },
                        },
                        **_errors(400, 401, 413),
                    },
                }
            },
            "/api/v1/studies/{study_id}/fhir": {
                "get": {
                    "operationId": "getStudyFhir",
                    "parameters": [{"name": "study_id", "in": "path", "required": True, "schema": {"type": "integer"}}],
                    "responses": {
                        "200": {
                            "description": "The study's result as a FHIR R4 DiagnosticReport (Observations, "
                            "ImagingStudy and the algorithm as a Device contained)",
                            "content": {"application/fhir+json": {"schema": FHIR_RESOURCE}},
                        },
                        **_errors(401, 404),
                    },
                }
            },
            "/api/v1/lesions/{lesion_id}": {
                "get": {
                    "operationId": "getLesion",
                    "parameters": [
                        {
                            "name": "lesion_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "maxLength": 200, "pattern": "^[^\\x00]*$"},
                            "description": "the sender's name of the lesion (else DermaScan's own id)",
                        },
                        {
                            "name": "patient_id",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "maxLength": 200, "pattern": "^[^\\x00]*$"},
                            "description": "the patient, for a lesion number such as #3",
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "A followed lesion's whole history: its visits in time order, each with "
                            "its result, decision, outcome and its comparison with the visit before",
                            "content": {"application/json": {"schema": LESION}},
                        },
                        **_errors(400, 401, 404),
                    },
                }
            },
            "/api/v1/studies/{study_id}": {
                "get": {
                    "operationId": "getStudy",
                    "parameters": [{"name": "study_id", "in": "path", "required": True, "schema": {"type": "integer"}}],
                    "responses": {
                        "200": {
                            "description": "One study, its result, and the results sent back to its "
                            "program's PACS destinations (one entry per object and destination: "
                            "status pending, retrying, sent or failed, with the reason)",
                            "content": {"application/json": {"schema": STUDY}},
                        },
                        **_errors(401, 404),
                    },
                }
            },
        },
    }
