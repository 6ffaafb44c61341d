"""Admin pages: users, API tokens, DICOM destinations (results back to the PACS), the audit trail
(with CSV export), the operating point (referral threshold) and the worker metrics."""

from __future__ import annotations

import datetime as dt

from flask import Blueprint, Response, abort, current_app, flash, redirect, render_template, request, url_for
from flask_login import current_user
from flask_wtf import FlaskForm
from wtforms import BooleanField, DecimalField, IntegerField, PasswordField, RadioField, SelectField, StringField
from wtforms.validators import DataRequired, Length, NumberRange, Optional

from dermascan.errors import DomainError
from dermascan.governance import bundles, local_validation, operating_point
from dermascan.governance.operating_point import at_threshold
from dermascan.infra.schema import ApiToken, DicomDestination, Program, User
from dermascan.results_out import delivery_status, scheduling
from dermascan.results_out import destinations as dicom_destinations
from dermascan.security import accounts, audit, identity
from dermascan.security.accounts import AccountError, create_token, create_user
from dermascan.security.identity import get_or_create_program
from web.helpers import actor, audit_event, db, page_arg, role_required, settings

bp = Blueprint("admin", __name__, url_prefix="/admin")


class UserForm(FlaskForm):
    username = StringField("Username", validators=[DataRequired(), Length(max=80)])
    password = PasswordField("Password", validators=[DataRequired(), Length(min=10, max=200)])
    role = SelectField("Role", choices=[("uploader", "uploader"), ("specialist", "specialist"), ("admin", "admin")])
    program = StringField("Program / site", default="default", validators=[DataRequired(), Length(max=120)])


class TokenForm(FlaskForm):
    name = StringField("Token name", validators=[DataRequired(), Length(max=120)])
    program = StringField("Program / site", validators=[DataRequired(), Length(max=120)])


class RevokeForm(FlaskForm):
    pass


class DestinationForm(FlaskForm):
    program = StringField("Program / site", validators=[DataRequired(), Length(max=120)])
    name = StringField("Name", validators=[DataRequired(), Length(max=64)])
    kind = RadioField("Sent by", choices=[("dimse", "DIMSE C-STORE"), ("stow", "STOW-RS")], default="dimse")
    host = StringField("Host", validators=[Optional(), Length(max=255)])
    port = IntegerField("Port", validators=[Optional(), NumberRange(1, 65535)])
    ae_title = StringField("AE title", validators=[Optional(), Length(max=16)])
    tls = BooleanField("TLS")
    url = StringField("DICOMweb URL", validators=[Optional(), Length(max=2000)])
    username = StringField("User (basic auth; empty: the secret is a bearer token)", validators=[Optional(), Length(max=255)])  # fmt: skip
    secret = PasswordField("Password or token", validators=[Optional(), Length(max=2000)])


class PrevalenceForm(FlaskForm):
    program = SelectField("Program", coerce=int)
    prevalence = DecimalField(
        "Expected share of malignant lesions (%)", places=2, validators=[Optional(), NumberRange(0.01, 50)]
    )


class ThresholdForm(FlaskForm):
    threshold = DecimalField("Referral threshold", places=4, validators=[DataRequired(), NumberRange(0.0001, 0.9999)])
    confirm = BooleanField("I have checked the sensitivity and specificity above")


def _posted(model, row_id):
    """The row an admin's button acts on (its form's CSRF token checked): 400 without the token,
    404 for no such row."""
    if not RevokeForm().validate_on_submit():
        abort(400)
    row = db().get(model, row_id)
    if row is None:
        abort(404)
    return row


@bp.route("/users", methods=["GET", "POST"])
@role_required("admin")
def users():
    form = UserForm()
    if form.validate_on_submit():
        try:
            user = create_user(
                db(), form.username.data, form.password.data, form.role.data,
                get_or_create_program(db(), form.program.data.strip()).id, actor(),
            )  # fmt: skip
        except AccountError as exc:
            db().rollback()
            flash(str(exc), "error")
        else:
            db().commit()
            flash(f"User {user.username} ({form.role.data}) created.", "info")
            return redirect(url_for("admin.users"))
    rows = accounts.users(db())
    return render_template("admin_users.html", form=form, users=rows, change=UserChangeForm())


class UserChangeForm(FlaskForm):
    action = SelectField(
        "Action",
        choices=[
            ("disable", "disable"),
            ("enable", "enable"),
            ("set_role", "set role"),
            ("reset_password", "reset password"),
            ("grant_all_programs", "see every program's batches"),
            ("own_program_only", "own program's batches only"),
        ],
    )
    role = SelectField(
        "Role",
        choices=[("", "—"), ("uploader", "uploader"), ("specialist", "specialist"), ("admin", "admin")],
        validate_choice=False,  # checked by the account rules (an unknown role is refused there)
    )
    password = PasswordField("New password", validators=[Optional(), Length(min=10, max=200)])


