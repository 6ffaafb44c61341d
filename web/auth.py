"""Log in and out (Flask-Login sessions), with login rate limiting kept in the audit table so
it holds across gunicorn workers."""

from __future__ import annotations

import datetime as dt
import math
from urllib.parse import urlsplit

from flask import Blueprint, flash, redirect, render_template, request, url_for
from flask_login import current_user, login_user, logout_user
from flask_wtf import FlaskForm
from sqlalchemy import func, select
from wtforms import PasswordField, StringField
from wtforms.validators import DataRequired, Length

from dermascan.infra.schema import AuditEvent, User, utcnow
from dermascan.security import audit
from dermascan.security.accounts import authenticate, revoke_sessions
from web.extensions import PortalUser, start_session
from web.helpers import client_ip, db, settings

bp = Blueprint("auth", __name__)


class LoginForm(FlaskForm):
    username = StringField("Username", validators=[DataRequired(), Length(max=80)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=200)])


THROTTLE_WINDOW = dt.timedelta(minutes=15)


def _wait_before_next_attempt(username: str, ip: str | None) -> float:
    """Seconds this (username, address) must still wait: none for the first failures, then a
    delay that doubles with each further failure (5 s, 10 s, 20 s … up to 15 min). Counted per pair,
    so nobody can lock a chosen user out from another address."""
    now = utcnow()
    failures, last = (
        db()
        .execute(
            select(func.count(), func.max(AuditEvent.at)).where(
                AuditEvent.action == "login_failed",
                AuditEvent.at >= now - THROTTLE_WINDOW,
                AuditEvent.object_id == username[:64],
                AuditEvent.ip == ip,
            )
        )
        .one()
    )
    free = settings().login_attempts_per_minute
    if failures < free or last is None:
        return 0.0
    if last.tzinfo is None:
        last = last.replace(tzinfo=dt.UTC)
    delay = min(THROTTLE_WINDOW.total_seconds(), 5.0 * 2.0 ** (failures - free))
    return max(0.0, delay - (now - last).total_seconds())


def safe_next(target: str | None) -> str:
    """Where to go after logging in: a path on this site only. Browsers drop tabs and newlines
    and read a backslash as a slash, so ``/%09/evil.example`` would leave the site: any control
    character, whitespace or backslash, or anything with a scheme or host, goes to the start page."""
    target = target or ""
    if (
        not target.startswith("/")
        or target.startswith("//")
        or any(ord(c) < 0x21 or c in "\\\x7f" for c in target)
        or urlsplit(target).scheme
        or urlsplit(target).netloc
    ):
        return url_for("portal.index")
    return target


@bp.route("/login", methods=["GET", "POST"])
def login():
    if current_user.is_authenticated:
        return redirect(url_for("portal.index"))
    form = LoginForm()
    status = 200
    if form.validate_on_submit():
        username, ip = form.username.data.strip(), client_ip()
        wait = _wait_before_next_attempt(username, ip)
        if wait > 0:
            audit.record(db(), "login_throttled", object_type="user", object_id=username, ip=ip)
            db().commit()
            flash(f"Too many failed attempts. Try again in {math.ceil(wait)} s.", "error")
            return render_template("login.html", form=form), 429, {"Retry-After": str(math.ceil(wait))}
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
            start_session()
            return redirect(safe_next(request.args.get("next")))
    elif request.method == "POST":
        status = 400
    return render_template("login.html", form=form), status


@bp.route("/logout", methods=["POST"])
def logout():
    if current_user.is_authenticated:
        audit.record(db(), "logout", user_id=current_user.id, ip=client_ip())
        revoke_sessions(db().get(User, current_user.id))  # a copy of this cookie stops working too
        db().commit()
    logout_user()
    return redirect(url_for("auth.login"))
