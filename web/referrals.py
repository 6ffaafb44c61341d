"""The specialist referral queue and case pages."""

from __future__ import annotations

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user
from flask_wtf import FlaskForm
from sqlalchemy import select
from wtforms import HiddenField, RadioField, SelectField, TextAreaField
from wtforms.validators import DataRequired, Length, Optional

from dermascan.errors import DomainError
from dermascan.infra.schema import DECISION_LABELS as LABELS
from dermascan.infra.schema import Program, Referral
from dermascan.ingest import numbers
from dermascan.ingest.records import SITES
from dermascan.referrals import outcomes, queue
from dermascan.referrals.case import case_file
from dermascan.results_out import delivery_status, objects, scheduling
from dermascan.screening import referral_policy
from web.errors import http_status
from web.helpers import MAX_ID, audit_event, client_ip, db, role_required, settings

bp = Blueprint("referrals", __name__, url_prefix="/referrals")
ROLES = ("specialist", "admin")
DECISION_LABELS = {decision.value: label for decision, label in LABELS.items()}


class ClaimForm(FlaskForm):
    site = HiddenField()
    program = HiddenField()
    batch = HiddenField()


class DecisionForm(FlaskForm):
    decision = RadioField("Decision", choices=list(DECISION_LABELS.items()), validators=[DataRequired()])
    note = TextAreaField("Note", validators=[Length(max=4000)])


class ReleaseForm(FlaskForm):
    pass


class OutcomeForm(FlaskForm):
    # no default: one careless click must not record a malignancy
    outcome = SelectField(
        "Outcome",
        choices=[("", "— choose the outcome —"), ("malignant", "Malignant (histopathology)"),
                 ("benign", "Benign (histopathology)"), ("not_biopsied", "Not biopsied")],
        validators=[DataRequired(message="choose the outcome")],
    )  # fmt: skip
    # the same coded list as the model's differential, plus "other"
    diagnosis = SelectField("Diagnosis", choices=[], validators=[Optional()])

    def __init__(self, *args, **kwargs):
        from dermascan.screening.reports import DIAGNOSIS_CHOICES

        super().__init__(*args, **kwargs)
        self.diagnosis.choices = [("", "— not known —"), *DIAGNOSIS_CHOICES, ("other", "Other")]


def _id_or_none(value) -> int | None:
    """A filter's id: an integer in the database's range, else no filter (the queue unfiltered)."""
    try:
        return None if value in (None, "") else numbers.parse_int(value, "program", 1, MAX_ID)
    except numbers.NumberError:
        return None


def _filter(source) -> queue.QueueFilter:
    program = source.get("program") or None
    return queue.QueueFilter(
        site=source.get("site") or None,
        program_id=_id_or_none(program),
        batch_id=source.get("batch") or None,
    )


@bp.get("/", endpoint="queue")
@role_required(*ROLES)
def queue_page():
    flt = _filter(request.args)
    timeout = settings().claim_timeout_s
    cases = queue.open_cases(db(), timeout, flt)
    stats = queue.queue_stats(db(), timeout, flt)
    mine = queue.current_claim(db(), current_user.id, timeout)
    programs = list(db().scalars(select(Program).order_by(Program.name)))
    return render_template(
        "queue.html", cases=cases, stats=stats, mine=mine, flt=flt, sites=SITES, programs=programs,
        batches=queue.batches_with_referrals(db()), claim=ClaimForm(data=request.args),
        category_labels=referral_policy.CATEGORY_LABELS, tier_labels=referral_policy.TIER_LABELS,
    )  # fmt: skip


@bp.post("/claim")
@role_required(*ROLES)
def claim_next():
    form = ClaimForm()
    if not form.validate_on_submit():
        abort(400)
    referral = queue.claim_next(db(), current_user.id, settings().claim_timeout_s, _filter(request.form))
    if referral is None:
        db().rollback()
        flash("The queue is empty.", "info")
        return redirect(url_for("referrals.queue"))
    audit_event("claim", object_type="referral", object_id=referral.id, detail={"study_id": referral.study_id})
    db().commit()
    return redirect(url_for("referrals.case", referral_id=referral.id))


def _referral(referral_id: int) -> Referral:
    referral = db().get(Referral, referral_id)
    if referral is None:
        abort(404)
    return referral


@bp.get("/<int:referral_id>")
@role_required(*ROLES)
def case(referral_id):
    referral = _referral(referral_id)
    audit_event("view", object_type="referral", object_id=referral.id, detail={"study_id": referral.study_id})
    db().commit()
    return _case_page(referral)


def _case_page(referral: Referral, form=None, outcome_form=None, status: int = 200):
    found = case_file(db(), referral, current_user.id, settings().claim_timeout_s)
    page = render_template(
        "case.html", **vars(found), form=form or DecisionForm(formdata=None), release=ReleaseForm(),
        labels=DECISION_LABELS, outcome_form=outcome_form or OutcomeForm(formdata=None),
        deliveries=delivery_status.deliveries(db(), referral.study_id),
    )  # fmt: skip
    return page, status


@bp.post("/<int:referral_id>/decide")
@role_required(*ROLES)
def decide(referral_id):
    form = DecisionForm()
    if not form.validate_on_submit():  # said next to the form, which keeps the note typed so far
        return _case_page(_referral(referral_id), form=form, status=400)
    try:
        referral = queue.decide(
            db(), referral_id, current_user.id, form.decision.data, form.note.data, settings().claim_timeout_s
        )
    except queue.ReferralError as exc:
        db().rollback()
        flash(str(exc), "error")
        return redirect(url_for("referrals.case", referral_id=referral_id)), 303
    audit_event(
        "decision",
        object_type="referral",
        object_id=referral.id,
        detail={"study_id": referral.study_id, "decision": form.decision.data, "note": referral.note},
    )
    db().commit()
    # the decision goes back to the PACS, verified by its author
    scheduling.schedule(settings(), [referral.study_id], objects=(objects.VERIFIED_SR,))
    flash(f"Decision saved: {DECISION_LABELS[form.decision.data]}.", "info")
    return redirect(url_for("referrals.queue"))


@bp.post("/<int:referral_id>/outcome")
@role_required(*ROLES)
def record_outcome(referral_id):
    """The case's histopathology (or not biopsied), recorded later by a specialist; audited."""
    referral = _referral(referral_id)
    form = OutcomeForm()
    if not form.validate_on_submit():
        return _case_page(referral, outcome_form=form, status=400)
    try:
        outcomes.record(
            db(), referral.study, form.outcome.data, form.diagnosis.data, source="portal", user_id=current_user.id,
            ip=client_ip(),
        )  # fmt: skip
    except DomainError as exc:
        db().rollback()
        flash(str(exc), "error")
        return redirect(url_for("referrals.case", referral_id=referral_id)), 303
    db().commit()
    flash("Outcome recorded.", "info")
    return redirect(url_for("referrals.case", referral_id=referral_id))


@bp.post("/<int:referral_id>/release")
@role_required(*ROLES)
def release(referral_id):
    if not ReleaseForm().validate_on_submit():
        abort(400)
    try:
        referral = queue.release(db(), referral_id, current_user.id, settings().claim_timeout_s)
    except queue.ReferralError as exc:
        db().rollback()
        abort(http_status(exc))
    audit_event("release", object_type="referral", object_id=referral.id, detail={"study_id": referral.study_id})
    db().commit()
    return redirect(url_for("referrals.queue"))
