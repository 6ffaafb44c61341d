"""Flask extensions, created unbound and bound in the factory."""

from __future__ import annotations

from flask import Flask
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

    is_authenticated = True
    is_anonymous = False

    @property
    def is_active(self):
        return self.active

    def get_id(self):
        return str(self.id)

    def has_role(self, *roles) -> bool:
        return self.role in roles


def init_app(app: Flask) -> None:
    login_manager.init_app(app)
    csrf.init_app(app)

    @login_manager.user_loader
    def load_user(user_id: str):
        from dermascan.schema import User
        from web.helpers import db

        row = db().get(User, int(user_id)) if user_id.isdigit() else None
        return PortalUser(row) if row is not None and row.active else None