@bp.post("/users/<int:user_id>")
@role_required("admin")
def change_user(user_id):
    """Disable, enable, set a role or reset a password: each ends the user's sessions, audited."""
    from dermascan.security.accounts import change_user as apply_change

    target = db().get(User, user_id)
    if target is None:
        abort(404)
    form = UserChangeForm()
    if not form.validate_on_submit():
        flash("; ".join(f"{k}: {', '.join(v)}" for k, v in form.errors.items()) or "invalid request", "error")
        return redirect(url_for("admin.users")), 303
    action = form.action.data
    if target.id == current_user.id and action in ("disable", "set_role"):
        flash("You cannot disable yourself or change your own role.", "error")
        return redirect(url_for("admin.users")), 303
    change = {
        "disable": {"active": False},
        "enable": {"active": True},
        "set_role": {"role": form.role.data or None},
        "reset_password": {"password": form.password.data or None},
        "grant_all_programs": {"all_programs": True},
        "own_program_only": {"all_programs": False},
    }[action]
    try:
        message = apply_change(db(), target, **change, actor=actor())
    except (AccountError, ValueError) as exc:
        db().rollback()
        flash(str(exc), "error")
        return redirect(url_for("admin.users")), 303
    db().commit()
    flash(message, "info")
    return redirect(url_for("admin.users"))


@bp.route("/tokens", methods=["GET", "POST"])
@role_required("admin")
def tokens():
    form = TokenForm()
    plain = None
    if form.validate_on_submit():
        _, plain = create_token(
            db(), get_or_create_program(db(), form.program.data.strip()).id, form.name.data, actor()
        )
        db().commit()
    return _tokens_page(form, plain=plain)


def _tokens_page(form, **shown):
    rows = accounts.tokens(db())
    programs = identity.programs(db())
    return render_template("admin_tokens.html", form=form, tokens=rows, programs=programs, revoke=RevokeForm(), **shown)


@bp.post("/programs/<int:program_id>/callback-secret")
@role_required("admin")
def issue_callback_secret(program_id):
    """A new callback signing secret for the program, shown once; the previous one stops signing."""
    program = _posted(Program, program_id)
    secret = accounts.issue_callback_secret(db(), program, settings().secret_key, actor())
    db().commit()
    return _tokens_page(TokenForm(formdata=None), callback_secret=secret, callback_program=program.name)


@bp.post("/tokens/<int:token_id>/revoke")
@role_required("admin")
def revoke_token(token_id):
    accounts.revoke_token(db(), _posted(ApiToken, token_id), actor())
    db().commit()
    return redirect(url_for("admin.tokens"))


@bp.route("/destinations", methods=["GET", "POST"])
@role_required("admin")
def destinations():
    """Where each program's results go back as DICOM; what was sent and what failed."""
    form = DestinationForm()
    if form.validate_on_submit():
        dimse = form.kind.data == "dimse"
        try:
            row = dicom_destinations.add_destination(
                db(), settings(), get_or_create_program(db(), form.program.data.strip()), form.name.data,
                host=form.host.data if dimse else None, port=form.port.data if dimse else None,
                ae_title=form.ae_title.data if dimse else None, tls=bool(form.tls.data) and dimse,
                url=None if dimse else form.url.data, username=None if dimse else form.username.data,
                secret=None if dimse else form.secret.data, actor=actor(),
            )  # fmt: skip
        except DomainError as exc:
            db().rollback()
            flash(str(exc), "error")
        else:
            db().commit()
            flash(f"Destination {row.name} added: {row.target}.", "info")
            for warning in dicom_destinations.warnings(row):
                flash(f"Destination {row.name} {warning}.", "warning")
            return redirect(url_for("admin.destinations"))
    elif request.method == "POST":
        flash("Check the destination's fields.", "error")
    rows = dicom_destinations.listed(db())
    return render_template(
        "admin_destinations.html", form=form, destinations=rows,
        counts=delivery_status.status_counts(db()), failures=delivery_status.recent_failures(db()), action=RevokeForm(),
        programs=identity.programs(db()), warnings={d.id: dicom_destinations.warnings(d) for d in rows},
    )  # fmt: skip


@bp.post("/destinations/<int:destination_id>/enabled")
@role_required("admin")
def toggle_destination(destination_id):
    row = _posted(DicomDestination, destination_id)
    dicom_destinations.set_enabled(db(), row, not row.enabled, actor())
    db().commit()
    return redirect(url_for("admin.destinations"))


