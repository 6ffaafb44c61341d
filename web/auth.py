"""Log in and out (Flask-Login sessions), with login rate limiting kept in the audit table so
it holds across gunicorn workers."""

from __future__ import annotations

import datetime as dt

from flask import Blueprint, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_user, logout_user
from flask_wtf import FlaskForm
from sqlalchemy import func, select
from wtforms import PasswordField, StringField
from wtforms.validators import DataRequired, Length

from dermascan import audit
from dermascan.accounts import authenticate
from dermascan.schema import AuditEvent, utcnow
from web.extensions import PortalUser
from web.helpers import client_ip, db, settings

bp = Blueprint("auth", __name__)


class LoginForm(FlaskForm):
    username = StringField("Username", validators=[DataRequired(), Length(max=80)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=200)])


def _recent_failures(username: str, ip: str | None) -> int:
    since = utcnow() - dt.timedelta(minutes=1)
    return db().scalar(
        select(func.count())
        .select_from(AuditEvent)
        .where(AuditEvent.action == "login_failed", AuditEvent.at >= since)
        .where((AuditEvent.object_id == username) | (AuditEvent.ip == ip))
    )


@bp.route("/login", methods=["GET", "POST"])
def login():
    if current_user.is_authenticated:
        return redirect(url_for("portal.index"))
    form = LoginForm()
    status = 200
    if form.validate_on_submit():
        username, ip = form.username.data.strip(), client_ip()
        if _recent_failures(username, ip) >= settings().login_attempts_per_minute:
            audit.record(db(), "login_throttled", object_type="user", object_id=username, ip=ip)
            db().commit()
            flash("Too many failed attempts. Wait a minute and try again.", "error")
            return render_template("login.html", form=form), 429
        user = authenticate(db(), username, form.password.data)
        if user is None:
            audit.record(db(), "login_failed", object_type="user", object_id=username, ip=ip)
            db().commit()
            flash("Unknown username or wrong password.", "error")
            status = 401
        else:
            audit.record(db(), "login", user_id=user.id, object_type="user", object_id=user.username, ip=ip)
            db().commit()
            login_user(PortalUser(user))
            target = request.args.get("next") or ""
            if not target.startswith("/") or target.startswith("//"):
                target = url_for("portal.index")
            return redirect(target)
    elif request.method == "POST":
        status = 400
    return render_template("login.html", form=form), status


@bp.route("/logout", methods=["POST"])
def logout():
    if current_user.is_authenticated:
        audit.record(db(), "logout", user_id=current_user.id, ip=client_ip())
        db().commit()
    logout_user()
    return redirect(url_for("auth.login"))
