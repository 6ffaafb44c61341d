"""The Flask app: portal, referral queue, REST API and DICOMweb.

Never imports ``model`` code that loads Keras or TensorFlow: the portal must start fast and small
(``tests/test_project.py`` checks it). The factory only configures; each concern registers itself
with an ``init_app`` function, as Flask's tutorial does: the request's database session
(``web.helpers``), body limits and security headers (``web.headers``), the extensions (CSRF,
logins, rate limits: ``web.extensions``), the error pages and JSON errors (``web.errors``), then
the blueprints.
"""

from __future__ import annotations

from flask import Flask

from dermascan.config import Settings
from dermascan.security import keys


def create_app(settings: Settings | None = None, test_config: dict | None = None) -> Flask:
    settings = (settings or Settings.from_env()).with_secret()
    app = Flask(__name__)
    app.config.from_mapping(
        SECRET_KEY=keys.session_key(settings.secret_key, settings.session_key_version),
        MAX_CONTENT_LENGTH=settings.max_request_bytes,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.session_cookie_secure,
        REMEMBER_COOKIE_SECURE=settings.session_cookie_secure,
        WTF_CSRF_TIME_LIMIT=None,
        DERMASCAN=settings,
    )
    if test_config:
        app.config.from_mapping(test_config)
    if settings.trusted_proxies > 0:
        # only the configured number of proxies' X-Forwarded-* are believed: with none, a client
        # cannot pick its own address for the login throttle, the rate limits or the audit trail
        from werkzeug.middleware.proxy_fix import ProxyFix

        n = settings.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=n, x_proto=n, x_host=n)

    from web import errors, extensions, formatting, headers, helpers

    helpers.init_app(app, settings)
    headers.init_app(app, settings)  # before CSRF protection, which reads the form first
    extensions.init_app(app)
    formatting.init_app(app)
    errors.init_app(app, settings)

    from web import admin, api, auth, dicomweb, monitoring, portal, referrals

    for blueprint in (auth.bp, portal.bp, api.bp, dicomweb.bp, referrals.bp, admin.bp, monitoring.bp):
        app.register_blueprint(blueprint)
    extensions.limit_machine_doors(app, [api.bp, dicomweb.bp])
    return app
