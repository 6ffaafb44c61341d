"""Users, roles and API tokens (hashed passwords; tokens stored as sha256 only)."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session
from werkzeug.security import check_password_hash, generate_password_hash

from dermascan.infra.schema import ApiToken, Program, Role, User, utcnow
from dermascan.security import keys
from dermascan.security.audit import SYSTEM, Actor

TOKEN_PREFIX = "dsk_"
MIN_PASSWORD = 10


class AccountError(ValueError):
    pass


def create_user(
    session: Session, username: str, password: str, role: Role | str, program_id: int | None = None,
    actor: Actor = SYSTEM,
) -> User:  # fmt: skip
    """A portal account, audited."""
    username = username.strip()
    if not username or len(username) > 80:
        raise AccountError("a username of 1–80 characters is needed")
    _check_password(password)
    if session.scalar(select(User).where(User.username == username)):
        raise AccountError(f"the user {username!r} already exists")
    user = User(
        username=username, password_hash=generate_password_hash(password), role=Role(role), program_id=program_id
    )
    session.add(user)
    session.flush()
    actor.record(
        session, "user_created", object_type="user", object_id=user.username, detail={"role": Role(role).value}
    )
    return user


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"the password must have at least {MIN_PASSWORD} characters")


def get_user(session: Session, username: str) -> User:
    user = session.scalar(select(User).where(User.username == username.strip()))
    if user is None:
        raise AccountError(f"no user {username!r}")
    return user


def revoke_sessions(user: User) -> None:
    """Every session cookie issued to ``user`` so far stops working."""
    user.session_version = (user.session_version or 0) + 1


def change_user(
    session: Session,
    user: User,
    *,
    active: bool | None = None,
    password: str | None = None,
    role: Role | str | None = None,
    all_programs: bool | None = None,
    actor: Actor = SYSTEM,
) -> str:
    """Disable or enable a user, set a new password or role — each ends the user's sessions and
    is audited in the caller's transaction. Returns what was done, for people."""
    done = []
    if active is not None and active != user.active:
        user.active = active
        done.append("enabled" if active else "disabled")
    if password is not None:
        _check_password(password)
        user.password_hash = generate_password_hash(password)
        done.append("password reset")
    if role is not None and Role(role) != user.role:
        done.append(f"role {Role(user.role).value} → {Role(role).value}")
        user.role = Role(role)
    if all_programs is not None and all_programs != user.all_programs:
        user.all_programs = all_programs
        done.append("granted every program's batches" if all_programs else "limited to their own program")
    if not done:
        raise AccountError(f"nothing to change for {user.username}")
    revoke_sessions(user)
    actor.record(session, "user_changed", object_type="user", object_id=user.username, detail={"changes": done})
    return f"{user.username}: {', '.join(done)}"


# checked for unknown usernames, so that they take as long to refuse as a wrong password
_DUMMY_HASH = generate_password_hash("not a password of anyone's")


def authenticate(session: Session, username: str, password: str) -> User | None:
    user = session.scalar(select(User).where(User.username == username.strip()[:80]))
    if user is None:
        check_password_hash(_DUMMY_HASH, password)
        return None
    if not check_password_hash(user.password_hash, password) or not user.active:
        return None
    user.last_login_at = utcnow()
    return user


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, program_id: int, name: str, actor: Actor = SYSTEM) -> tuple[ApiToken, str]:
    """A new bearer token, audited; the plain value is returned once and never stored."""
    plain = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(
        program_id=program_id, name=name, prefix=plain[:10], token_hash=hash_token(plain), created_by_id=actor.user_id
    )
    session.add(token)
    session.flush()
    actor.record(session, "token_created", object_type="token", object_id=token.id, detail={"name": token.name})
    return token, plain


def revoke_token(session: Session, token: ApiToken, actor: Actor = SYSTEM) -> None:
    """The token stops working at once, audited (a revoked token stays revoked)."""
    token.revoked_at = token.revoked_at or utcnow()
    actor.record(session, "token_revoked", object_type="token", object_id=token.id, detail={"name": token.name})


def token_for(session: Session, plain: str) -> ApiToken | None:
    token = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(plain)))
    if token is None or token.revoked_at is not None:
        return None
    return token


def issue_callback_secret(session: Session, program: Program, installation_secret: str, actor: Actor = SYSTEM) -> str:
    """A new callback signing secret for ``program`` (to show once), audited: the previous one stops
    signing. Derived from the installation secret (``dermascan.security.keys``), so nothing secret is stored."""
    program.callback_secret_generation = (program.callback_secret_generation or 0) + 1
    actor.record(session, "callback_secret_issued", object_type="program", object_id=program.id,
                 detail={"generation": program.callback_secret_generation})  # fmt: skip
    return keys.callback_secret(installation_secret, program.id, program.callback_secret_generation)


def users(session: Session) -> list[User]:
    """Every portal account, by user name (the admin's users page)."""
    return list(session.scalars(select(User).order_by(User.username)))


def tokens(session: Session) -> list[ApiToken]:
    """Every API token, newest first (the admin's tokens page)."""
    return list(session.scalars(select(ApiToken).order_by(ApiToken.created_at.desc())))
