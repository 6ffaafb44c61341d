"""The hospital portal: single and bulk (ZIP + manifest) uploads with a per-row validation
report, batch pages with live progress, result tables with thumbnails, CSV/JSON export."""

from __future__ import annotations

import io

from flask import Blueprint, Response, abort, current_app, flash, jsonify, redirect, render_template, request, url_for
from flask_login import current_user, login_required
from flask_wtf import FlaskForm
from flask_wtf.file import FileAllowed, FileField, FileRequired
from PIL import Image
from sqlalchemy import select
from wtforms import DecimalField, SelectField, StringField
from wtforms.validators import Length, NumberRange, Optional

from dermascan.infra.blobs import BlobError, BlobUnavailable, blob_store
from dermascan.infra.schema import Batch, Prediction, Study, utcnow
from dermascan.ingest import manifest, numbers
from dermascan.ingest.errors import IngestError
from dermascan.ingest.numbers import NumberError
from dermascan.ingest.records import SITES
from dermascan.ingest.types import StudyInput
from dermascan.intake import submission
from dermascan.results_out import export
from dermascan.screening import reports
from dermascan.security import identity
from web.errors import http_status
from web.helpers import (
    audit_event,
    client_ip,
    db,
    int_arg,
    page_arg,
    program_scope,
    role_required,
    settings,
    specialist_may_see,
)

bp = Blueprint("portal", __name__)
UPLOAD_ROLES = ("uploader", "admin")
VIEW_ROLES = ("uploader", "specialist", "admin")


class SingleStudyForm(FlaskForm):
    image = FileField("Lesion image (JPEG or PNG)", validators=[FileRequired(), FileAllowed(["jpg", "jpeg", "png"])])
    external_id = StringField("Your reference", validators=[Optional(), Length(max=200)])
    patient_id = StringField("Patient id (stored pseudonymised)", validators=[Optional(), Length(max=200)])
    age_approx = DecimalField("Age (years)", validators=[Optional(), NumberRange(0, 120)])
    sex = SelectField("Sex", choices=[("", "unknown"), ("female", "female"), ("male", "male")], default="")
    anatom_site_general = SelectField("Anatomic site", choices=[("", "unknown")] + [(s, s) for s in SITES], default="")
    # lesion follow-up: the same lesion id at a later visit links the two (checked at submission)
    lesion_id = StringField("Lesion id (to follow it across visits)", validators=[Optional(), Length(max=64)])
    acquired_at = StringField("Imaged on (default: today)", validators=[Optional(), Length(max=40)])


class BulkForm(FlaskForm):
    archive = FileField(
        "ZIP of images (+ manifest.csv)", validators=[FileRequired(), FileAllowed(["zip"], "a .zip file")]
    )
    manifest = FileField(
        "Manifest CSV (if not inside the ZIP)", validators=[Optional(), FileAllowed(["csv"], "a .csv file")]
    )
    label = StringField("Batch name", validators=[Optional(), Length(max=200)])


def _program_id() -> int:
    if current_user.program_id:
        return current_user.program_id
    if not current_user.has_role("admin"):
        abort(403, "your account belongs to no program: an administrator must set one before you can upload")
    return identity.get_or_create_program(db(), "default").id


def get_batch(batch_id: str) -> Batch:
    batch = db().get(Batch, batch_id)
    scope = program_scope()
    if batch is None or (scope is not None and batch.program_id != scope):
        abort(404)
    return batch


def get_study(study_id: int) -> Study:
    study = db().get(Study, study_id)
    scope = program_scope()
    if study is None or (scope is not None and study.program_id != scope and not specialist_may_see(study)):
        abort(404)
    return study


@bp.get("/favicon.ico")
def favicon():
    """Browsers ask for /favicon.ico whatever a page links: the same picture."""
    return redirect(url_for("static", filename="favicon.svg"), 301)


@bp.route("/")
@login_required
def index():
    if current_user.has_role("specialist"):
        return redirect(url_for("referrals.queue"))
    return redirect(url_for("portal.batches"))


