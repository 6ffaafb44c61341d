"""Flask extensions, created unbound and bound in the factory."""

from __future__ import annotations

import hashlib
import time

from flask import Flask, current_app, request, session
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_login import LoginManager
from flask_wtf.csrf import CSRFProtect

login_manager = LoginManager()
login_manager.login_view = "auth.login"
login_manager.login_message = "Please log in."
csrf = CSRFProtect()


def _token_key() -> str:
    """Requests are counted per bearer token (its hash: the token itself is never a key)."""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return "token:" + hashlib.sha256(value.strip().encode()).hexdigest()[:32]
    return "address:" + (get_remote_address() or "")


def _limit(name: str):
    return lambda: getattr(current_app.config["DERMASCAN"], name)


def limit_machine_doors(app: Flask, blueprints) -> Limiter:
    """Per-token and per-address rate limits on every route of the machine doors (REST API,
    STOW-RS). Redis in production, so every web process counts together; memory in the embedded
    default. A storage failure lets the request through: the broker being down must not stop
    uploads, which are stored first and queued later."""
    settings = app.config["DERMASCAN"]
    app.config.setdefault(
        "RATELIMIT_STORAGE_URI", settings.broker_url if settings.broker_url.startswith("redis") else "memory://"
    )
    app.config.setdefault("RATELIMIT_STORAGE_OPTIONS", {"socket_connect_timeout": 1, "socket_timeout": 1})
    limiter = Limiter(key_func=get_remote_address, default_limits=[], headers_enabled=True, swallow_errors=True)
    limiter.init_app(app)
    for blueprint in blueprints:
        # one counter across every route of both doors (not one per route)
        limiter.shared_limit(_limit("api_rate_limit"), scope="machine-doors-token", key_func=_token_key)(blueprint)
        limiter.shared_limit(
            _limit("api_address_rate_limit"), scope="machine-doors-address", key_func=get_remote_address
        )(blueprint)
    return limiter


class PortalUser:
    """The Flask-Login view of a users row (detached from the session)."""

    def __init__(self, row):
        self.id = row.id
        self.username = row.username
        self.role = row.role.value if hasattr(row.role, "value") else row.role
        self.program_id = row.program_id
        self.active = row.active
        self.session_version = row.session_version or 0
        self.all_programs = bool(row.all_programs)

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
        from dermascan.infra.schema import User
        from dermascan.ingest import numbers
        from web.helpers import db

        ident, _, version = user_id.partition(".")
        try:
            ident, version = numbers.parse_int(ident, "user", 1, 2**31 - 1), numbers.parse_int(version, "version", 0)
        except numbers.NumberError:
            return None
        row = db().get(User, ident)
        if row is None or not row.active or (row.session_version or 0) != version:
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
