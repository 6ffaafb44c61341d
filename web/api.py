"""REST API ``/api/v1`` for teledermatology programs: bearer tokens scoped to one program,
nightly batch upload (ZIP + CSV, or JSON with base64 images) with Idempotency-Key, batch status,
paginated results (JSON or CSV), single studies, and the OpenAPI document."""

from __future__ import annotations

import datetime as dt
import io
import json
import math
from functools import wraps

from flask import Blueprint, Response, g, jsonify, request, url_for
from sqlalchemy import select

from dermascan.errors import DomainError
from dermascan.infra.schema import Batch, Lesion, Program, Study, iso_utc, utcnow
from dermascan.ingest import json_records, manifest
from dermascan.ingest.errors import IngestError
from dermascan.ingest.numbers import NumberError
from dermascan.intake import submission
from dermascan.referrals import outcomes
from dermascan.results_out import callbacks, delivery_status, fhir
from dermascan.screening import reports
from dermascan.security import audit
from dermascan.security.accounts import token_for
from web.errors import http_status
from web.extensions import csrf
from web.helpers import BadJson, client_ip, db, int_arg, json_body, settings

bp = Blueprint("api", __name__, url_prefix="/api/v1")
csrf.exempt(bp)

MAX_PER_PAGE = 1000
MAX_KEY = 200
FHIR_JSON = "application/fhir+json"


def error(status: int, message: str, **extra):
    response = jsonify({"error": message, **extra})
    response.status_code = status
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="dermascan"'
    return response


def token_required(view):
    @wraps(view)
    def wrapped(*args, **kwargs):
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return error(401, "missing bearer token (Authorization: Bearer <token>)")
        token = token_for(db(), value.strip())
        if token is None:
            return error(401, "invalid or revoked token")
        token.last_used_at = utcnow()
        audit.record(
            db(),
            "token_use",
            token_id=token.id,
            object_type="api",
            object_id=request.path[:64],
            detail={"method": request.method},
            ip=client_ip(),
        )
        db().commit()
        g.token_id, g.program_id = token.id, token.program_id
        return view(*args, **kwargs)

    return wrapped


def _batch(batch_id: str) -> Batch | None:
    batch = db().get(Batch, batch_id)
    return batch if batch is not None and batch.program_id == g.program_id else None


def _callback_url(value) -> str | None:
    try:
        url = callbacks.check_url(settings(), value)
    except callbacks.CallbackRefused as exc:
        raise IngestError(str(exc)) from None
    if url and not db().get(Program, g.program_id).callback_secret_generation:
        raise IngestError(
            "callback_url needs a callback signing secret for this program: an administrator issues one "
            "(admin page API tokens, or dermascan program callback-secret PROGRAM)"
        )
    return url


@bp.post("/batches")
@token_required
def create_batch():
    key = request.headers.get("Idempotency-Key")
    if key is not None and (not key.strip() or len(key) > MAX_KEY):
        return error(400, f"Idempotency-Key must be 1–{MAX_KEY} characters")
    if key:  # a retry is answered before its body is parsed again
        earlier = submission.find_replay(db(), g.program_id, key)
        if earlier is not None:
            reply = earlier.report()
            reply["replayed"] = True
            return jsonify(reply), 200
    mimetype = request.mimetype
    try:
        if mimetype == "multipart/form-data":
            archive = request.files.get("archive")
            if archive is None:
                return error(400, 'multipart upload needs an "archive" file (ZIP of images + manifest CSV)')
            csv_file = request.files.get("manifest")
            csv_text = None
            if csv_file is not None:
                try:
                    csv_text = csv_file.read().decode("utf-8-sig")
                except UnicodeDecodeError:
                    return error(400, "the manifest CSV is not UTF-8 text")
            inputs, rejected = manifest.from_zip(archive.read(), settings(), csv_text)
            label, callback = request.form.get("label"), _callback_url(request.form.get("callback_url"))
        elif mimetype == "application/json":
            try:
                payload = json_body()
            except BadJson as exc:
                return error(400, str(exc))
            inputs, rejected = json_records.parse(payload, MAX_KEY)
            label, callback = payload.get("label"), _callback_url(payload.get("callback_url"))
        else:
            return error(
                415, f"unsupported content type {mimetype or 'none'}: use multipart/form-data or application/json"
            )
    except IngestError as exc:
        return error(http_status(exc), str(exc))
    result = submission.submit(
        settings(), g.program_id, inputs, source="api", label=None if label is None else str(label)[:200],
        idempotency_key=key, callback_url=callback, token_id=g.token_id, prior_rejections=rejected, ip=client_ip(),
    )  # fmt: skip
    reply = result.report()
    reply["replayed"] = result.replayed
    if not result.accepted and not result.replayed:  # nothing stored, no batch: every row's reason
        reply["error"] = "no record was accepted: nothing was stored (each record's reason is in records)"
        return jsonify(reply), 422
    reply["status_url"] = url_for("api.get_batch", batch_id=result.batch_id, _external=False)
    return jsonify(reply), (200 if result.replayed else 201)


