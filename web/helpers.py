"""Small view helpers that abort early: the request's database session, settings, roles, audit."""

from __future__ import annotations

from functools import wraps

from flask import Flask, abort, current_app, g, request
from flask_login import current_user, login_required
from sqlalchemy.orm import Session

from dermascan.config import Settings
from dermascan.infra.db import session_factory
from dermascan.ingest import numbers
from dermascan.security import audit


def init_app(app: Flask, settings: Settings) -> None:
    """The request's database session: opened on first use (:func:`db`), rolled back on an error
    and closed when the request ends."""
    app.extensions["dermascan_sessions"] = session_factory(settings.database_url)

    @app.teardown_appcontext
    def _close_session(exc):
        session = g.pop("db", None)
        if session is not None:
            if exc is not None:
                session.rollback()
            session.close()


def db() -> Session:
    if "db" not in g:
        g.db = current_app.extensions["dermascan_sessions"]()
    return g.db


def settings() -> Settings:
    return current_app.config["DERMASCAN"]


MAX_ID = 2**31 - 1  # the database's integer ids


def int_arg(name: str, default: int | None = None, minimum: int | None = 1, maximum: int | None = MAX_ID) -> int | None:
    """An integer query argument in range (ASCII digits only), ``default`` when absent; a
    NumberError (400, naming the argument) otherwise."""
    value = request.args.get(name)
    if value in (None, ""):
        return default
    return numbers.parse_int(value, name, minimum, maximum)


def page_arg(most: int = 1_000_000) -> int:
    """``?page=``, clamped to [1, most] (a page past the end is the last possible one)."""
    return numbers.page_number(request.args.get("page"), most)


MAX_JSON_DEPTH = 32


class BadJson(ValueError):
    """A body that is not JSON DermaScan will read; the message says why."""


def json_body():
    """The request's JSON body, or BadJson: not JSON, or nested deeper than MAX_JSON_DEPTH (a
    body nested thousands deep made the parser itself fail)."""
    try:
        value = request.get_json(silent=True)
    except RecursionError:
        raise BadJson(f"the JSON body is nested too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    if value is None:
        raise BadJson("the body is not valid JSON")
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise BadJson(f"the JSON body is nested too deeply (at most {MAX_JSON_DEPTH} levels)")
        if isinstance(item, dict):
            if any("\x00" in k for k in item):
                raise BadJson("the JSON body contains a NUL character")
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, str) and "\x00" in item:
            raise BadJson("the JSON body contains a NUL character")
    return value


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


def actor() -> audit.Actor:
    """The logged-in admin as the actor of an admin action (the room's function audits it)."""
    user_id = current_user.id if getattr(current_user, "is_authenticated", False) else None
    return audit.Actor(user_id=user_id, ip=client_ip())


def audit_event(action: str, **fields) -> None:
    """Record an audit event for the logged-in user in the request's session (caller commits)."""
    user_id = current_user.id if getattr(current_user, "is_authenticated", False) else None
    audit.record(db(), action, user_id=user_id, ip=client_ip(), **fields)


NO_PROGRAM = 0  # matches no program: a user without one sees nothing (fail closed)


def program_scope():
    """Whose batches the user sees: None for admins and for specialists an admin granted every
    program; otherwise the user's own program, or NO_PROGRAM when they have none."""
    if current_user.has_role("admin") or (current_user.has_role("specialist") and current_user.all_programs):
        return None
    return current_user.program_id or NO_PROGRAM


def specialist_may_see(study) -> bool:
    """A specialist sees a referred study, and the same patient's other lesions (its context),
    in any program."""
    from sqlalchemy import exists, select

    from dermascan.infra.schema import Referral, Study

    if not current_user.has_role("specialist"):
        return False
    referred = exists().where(Referral.study_id == Study.id)
    query = select(Study.id).where(referred, Study.program_id == study.program_id)
    if study.patient_pseudonym:
        query = query.where((Study.id == study.id) | (Study.patient_pseudonym == study.patient_pseudonym))
    else:
        query = query.where(Study.id == study.id)
    return db().scalar(query.limit(1)) is not None