@bp.post("/programs/<int:program_id>/dicom-results")
@role_required("admin")
def program_dicom_results(program_id):
    """Whether the program's portal and API studies get their results in its PACS too."""
    program = _posted(Program, program_id)
    identity.set_dicom_results_for_all(db(), program, not program.dicom_results_for_all, actor())
    db().commit()
    return redirect(url_for("admin.destinations"))


@bp.post("/programs/<int:program_id>/require-metadata")
@role_required("admin")
def program_require_metadata(program_id):
    """Whether the program refuses studies sent without age, sex or anatomic site."""
    program = _posted(Program, program_id)
    identity.set_require_metadata(db(), program, not program.require_metadata, actor())
    db().commit()
    flash(
        f"{program.name}: studies without age, sex or site are now {'refused' if program.require_metadata else 'scored'}.",
        "info",
    )
    return redirect(url_for("admin.tokens"))


@bp.post("/studies/<int:study_id>/resend")
@role_required("admin")
def resend_study(study_id):
    """Send a study's failed deliveries again (after the destination was fixed)."""
    if not RevokeForm().validate_on_submit():
        abort(400)
    audit_event("delivery_resent", object_type="study", object_id=study_id)
    db().commit()
    sent = scheduling.resend(settings(), study_id)
    flash(f"Study {study_id}: {sent} deliveries sent again.", "info")
    return redirect(url_for("admin.destinations"))


@bp.get("/audit")
@role_required("admin")
def audit_log():
    page = page_arg()
    args = {k: (request.args.get(k) or "").strip()[:64] for k in ("action", "user", "since", "until", "study")}
    try:
        since = dt.datetime.fromisoformat(args["since"]).replace(tzinfo=dt.UTC) if args["since"] else None
        until = (
            dt.datetime.fromisoformat(args["until"]).replace(tzinfo=dt.UTC) + dt.timedelta(days=1)
            if args["until"]
            else None
        )
        study = (
            int(args["study"])
            if args["study"].isascii() and args["study"].isdigit() and len(args["study"]) < 12
            else None
        )
    except ValueError:
        since = until = study = None
        flash("Dates are YYYY-MM-DD.", "error")
    where = audit.EventFilter(args["action"] or None, args["user"] or None, since, until, study)
    events = audit.events_page(db(), page, 100, where=where)
    shown = {k: v for k, v in args.items() if v}
    return render_template("admin_audit.html", events=events, page=page, filters=args, shown=shown,
                           actions=audit.actions(db()))  # fmt: skip


@bp.get("/audit.csv")
@role_required("admin")
def audit_csv():
    audit_event("audit_exported", object_type="audit")
    db().commit()
    factory = current_app.extensions["dermascan_sessions"]
    return Response(
        audit.stream_csv(factory),
        mimetype="text/csv",
        headers={"Content-Disposition": "attachment; filename=dermascan-audit.csv"},
    )


@bp.route("/model", methods=["GET", "POST"])
@role_required("admin")
def model():
    bundle = bundles.active(db())
    if bundle is None:
        return render_template("admin_model.html", bundle=None, form=None, preview=None, current=None)
    form = ThresholdForm(data={"threshold": round(bundle.threshold, 4)} if request.method == "GET" else None)
    preview = None
    current = at_threshold(bundle.manifest, bundle.threshold)
    if form.validate_on_submit():
        value = float(form.threshold.data)
        preview = at_threshold(bundle.manifest, value)
        if form.confirm.data:
            operating_point.set_threshold(db(), bundle, value, actor())
            db().commit()
            flash(f"Referral threshold set to {value:.4f}. It applies to studies scored from now on.", "info")
            return redirect(url_for("admin.model"))
    status = 400 if request.method == "POST" and form.errors else 200
    return render_template("admin_model.html", **_model_page(bundle, form, preview, current)), status


def _model_page(bundle, form, preview, current, prevalence_form=None) -> dict:
    """The operating-point page's context: the ROC curve with the current (and previewed) point,
    and the referrals to expect per 1,000 studies at the validation data's prevalence and at
    each program's expected prevalence."""
    programs = identity.programs(db())
    prevalence_form = prevalence_form or PrevalenceForm()
    prevalence_form.program.choices = [(p.id, p.name) for p in programs]
    own = operating_point.validation_prevalence(bundle.manifest)
    expected = [
        {
            "name": "validation data" if own is not None else "",
            "prevalence": own,
            "per_1000": operating_point.referrals_per_1000(current, own),
        }
    ] + [
        {"name": p.name, "prevalence": p.expected_prevalence, "per_1000": operating_point.referrals_per_1000(current, p.expected_prevalence)}
        for p in programs
        if p.expected_prevalence
    ]  # fmt: skip
    return {
        "bundle": bundle,
        "bundles": bundles.listed(db()),
        "activate": RevokeForm(),
        "form": form,
        "preview": preview,
        "current": current,
        "roc": operating_point.roc_curve(bundle.manifest),
        "expected": [e for e in expected if e["prevalence"] is not None],
        "prevalence_form": prevalence_form,
        "program_thresholds": [(p, local_validation.program_threshold(db(), p.id, bundle.version)) for p in programs],
    }


