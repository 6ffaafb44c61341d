"""The specialist referral queue and case pages."""

from __future__ import annotations

import datetime as dt

from flask import Blueprint, abort, flash, redirect, render_template, request, url_for
from flask_login import current_user
from flask_wtf import FlaskForm
from sqlalchemy import select
from wtforms import BooleanField, DateField, HiddenField, RadioField, SelectField, StringField, TextAreaField
from wtforms.validators import DataRequired, Length, Optional

from dermascan.errors import DomainError
from dermascan.infra.broker import CALLBACKS, TASK_DECISION_CALLBACK, send
from dermascan.infra.schema import DECISION_LABELS as LABELS
from dermascan.infra.schema import Program, Referral
from dermascan.ingest import numbers
from dermascan.ingest.records import SITES
from dermascan.referrals import outcomes, queue
from dermascan.referrals.case import case_file
from dermascan.results_out import callbacks, delivery_status, objects, scheduling
from dermascan.screening import referral_policy
from dermascan.security import identity
from web.errors import http_status
from web.helpers import MAX_ID, audit_event, client_ip, db, role_required, settings

bp = Blueprint("referrals", __name__, url_prefix="/referrals")
ROLES = ("specialist", "admin")
DECISION_LABELS = {decision.value: label for decision, label in LABELS.items()}


class ClaimForm(FlaskForm):
    site = HiddenField()
    program = HiddenField()
    batch = HiddenField()


def _diagnosis_choices(empty: str) -> list[tuple[str, str]]:
    """The differential's coded list (plus "other"), as specialists record a diagnosis."""
    from dermascan.screening.reports import DIAGNOSIS_CHOICES

    return [("", empty), *DIAGNOSIS_CHOICES, ("other", "Other")]


class DecisionForm(FlaskForm):
    decision = RadioField("Decision", choices=list(DECISION_LABELS.items()), validators=[DataRequired()])
    diagnosis = SelectField("Your diagnosis", choices=[], validators=[Optional()])
    note = TextAreaField("Note", validators=[Length(max=4000)])
    settle_lesion = BooleanField("Settle this lesion's other waiting visits with the same decision", default=True)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.diagnosis.choices = _diagnosis_choices("— not stated —")