@bp.route("/batches")
@role_required(*VIEW_ROLES)
def batches():
    search = (request.args.get("q") or "").strip()[:100]
    per_page = 50
    total, rows = reports.listed_batches(db(), program_scope(), search, 1, per_page)
    pages = max(1, -(-total // per_page))
    page = numbers.page_number(request.args.get("page"), pages)
    if page != 1:
        total, rows = reports.listed_batches(db(), program_scope(), search, page, per_page)
    return render_template("batches.html", batches=rows, search=search, page=page, pages=pages, total=total)


@bp.route("/upload", methods=["GET"])
@role_required(*UPLOAD_ROLES)
def upload():
    return render_template("upload.html", single=SingleStudyForm(), bulk=BulkForm())


@bp.route("/upload/template.csv")
@role_required(*UPLOAD_ROLES)
def template():
    return Response(
        manifest.template_csv(),
        mimetype="text/csv",
        headers={"Content-Disposition": "attachment; filename=dermascan-manifest-template.csv"},
    )


def _wants_json() -> bool:
    return (
        request.accept_mimetypes.best == "application/json"
        or request.headers.get("X-Requested-With") == "XMLHttpRequest"
    )


def _finish_upload(result, status=201, single: bool = False):
    """The answer to an upload (stored, and audited in the same transaction, by submission)."""
    report = result.report()
    if _wants_json():
        report["batch_url"] = url_for("portal.batch", batch_id=result.batch_id) if result.batch_id else None
        return jsonify(report), status
    if result.accepted:
        flash(f"{len(result.accepted)} accepted, {len(result.rejected)} rejected.", "info")
    study_id = result.accepted[0].study_id if single and len(result.accepted) == 1 else None
    return render_template("upload_report.html", report=report, study_id=study_id), status


@bp.route("/upload/single", methods=["POST"])
@role_required(*UPLOAD_ROLES)
def upload_single():
    form = SingleStudyForm()
    if not form.validate_on_submit():
        if _wants_json():
            return jsonify({"errors": form.errors}), 400
        return render_template("upload.html", single=form, bulk=BulkForm()), 400
    item = StudyInput(
        image=form.image.data.read(),
        metadata={
            "age_approx": None if form.age_approx.data is None else float(form.age_approx.data),
            "sex": form.sex.data,
            "anatom_site_general": form.anatom_site_general.data,
        },
        external_id=form.external_id.data or form.image.data.filename,
        patient_id=form.patient_id.data or None,
        lesion_id=form.lesion_id.data or None,
        acquired_at=form.acquired_at.data or None,
        row=1,
    )
    result = submission.submit(
        settings(), _program_id(), [item], source="portal", interactive=True,
        label=f"Single studies — {current_user.username}, {utcnow():%Y-%m-%d}", join_daily=True,
        user_id=current_user.id, ip=client_ip(),
    )  # fmt: skip
    return _finish_upload(result, 201 if result.accepted else 422, single=True)


@bp.route("/upload/bulk", methods=["POST"])
@role_required(*UPLOAD_ROLES)
def upload_bulk():
    form = BulkForm()
    if not form.validate_on_submit():
        if _wants_json():
            return jsonify({"errors": form.errors}), 400
        return render_template("upload.html", single=SingleStudyForm(), bulk=form), 400
    csv_text = None
    if form.manifest.data:
        try:
            csv_text = form.manifest.data.read().decode("utf-8-sig")
        except UnicodeDecodeError:
            return _upload_error("the manifest CSV is not UTF-8 text", 400)
    try:
        inputs, rejected = manifest.from_zip(form.archive.data.read(), settings(), csv_text)
    except IngestError as exc:
        return _upload_error(str(exc), http_status(exc))
    result = submission.submit(
        settings(), _program_id(), inputs, source="portal", label=form.label.data or form.archive.data.filename,
        user_id=current_user.id, prior_rejections=rejected, ip=client_ip(),
    )  # fmt: skip
    return _finish_upload(result, 201 if result.accepted else 422)


def _upload_error(message: str, status: int):
    if _wants_json():
        return jsonify({"error": message}), status
    flash(message, "error")
    return render_template("upload.html", single=SingleStudyForm(), bulk=BulkForm()), status


@bp.route("/batches/<batch_id>")
@role_required(*VIEW_ROLES)
def batch(batch_id):
    b = get_batch(batch_id)
    per_page = 100
    page = page_arg(max(1, -(-b.total // per_page)) if b.total else 1)
    rows = reports.result_rows(db(), b.id, offset=(page - 1) * per_page, limit=per_page)
    summary = reports.batch_summary(db(), b)
    return render_template(
        "batch.html",
        histogram=reports.probability_histogram(db(), b.id),
        batch=b,
        summary=summary,
        rows=rows,
        page=page,
        per_page=per_page,
        report=b.report or {},
    )


@bp.route("/batches/<batch_id>/status.json")
@role_required(*VIEW_ROLES)
def batch_status(batch_id):
    return jsonify(reports.batch_summary(db(), get_batch(batch_id)))


@bp.route("/batches/<batch_id>/results.<fmt>")
@role_required(*VIEW_ROLES)
def batch_results(batch_id, fmt):
    b = get_batch(batch_id)
    if fmt not in ("csv", "json", "fhir"):
        abort(404)
    audit_event("export", object_type="batch", object_id=b.id, detail={"format": fmt})
    db().commit()
    return streamed_export(b, fmt)


def streamed_export(b, fmt: str) -> Response:
    """The whole batch as one download, streamed a page of rows at a time (flat memory)."""
    factory = current_app.extensions["dermascan_sessions"]
    if fmt == "csv":
        body, mimetype = export.stream_csv(factory, b.id), "text/csv"
    elif fmt == "json":
        body, mimetype = export.stream_json(factory, b.id, reports.batch_summary(db(), b)), "application/json"
    else:
        body, mimetype = export.stream_fhir(factory, b.id, settings()), "application/fhir+json"
    name = f"dermascan-{b.id}.{'fhir.json' if fmt == 'fhir' else fmt}"
    return Response(body, mimetype=mimetype, headers={"Content-Disposition": f"attachment; filename={name}"})


MAX_SERVED_SIDE = 2048


def _image_response(data: bytes, thumb: int | None, mimetype: str = "image/jpeg"):
    """A study image as the portal serves it: re-encoded from the pixels alone, so no EXIF,
    GPS, maker notes or embedded profile of what was uploaded reaches the browser (the stored
    original and its sha256 stay as received); downscaled (JPEG draft mode first) to ``thumb``
    or to at most MAX_SERVED_SIDE pixels."""
    side = thumb or MAX_SERVED_SIDE
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (side, side))
        image = image.convert("RGB")
        image.thumbnail((side, side))
        buffer = io.BytesIO()
        if thumb or mimetype == "image/jpeg":
            image.save(buffer, "JPEG", quality=95)
            mimetype = "image/jpeg"
        else:
            image.save(buffer, "PNG")
            mimetype = "image/png"
    return Response(buffer.getvalue(), mimetype=mimetype)


@bp.route("/studies/<int:study_id>/image")
@role_required(*VIEW_ROLES)
def study_image(study_id):
    study = get_study(study_id)
    try:
        thumb = int_arg("thumb", None, 16, 512)
    except NumberError:
        abort(400, "thumb must be a whole number of pixels from 16 to 512")
    if study.image_purged_at is not None:
        abort(410, "the image was deleted under the retention policy (the result and decision are kept)")
    try:
        data = blob_store(settings()).get(study.image_sha256)
    except BlobUnavailable:
        raise
    except BlobError:
        abort(404)
    return _image_response(data, thumb, f"image/{study.image_format}")


@bp.route("/studies/<int:study_id>/result")
@role_required(*VIEW_ROLES)
def study_result(study_id):
    """One study's result (polled by the single upload's page until it is scored)."""
    return jsonify(reports.study_result(db(), get_study(study_id)))


@bp.route("/studies/<int:study_id>/heatmap")
@role_required("specialist", "admin")
def study_heatmap(study_id):
    study = get_study(study_id)
    prediction = db().scalar(
        select(Prediction)
        .where(Prediction.study_id == study.id, Prediction.heatmap_sha256.is_not(None))
        .order_by(Prediction.created_at.desc())
    )
    if prediction is None:
        abort(404)
    try:
        return _image_response(blob_store(settings()).get(prediction.heatmap_sha256), None, "image/png")
    except BlobUnavailable:
        raise
    except BlobError:
        abort(404)