@bp.post("/model/bundles/<version>/activate")
@role_required("admin")
def activate_bundle(version):
    """Make a registered bundle the one that scores (audited); workers with another bundle stop
    taking work until theirs is active."""
    if not RevokeForm().validate_on_submit():
        abort(400)
    try:
        bundles.activate_version(db(), version, by_user_id=current_user.id)
    except DomainError:
        abort(404)
    db().commit()
    flash(f"Bundle {version} is now the one that scores.", "info")
    return redirect(url_for("admin.model"))


@bp.post("/model/bundles/<version>/<any(shadow, retire):change>")
@role_required("admin")
def bundle_state(version, change):
    """Put a bundle in shadow, or retire it (audited); the active bundle cannot be either."""
    if not RevokeForm().validate_on_submit():
        abort(400)
    try:
        row = getattr(bundles, f"{change}_version")(db(), version, by_user_id=current_user.id)
    except DomainError as exc:
        db().rollback()
        flash(str(exc), "error")
        return redirect(url_for("admin.model"))
    db().commit()
    flash(f"Bundle {version} is now {row.state}.", "info")
    return redirect(url_for("admin.model"))


@bp.route("/programs/<int:program_id>/operating-point", methods=["GET", "POST"])
@role_required("admin")
def program_operating_point(program_id):
    """A program's local validation (its studies with recorded outcomes, scored by the active
    bundle) and its own referral threshold: previewed on the local set, then set when confirmed
    (audited), or cleared back to the bundle's."""
    program = db().get(Program, program_id)
    if program is None:
        abort(404)
    bundle = bundles.active(db())
    own = None if bundle is None else local_validation.program_threshold(db(), program.id, bundle.version)
    form = ThresholdForm(data={"threshold": round(own.threshold, 4)} if own and request.method == "GET" else None)
    preview = None
    report = local_validation.local_validation(db(), program, bundle)
    if bundle is not None and request.method == "POST" and request.form.get("clear"):
        if not RevokeForm().validate_on_submit():
            abort(400)
        local_validation.set_program_threshold(db(), program, bundle, None, actor())
        db().commit()
        flash(f"{program.name}: the bundle's threshold {bundle.threshold:.4f} applies again.", "info")
        return redirect(url_for("admin.program_operating_point", program_id=program.id))
    if bundle is not None and form.validate_on_submit():
        value = float(form.threshold.data)
        p, y, _ = local_validation.labelled(db(), program, bundle)
        preview = local_validation.candidate(y, p, value, "previewed", report.prevalence)
        if form.confirm.data:
            local_validation.set_program_threshold(db(), program, bundle, value, actor())
            db().commit()
            flash(f"{program.name}: referral threshold {value:.4f}; it applies to its studies scored from now on.", "info")  # fmt: skip
            return redirect(url_for("admin.program_operating_point", program_id=program.id))
    status = 400 if request.method == "POST" and form.errors else 200
    return render_template(
        "admin_program_threshold.html", program=program, bundle=bundle, own=own, report=report, form=form,
        preview=preview, clear=RevokeForm(), enough=local_validation.ENOUGH_MALIGNANT,
    ), status  # fmt: skip


@bp.post("/model/prevalence")
@role_required("admin")
def program_prevalence():
    bundle = bundles.active(db())
    if bundle is None:
        abort(404)
    form = PrevalenceForm()
    form.program.choices = [(p.id, p.name) for p in identity.programs(db())]
    if not form.validate_on_submit():
        current = at_threshold(bundle.manifest, bundle.threshold)
        context = _model_page(
            bundle, ThresholdForm(data={"threshold": round(bundle.threshold, 4)}), None, current, form
        )
        return render_template("admin_model.html", **context), 400
    value = None if form.prevalence.data is None else float(form.prevalence.data) / 100
    program = db().get(Program, form.program.data)
    operating_point.set_expected_prevalence(db(), program, value, actor())
    db().commit()
    flash(f"{program.name}: expected prevalence {'cleared' if value is None else f'{value:.2%}'}.", "info")
    return redirect(url_for("admin.model"))


@bp.get("/metrics")
@role_required("admin")
def metrics():
    from web.metrics import snapshot

    return render_template("admin_metrics.html", data=snapshot(), inf=float("inf"))
