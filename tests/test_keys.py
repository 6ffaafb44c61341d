"""security/keys: one key per purpose (HKDF) — a cookie signed with the installation secret opens
nothing, rotating the session key ends sessions but keeps pseudonyms. (Each program's callback
signing secret is tested with the callbacks, in test_callbacks.py.)"""

from __future__ import annotations

from flask import Flask

from dermascan.infra.db import session_factory
from dermascan.security import keys
from dermascan.security.accounts import create_user
from dermascan.security.identity import get_or_create_program, pseudonymise
from tests.test_security import PASSWORD, _login


def test_a_cookie_signed_with_the_installation_secret_opens_nothing(pg_settings, app_factory):
    with session_factory(pg_settings.database_url)() as session, session.begin():
        create_user(session, "root-admin", PASSWORD, "admin", get_or_create_program(session, "k").id)
    app = app_factory(pg_settings)
    client = app.test_client()
    assert _login(client, "root-admin", PASSWORD).status_code == 302
    cookie = client.get_cookie("session").value
    serializer = app.session_interface.get_signing_serializer(app)
    payload = serializer.loads(cookie)  # the real session: signed with the derived session key

    def signed_with(key: str) -> str:
        forger = Flask("forger")
        forger.secret_key = key
        return forger.session_interface.get_signing_serializer(forger).dumps(payload)

    def opens_admin(cookie_value: str) -> bool:
        other = app.test_client()
        other.set_cookie("session", cookie_value)
        return other.get("/admin/users").status_code == 200

    assert opens_admin(signed_with(keys.session_key(pg_settings.secret_key)))  # the check can fail
    assert not opens_admin(signed_with(pg_settings.secret_key))  # the installation secret is no key
    # rotating the session key ends every session, and keeps every patient's pseudonym
    rotated = app_factory(pg_settings.replace(session_key_version=1)).test_client()
    rotated.set_cookie("session", cookie)
    assert rotated.get("/admin/users").status_code != 200
    assert keys.session_key(pg_settings.secret_key, 1) != keys.session_key(pg_settings.secret_key, 0)
    assert pseudonymise(pg_settings.secret_key, 1, "MRN-7") == pseudonymise(
        pg_settings.replace(session_key_version=1).secret_key, 1, "MRN-7"
    )
    assert keys.pseudonym_key(pg_settings.secret_key) not in (
        pg_settings.secret_key.encode(), bytes.fromhex(keys.session_key(pg_settings.secret_key)),
    )  # fmt: skip