class AmendForm(FlaskForm):
    decision = RadioField("Amended decision", choices=list(DECISION_LABELS.items()), validators=[DataRequired()])
    diagnosis = SelectField("Your diagnosis", choices=[], validators=[Optional()])
    note = TextAreaField("Note", validators=[Length(max=4000)])
    reason = TextAreaField(
        "Reason for the amendment", validators=[DataRequired(message="say why the decision changes"), Length(max=2000)]
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.diagnosis.choices = _diagnosis_choices("— not stated —")


class HandOverForm(FlaskForm):
    colleague = SelectField("Colleague", coerce=int, validators=[DataRequired(message="choose a colleague")])
    kind = RadioField(
        "Ask for", choices=[("assign", "Assign the case to them"), ("second_opinion", "A second opinion")],
        default="second_opinion", validators=[DataRequired()],
    )  # fmt: skip
    note = TextAreaField("Note for them", validators=[Length(max=2000)])


class SearchForm(FlaskForm):
    class Meta:
        csrf = False  # a GET search changes nothing

    q = StringField("Reference or patient", validators=[Optional(), Length(max=200)])
    received_from = DateField("Received from", validators=[Optional()])
    received_to = DateField("to", validators=[Optional()])
    status = SelectField(
        "Status", choices=[("", "any"), ("open", "waiting"), ("claimed", "being reviewed"), ("decided", "decided")],
        validators=[Optional()],
    )  # fmt: skip
    mine = BooleanField("Decided by me")


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
        super().__init__(*args, **kwargs)
        self.diagnosis.choices = _diagnosis_choices("— not known —")


def _id_or_none(value) -> int | None:
    """A filter's id: an integer in the database's range, else no filter (the queue unfiltered)."""
    try:
        return None if value in (None, "") else numbers.parse_int(value, "program", 1, MAX_ID)
    except numbers.NumberError:
        return None


def _filter(source) -> queue.QueueFilter:
    program = source.get("program") or None
    suspected = source.get("suspected") or None
    return queue.QueueFilter(
        site=source.get("site") or None,
        program_id=_id_or_none(program),
        batch_id=source.get("batch") or None,
        suspected=suspected if suspected in {code for code, _ in _diagnosis_choices("")} else None,
    )


@bp.get("/", endpoint="queue")
@role_required(*ROLES)
def queue_page():
    flt = _filter(request.args)
    timeout = settings().claim_timeout_s
    cases = queue.group_by_lesion(queue.open_cases(db(), timeout, flt))
    stats = queue.queue_stats(db(), timeout, flt)
    mine = queue.current_claim(db(), current_user.id, timeout)
    programs = list(db().scalars(select(Program).order_by(Program.name)))
    return render_template(
        "queue.html", cases=cases, stats=stats, mine=mine, flt=flt, sites=SITES, programs=programs,
        batches=queue.batches_with_referrals(db()), claim=ClaimForm(data=request.args),
        category_labels=referral_policy.CATEGORY_LABELS, tier_labels=referral_policy.TIER_LABELS,
        diagnoses=_diagnosis_choices("all")[1:-1], handed=queue.handed_to(db(), current_user.id),
        handover_kinds=queue.HANDOVER_KINDS,
    )  # fmt: skip


@bp.get("/search")
@role_required(*ROLES)
def search():
    """Find a case again: by the sender's reference, the patient, the day received, its status,
    or the cases the reader decided."""
    form = SearchForm(request.args)
    found = None
    if request.args and form.validate():
        text = (form.q.data or "").strip() or None
        pseudonyms = (
            [identity.pseudonymise(settings().secret_key, p.id, text) for p in db().scalars(select(Program))]
            if text else None
        )  # fmt: skip
        found = queue.search(
            db(),
            queue.Search(
                text=text, received_from=form.received_from.data, received_to=form.received_to.data,
                decided_by_id=current_user.id if form.mine.data else None, status=form.status.data or None,
            ),
            pseudonyms,
        )  # fmt: skip
        audit_event("search", object_type="referral", detail={
            "text": text, "from": _day(form.received_from.data), "to": _day(form.received_to.data),
            "status": form.status.data or None, "mine": bool(form.mine.data), "found": len(found),
        })  # fmt: skip
        db().commit()
    status = 400 if form.errors else 200
    return render_template(
        "search.html", form=form, found=found, labels=DECISION_LABELS,
        category_labels=referral_policy.CATEGORY_LABELS,
    ), status  # fmt: skip


def _day(value: dt.date | None) -> str | None:
    return None if value is None else value.isoformat()


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


def _case_page(referral: Referral, form=None, outcome_form=None, status: int = 200, handover=None, amend_form=None):
    found = case_file(db(), referral, current_user.id, settings().claim_timeout_s)
    handover = handover or HandOverForm(formdata=None)
    handover.colleague.choices = [(u.id, u.username) for u in queue.colleagues(db(), current_user.id)]
    page = render_template(
        "case.html", **vars(found), form=form or DecisionForm(formdata=None), release=ReleaseForm(),
        labels=DECISION_LABELS, outcome_form=outcome_form or OutcomeForm(formdata=None),
        deliveries=delivery_status.deliveries(db(), referral.study_id), handover=handover,
        handover_kinds=queue.HANDOVER_KINDS, diagnoses=dict(_diagnosis_choices("")),
        amend_form=amend_form or AmendForm(formdata=None), amendments=queue.amendments(db(), referral.id),
        siblings=queue.siblings(db(), referral), timeout_s=settings().claim_timeout_s,
        may_amend=referral.decided_by_id == current_user.id or current_user.role == "admin",
    )  # fmt: skip
    return page, status


@bp.post("/<int:referral_id>/amend")
@role_required(*ROLES)
def amend(referral_id):
    """Amend a decided case (its decider or an admin; a reason required; audited): the amended
    decision reaches everything the first one reached — a superseding verified SR to the PACS,
    the sender's callback, FHIR and the API."""
    referral = _referral(referral_id)
    form = AmendForm()
    if not form.validate_on_submit():
        return _case_page(referral, amend_form=form, status=400)
    was = referral.decision.value if referral.decision else None
    try:
        referral = queue.amend(
            db(), referral_id, current_user.id, form.decision.data, form.note.data, form.reason.data,
            form.diagnosis.data, is_admin=current_user.role == "admin",
        )  # fmt: skip
    except queue.ReferralError as exc:
        db().rollback()
        flash(str(exc), "error")
        return redirect(url_for("referrals.case", referral_id=referral_id)), 303
    audit_event("decision_amended", object_type="referral", object_id=referral.id, detail={
        "study_id": referral.study_id, "from": was, "to": form.decision.data, "reason": form.reason.data.strip(),
        "diagnosis": referral.specialist_diagnosis, "note": referral.note,
    })  # fmt: skip
    _send_decision(referral, again=True)
    flash(f"Decision amended: {DECISION_LABELS[form.decision.data]}.", "info")
    return redirect(url_for("referrals.case", referral_id=referral.id))


def _send_decision(referral: Referral, again: bool = False, others=()) -> None:
    """Commit, then send the decision where results go: a verified SR to the PACS (superseding an
    earlier one when ``again``) and the sender's callback — for ``others`` settled with it too."""
    cases = [referral, *others]
    wanted = [r.id for r in cases if callbacks.wants_decision_callback(db(), r)]
    studies = [r.study_id for r in cases]
    db().commit()
    scheduling.schedule(settings(), studies, objects=(objects.VERIFIED_SR,), again=again)
    for referral_id in wanted:
        send(settings(), TASK_DECISION_CALLBACK, [referral_id, 0], queue=CALLBACKS)


@bp.post("/<int:referral_id>/claim")
@role_required(*ROLES)
def claim(referral_id):
    """Claim this very case (opened from a link or a search)."""
    if not ReleaseForm().validate_on_submit():
        abort(400)
    try:
        referral = queue.claim(db(), referral_id, current_user.id, settings().claim_timeout_s)
    except queue.ReferralError as exc:
        db().rollback()
        flash(str(exc), "error")
        return redirect(url_for("referrals.case", referral_id=referral_id)), 303
    audit_event("claim", object_type="referral", object_id=referral.id, detail={"study_id": referral.study_id})
    db().commit()
    return redirect(url_for("referrals.case", referral_id=referral.id))


@bp.post("/<int:referral_id>/hand-over")
@role_required(*ROLES)
def hand_over(referral_id):
    """Assign the case to a colleague or ask one for a second opinion (audited)."""
    referral = _referral(referral_id)
    form = HandOverForm()
    form.colleague.choices = [(u.id, u.username) for u in queue.colleagues(db(), current_user.id)]
    if not form.validate_on_submit():
        return _case_page(referral, handover=form, status=400)
    try:
        referral = queue.hand_over(
            db(), referral_id, current_user.id, form.colleague.data, form.kind.data, form.note.data,
            settings().claim_timeout_s,
        )  # fmt: skip
    except queue.ReferralError as exc:
        db().rollback()
        flash(str(exc), "error")
        return redirect(url_for("referrals.case", referral_id=referral_id)), 303
    audit_event("handover", object_type="referral", object_id=referral.id, detail={
        "study_id": referral.study_id, "kind": form.kind.data, "to": referral.assigned_to.username,
        "note": referral.assignment_note,
    })  # fmt: skip
    db().commit()
    flash(f"Case #{referral.id}: {queue.HANDOVER_KINDS[form.kind.data]} — {referral.assigned_to.username}.", "info")
    return redirect(url_for("referrals.queue"))


@bp.post("/<int:referral_id>/decide")
@role_required(*ROLES)
def decide(referral_id):
    form = DecisionForm()
    if not form.validate_on_submit():  # said next to the form, which keeps the note typed so far
        return _case_page(_referral(referral_id), form=form, status=400)
    try:
        referral = queue.decide(
            db(), referral_id, current_user.id, form.decision.data, form.note.data, settings().claim_timeout_s,
            form.diagnosis.data, settle_lesion=bool(form.settle_lesion.data),
        )  # fmt: skip
    except queue.ReferralError as exc:
        db().rollback()
        flash(str(exc), "error")
        return redirect(url_for("referrals.case", referral_id=referral_id)), 303
    audit_event(
        "decision",
        object_type="referral",
        object_id=referral.id,
        detail={"study_id": referral.study_id, "decision": form.decision.data, "note": referral.note,
                "diagnosis": referral.specialist_diagnosis, "settled": [r.id for r in referral.settled]},
    )  # fmt: skip
    for other in referral.settled:  # the same lesion's other visits, settled with it
        audit_event("decision", object_type="referral", object_id=other.id, detail={
            "study_id": other.study_id, "decision": form.decision.data, "settled_with": referral.id})  # fmt: skip
    # the decision goes back to the PACS, verified by its author, and to the sender's callback URL
    _send_decision(referral, others=referral.settled)
    settled = f" — and {len(referral.settled)} earlier visit(s) of the same lesion" if referral.settled else ""
    flash(f"Decision saved: {DECISION_LABELS[form.decision.data]}{settled}.", "info")
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
