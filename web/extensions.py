"""Flask extensions, created unbound and bound in the factory."""

from __future__ import annotations

import time

from flask import Flask, session
from flask_login import LoginManager
from flask_wtf.csrf import CSRFProtect

login_manager = LoginManager()
login_manager.login_view = "auth.login"
login_manager.login_message = "Please log in."
csrf = CSRFProtect()


class PortalUser:
    """The Flask-Login view of a users row (detached from the session)."""

    def __init__(self, row):
        self.id = row.id
        self.username = row.username
        self.role = row.role.value if hasattr(row.role, "value") else row.role
        self.program_id = row.program_id
        self.active = row.active
        self.session_version = row.session_version or 0

    is_authenticated = True
    is_anonymous = False

    @property
    def is_active(self):
        return self.active

    def get_id(self):
        # the session version rides in the cookie: bumping it server-side revokes the cookie
        return f"{self.id}.{self.session_version}"

    def has_role(self, *roles) -> bool:
        return self.role in roles


def init_app(app: Flask) -> None:
    login_manager.init_app(app)
    csrf.init_app(app)

    @login_manager.user_loader
    def load_user(user_id: str):
        from dermascan.schema import User
        from web.helpers import db

        ident, _, version = user_id.partition(".")
        row = db().get(User, int(ident)) if ident.isdigit() and version.isdigit() else None
        if row is None or not row.active or (row.session_version or 0) != int(version):
            return None  # disabled, or the cookie was revoked (logout, new password or role)
        return PortalUser(row)

    @app.before_request
    def _session_timeouts():
        """A session ends after ``session_idle_timeout_s`` without a request and
        ``session_max_age_s`` after its login, whatever the cookie says."""
        if "_user_id" not in session:
            return
        settings = app.config["DERMASCAN"]
        now = time.time()
        started, seen = session.get("login_at", 0), session.get("seen_at", 0)
        if now - seen > settings.session_idle_timeout_s or now - started > settings.session_max_age_s:
            session.clear()
            return
        session["seen_at"] = now


def start_session() -> None:
    """Called at login: the clock of the idle and absolute timeouts starts."""
    session["login_at"] = session["seen_at"] = time.time()
