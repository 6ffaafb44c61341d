"""The Flask app: portal, referral queue, REST API and DICOMweb.

Never imports ``model`` code that loads Keras or TensorFlow: the portal must start fast and small
(``tests/test_project.py`` checks it). Blueprints are imported inside the factory.
"""

from __future__ import annotations

from flask import Flask, g, jsonify, request
from werkzeug.exceptions import HTTPException

from dermascan.config import Settings
from dermascan.infra.blobs import BlobUnavailable
from dermascan.infra.db import session_factory
from dermascan.security import keys

UPLOAD_ENDPOINTS = {
    "portal.upload_single", "portal.upload_bulk", "api.create_batch", "dicomweb.stow", "api.import_outcomes",
}  # fmt: skip
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)


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
    app.extensions["dermascan_sessions"] = session_factory(settings.database_url)

    @app.before_request
    def _small_bodies():
        """Only the upload routes take large bodies: a login or form post is read within a
        small limit (a 40 MB POST to /login is refused before it is read);
        registered before CSRF protection, which reads the form first."""
        if request.endpoint not in UPLOAD_ENDPOINTS:
            request.max_content_length = settings.max_form_bytes

    from web import extensions

    extensions.init_app(app)

    @app.teardown_appcontext
    def _close_session(exc):
        session = g.pop("db", None)
        if session is not None:
            if exc is not None:
                session.rollback()
            session.close()

    @app.after_request
    def _security_headers(response):
        """Headers every reply carries: no framing, no MIME sniffing, no referrer leaving the
        site, scripts and styles from this origin only; and no caching of anything that holds
        patient data (images, heat maps, exports, results) — only the static files may be kept."""
        headers = response.headers
        headers.setdefault("Content-Security-Policy", CSP)
        headers.setdefault("X-Frame-Options", "DENY")
        headers.setdefault("X-Content-Type-Options", "nosniff")
        headers.setdefault("Referrer-Policy", "no-referrer")
        if request.endpoint != "static":
            headers["Cache-Control"] = "no-store"
        return response

    @app.errorhandler(BlobUnavailable)
    def _store_down(exc: BlobUnavailable):
        """The object store cannot be reached: nothing was stored (the transaction rolled back);
        the sender retries later."""
        message = "the image store is unreachable; nothing was stored — retry later"
        if request.path.startswith(("/api/", "/dicomweb/")):
            response = jsonify({"error": message})
        else:
            response = app.response_class(message, mimetype="text/plain")
        response.status_code = 503
        response.headers["Retry-After"] = "30"
        return response

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        if request.path.startswith(("/api/", "/dicomweb/")):
            message = (
                exc.description
                if exc.code != 413
                else (f"the request is too large (limit {settings.max_request_bytes:,} bytes)")
            )
            return jsonify({"error": message}), exc.code
        return exc

    from web import api, auth, dicomweb, portal

    app.register_blueprint(auth.bp)
    app.register_blueprint(portal.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(dicomweb.bp)
    for name in ("referrals", "admin", "monitoring"):
        module = __import__(f"web.{name}", fromlist=["bp"])
        app.register_blueprint(module.bp)
    extensions.limit_machine_doors(app, [api.bp, dicomweb.bp])
    return app
