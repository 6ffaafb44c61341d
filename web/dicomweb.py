"""DICOMweb STOW-RS: ``POST /dicomweb/studies[/{StudyInstanceUID}]`` with
``multipart/related; type="application/dicom"``, answered as PS3.18 §10.5 says: a DICOM JSON
object with ReferencedSOPSequence (stored) and FailedSOPSequence (with FailureReason).

The body is parsed as it streams in (``dermascan.ingest.multipart``); each part is read, checked
against ``max_dicom_bytes`` and parsed, then dropped."""

from __future__ import annotations

import re

from flask import Blueprint, Response, g, json, request

from dermascan.ingest import dicom
from dermascan.ingest.errors import Rejection
from dermascan.ingest.multipart import MultipartError, iter_parts
from dermascan.intake import submission
from web.api import error, token_required
from web.extensions import csrf
from web.helpers import client_ip, settings

bp = Blueprint("dicomweb", __name__, url_prefix="/dicomweb")
csrf.exempt(bp)

DICOM_JSON = "application/dicom+json"


def _params(header: str) -> dict:
    out = {}
    for piece in header.split(";")[1:]:
        if "=" in piece:
            key, value = piece.split("=", 1)
            out[key.strip().lower()] = value.strip().strip('"')
    return out


def _sop_item(sop_class: str | None, sop_instance: str | None) -> dict:
    item = {}
    if sop_class:
        item["00081150"] = {"vr": "UI", "Value": [sop_class]}
    if sop_instance:
        item["00081155"] = {"vr": "UI", "Value": [sop_instance]}
    return item


def _answer(referenced: list[dict], failed: list[dict]) -> Response:
    body: dict = {}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    if referenced:
        body["00081199"] = {"vr": "SQ", "Value": referenced}
    status = 200 if not failed else (202 if referenced else 409)
    return Response(json.dumps(body), status=status, mimetype=DICOM_JSON)


@bp.post("/studies")
@bp.post("/studies/<study_uid>")
@token_required
def stow(study_uid: str | None = None):
    content_type = request.headers.get("Content-Type", "")
    if request.mimetype != "multipart/related":
        return error(415, f'STOW-RS needs multipart/related; type="application/dicom", not {content_type or "none"}')
    params = _params(content_type)
    if params.get("type", "application/dicom").lower() != "application/dicom":
        return error(415, f'only type="application/dicom" parts are accepted (got {params.get("type")})')
    boundary = params.get("boundary")
    if not boundary:
        return error(400, "the multipart/related content type has no boundary")
    if study_uid is not None and not dicom.valid_uid(study_uid):
        return error(400, "the study in the URL is not a valid UID (digits and dots, at most 64 characters)")
    limits = settings()
    inputs, failed_items, index_uid = [], [], {}
    try:
        for number, part in enumerate(iter_parts(request.stream, boundary, limits.max_dicom_bytes), start=1):
            _read_part(number, part, study_uid, limits, inputs, failed_items, index_uid)
    except MultipartError as exc:
        return error(400, str(exc))
    if not inputs and not failed_items:
        return error(400, "the request contains no DICOM instances")

    result = submission.submit(
        limits, g.program_id, inputs, source="dicom", label="STOW-RS", token_id=g.token_id, ip=client_ip(),
        prior_rejections=[Rejection(None, f["_reason"]) for f in failed_items],
    )  # fmt: skip
    for rejection in result.rejected:
        if rejection.row in index_uid:
            sop_class, sop_instance = index_uid[rejection.row]
            failed_items.append(_failure(sop_class, sop_instance, dicom.PROCESSING_FAILURE, rejection.reason))
    referenced = []
    for accepted in result.accepted:
        sop_class, sop_instance = index_uid[accepted.row]
        item = _sop_item(sop_class, sop_instance)
        item["00081190"] = {"vr": "UR", "Value": [f"{request.host_url.rstrip('/')}/api/v1/studies/{accepted.study_id}"]}
        referenced.append(item)
    for item in failed_items:
        item.pop("_reason", None)
    return _answer(referenced, failed_items)


def _read_part(number, part, study_uid, limits, inputs, failed_items, index_uid) -> None:
    """One part: parsed into a study input, or a failure item with the DICOM status and reason."""
    part_type = part.headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
    try:
        if part_type != "application/dicom":
            raise dicom.DicomRejected(f"part {number} has content type {part_type}, not application/dicom")
        if part.too_large:
            raise dicom.DicomRejected(
                f"part {number} is larger than the {limits.max_dicom_bytes:,}-byte limit for one instance",
                dicom.OUT_OF_RESOURCES,
            )
        parsed = dicom.parse_part10(bytes(part.payload), limits)
        if study_uid and parsed.study.study_instance_uid != study_uid:
            raise dicom.DicomRejected(
                f"the instance belongs to study {parsed.study.study_instance_uid}, not {study_uid}",
                dicom.DATA_SET_DOES_NOT_MATCH_SOP_CLASS, parsed.sop_class_uid, parsed.sop_instance_uid,
            )  # fmt: skip
    except dicom.DicomRejected as exc:
        failed_items.append(
            _failure(exc.sop_class_uid, exc.sop_instance_uid, exc.status, f"part {number}: {exc.reason}")
        )
        return
    parsed.study.row = number
    index_uid[number] = (parsed.sop_class_uid, parsed.sop_instance_uid)
    inputs.append(parsed.study)


def _failure(sop_class, sop_instance, status: int, reason: str) -> dict:
    item = _sop_item(sop_class, sop_instance)
    item["00081197"] = {"vr": "US", "Value": [int(status)]}
    # FailureReason is a code; the readable reason goes in Error Comment (0000,0902)
    item["00000902"] = {"vr": "LO", "Value": [re.sub(r"\s+", " ", reason)]}
    item["_reason"] = reason
    return item