MAX_BATCHES_PER_PAGE = 100
MAX_PAGE = 1_000_000


def _pagination(default: int, most: int) -> tuple[int, int]:
    """``page`` and ``per_page`` from the query (IngestError, a 400, when they are not valid)."""
    return int_arg("page", 1, 1, MAX_PAGE), int_arg("per_page", default, 1, most)


def _query_time(name: str) -> dt.datetime | None:
    """An ISO 8601 date or date-time query argument (UTC when it has no offset)."""
    value = request.args.get(name)
    if value in (None, ""):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise IngestError(
            f"{name} must be an ISO 8601 date or date-time, e.g. 2026-11-28 or 2026-11-28T22:00:00Z"
        ) from None
    try:
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)).astimezone(dt.UTC)
    except OverflowError:  # an instant before year 1 or after 9999 in UTC: the range's own end
        edge = dt.datetime.min if parsed.year < 5000 else dt.datetime.max
        return edge.replace(tzinfo=dt.UTC)


@bp.get("/batches")
@token_required
def list_batches():
    """The program's batches, newest first: a nightly program finds last night's run after a
    restart on its side (filter by label and creation time)."""
    try:
        page, per_page = _pagination(50, MAX_BATCHES_PER_PAGE)
        after, before = _query_time("created_after"), _query_time("created_before")
    except (IngestError, NumberError) as exc:
        return error(400, str(exc))
    total, batches = reports.program_batches(
        db(), g.program_id, label=request.args.get("label"), created_after=after, created_before=before,
        page=page, per_page=per_page,
    )  # fmt: skip
    pages = max(1, math.ceil(total / per_page))
    response = jsonify(
        {
            "page": page,
            "per_page": per_page,
            "pages": pages,
            "total": total,
            "batches": [reports.batch_summary(db(), b) for b in batches],
        }
    )
    response.headers["X-Total-Count"] = str(total)
    if page < pages:
        args = {k: v for k, v in request.args.items() if k not in ("page", "per_page")}
        response.headers["Link"] = (
            f'<{url_for("api.list_batches", **args, page=page + 1, per_page=per_page)}>; rel="next"'
        )
    return response


@bp.get("/batches/<batch_id>")
@token_required
def get_batch(batch_id):
    batch = _batch(batch_id)
    if batch is None:
        return error(404, "no such batch")
    return jsonify(reports.batch_summary(db(), batch))


@bp.get("/batches/<batch_id>/results")
@token_required
def batch_results(batch_id):
    batch = _batch(batch_id)
    if batch is None:
        return error(404, "no such batch")
    fmt = request.args.get("format") or {"text/csv": "csv", FHIR_JSON: "fhir"}.get(
        request.accept_mimetypes.best, "json"
    )
    if fmt not in ("csv", "json", "fhir"):
        return error(400, "format must be csv, json or fhir")
    try:
        page, per_page = _pagination(500, MAX_PER_PAGE)
    except (IngestError, NumberError) as exc:
        return error(400, str(exc))
    total = reports.status_counts(db(), batch.id)["total"]
    rows = reports.result_rows(db(), batch.id, offset=(page - 1) * per_page, limit=per_page)
    pages = max(1, math.ceil(total / per_page))
    links = []
    if page < pages:
        links.append(
            f'<{url_for("api.batch_results", batch_id=batch.id, format=fmt, page=page + 1, per_page=per_page)}>; rel="next"'
        )
    if fmt == "csv":
        response = Response(reports.to_csv(rows), mimetype="text/csv")
    elif fmt == "fhir":
        studies = reports.studies_in_order(db(), [r["study_id"] for r in rows])
        body = fhir.collection(fhir.study_reports(db(), studies, settings()))
        response = Response(json.dumps(body), mimetype=FHIR_JSON)
    else:
        response = jsonify(
            {"batch_id": batch.id, "page": page, "per_page": per_page, "pages": pages, "total": total, "results": rows}
        )
    response.headers["X-Total-Count"] = str(total)
    if links:
        response.headers["Link"] = ", ".join(links)
    return response


@bp.get("/batches/<batch_id>/export")
@token_required
def export_batch(batch_id):
    """The whole batch's results as one download (``format`` csv, json or fhir), streamed: memory
    stays flat however large the batch (the paged ``/results`` is the alternative for clients
    that prefer pages)."""
    from web.portal import streamed_export

    batch = db().get(Batch, batch_id)
    if batch is None or batch.program_id != g.program_id:
        return error(404, "no such batch")
    fmt = request.args.get("format") or "json"
    if fmt not in ("csv", "json", "fhir"):
        return error(400, "format must be csv, json or fhir")
    return streamed_export(batch, fmt)


