"""Small view helpers that abort early: the request's database session, settings, roles, audit."""

from __future__ import annotations

from functools import wraps

from flask import abort, current_app, g, request
from flask_login import current_user, login_required
from sqlalchemy.orm import Session

from dermascan import audit
from dermascan.config import Settings


def db() -> Session:
    if "db" not in g:
        g.db = current_app.extensions["dermascan_sessions"]()
    return g.db


def settings() -> Settings:
    return current_app.config["DERMASCAN"]


def client_ip() -> str | None:
    return request.remote_addr


def role_required(*roles):
    """Log in first (redirect), then 403 unless the user has one of ``roles``."""

    def decorator(view):
        @wraps(view)
        @login_required
        def wrapped(*args, **kwargs):
            if not current_user.has_role(*roles):
                abort(403)
            return view(*args, **kwargs)

        wrapped.allowed_roles = roles
        return wrapped

    return decorator


def audit_event(action: str, **fields) -> None:
    """Record an audit event for the logged-in user in the request's session (caller commits)."""
    user_id = current_user.id if getattr(current_user, "is_authenticated", False) else None
    audit.record(db(), action, user_id=user_id, ip=client_ip(), **fields)


def program_scope():
    """None for admins and specialists (all programs); the uploader's program otherwise."""
    if current_user.has_role("admin", "specialist"):
        return None
    return current_user.program_id