@bp.get("/studies/<int:study_id>")
@token_required
def get_study(study_id):
    study = db().get(Study, study_id)
    if study is None or study.program_id != g.program_id:
        return error(404, "no such study")
    row = reports.study_result(db(), study)
    row["batch_id"] = study.batch_id
    row["deliveries"] = delivery_status.deliveries(db(), study.id)  # results sent back to the PACS
    return jsonify(row)


@bp.get("/lesions/<lesion_ref>")
@token_required
def get_lesion(lesion_ref):
    """A followed lesion's whole history: every visit in time order (date, probability,
    assessability, referral, decision, outcome) with the comparison of each with the one before.
    The lesion as the sender named it (a lesion number "#3" with ``?patient_id=``), or by
    DermaScan's own id (``dermascan_lesion_id``) when no lesion has that name."""
    from dermascan.intake.lesions import find

    lesion = find(db(), settings().secret_key, g.program_id, lesion_ref, request.args.get("patient_id"))
    if lesion is None and lesion_ref.isascii() and lesion_ref.isdigit() and len(lesion_ref) < 12:
        lesion = db().get(Lesion, int(lesion_ref))
    if lesion is None or lesion.program_id != g.program_id:
        return error(404, "no such lesion")
    history = reports.lesion_history(db(), lesion.id)
    if not history:
        return error(404, "no such lesion")
    name = db().scalar(
        select(Study.lesion_ref).where(Study.lesion_id == lesion.id, Study.lesion_ref.is_not(None)).limit(1)
    )
    return jsonify({"lesion_id": name, "dermascan_lesion_id": lesion.id, "visits": len(history),
                    "first_seen_at": history[0]["visit_at"], "last_seen_at": history[-1]["visit_at"],
                    "history": history})  # fmt: skip


@bp.get("/studies/<int:study_id>/fhir")
@token_required
def study_fhir(study_id):
    """The study's result as a FHIR R4 DiagnosticReport (Observations, ImagingStudy and the
    algorithm as a Device contained)."""
    study = db().get(Study, study_id)
    if study is None or study.program_id != g.program_id:
        return error(404, "no such study")
    return Response(json.dumps(fhir.study_reports(db(), [study], settings())[0]), mimetype=FHIR_JSON)


@bp.put("/studies/<int:study_id>/outcome")
@token_required
def record_outcome(study_id):
    """Record (or replace) the study's outcome: ``{"outcome": "malignant"|"benign"|"not_biopsied",
    "diagnosis": "melanoma"}``; audited."""
    study = db().get(Study, study_id)
    if study is None or study.program_id != g.program_id:
        return error(404, "no such study")
    try:
        payload = json_body()
    except BadJson as exc:
        return error(400, f'{exc}: send a JSON object, e.g. {{"outcome": "malignant", "diagnosis": "melanoma"}}')
    if not isinstance(payload, dict):
        return error(400, 'send a JSON object: {"outcome": "malignant", "diagnosis": "melanoma"}')
    try:
        row = outcomes.record(
            db(), study, payload.get("outcome"), payload.get("diagnosis"), source="api", token_id=g.token_id,
            ip=client_ip(),
        )  # fmt: skip
    except DomainError as exc:
        db().rollback()
        return error(http_status(exc), str(exc))
    db().commit()
    return jsonify(
        {
            "study_id": study.id,
            "outcome": row.kind.value,
            "diagnosis": row.diagnosis,
            "recorded_at": iso_utc(row.recorded_at),
        }
    )


@bp.post("/outcomes")
@token_required
def import_outcomes():
    """A CSV of ``study_id,outcome,diagnosis`` (body ``text/csv``): all rows or none; every bad
    row is reported with its line."""
    # read as it arrives, within its own limit (web.headers: DERMASCAN_MAX_OUTCOME_CSV_BYTES)
    text = io.TextIOWrapper(request.stream, encoding="utf-8-sig", newline="")
    try:
        report = outcomes.import_csv(db(), text, g.program_id, source="api", token_id=g.token_id, ip=client_ip())
    except outcomes.OutcomeRowsInvalid as exc:
        db().rollback()
        return jsonify({"error": str(exc), "rows": exc.errors, "bad_rows": exc.count}), 400
    except DomainError as exc:
        db().rollback()
        return error(http_status(exc), str(exc))
    db().commit()
    return jsonify(report)


@bp.get("/openapi.json")
def openapi():
    from web.openapi import document

    return jsonify(document())
