"""What every request and reply gets at the door: small bodies except on the upload routes, and the
security headers (no framing, no MIME sniffing, no referrer, a strict CSP, no caching of patient
data)."""

from __future__ import annotations

from flask import Flask, abort, request
from werkzeug.routing import IntegerConverter, UnicodeConverter, ValidationError

from dermascan.config import Settings

UPLOAD_ENDPOINTS = {
    "portal.upload_single", "portal.upload_bulk", "api.create_batch", "dicomweb.stow", "api.import_outcomes",
}  # fmt: skip
# upload routes whose bodies are small by nature get a limit of their own, checked before the body
# is read (a 100 MB outcome CSV is refused from its Content-Length, not after being held)
SMALL_UPLOADS = {"api.import_outcomes": lambda settings: settings.max_outcome_csv_bytes}
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)


class DatabaseId(IntegerConverter):
    """``<int:…>`` in a route: ASCII digits only, within the database's integer range (a
    twenty-digit id is a 404, not an overflow in the database)."""

    regex = r"[0-9]{1,10}"

    def __init__(self, url_map, *args, **kwargs):
        kwargs.setdefault("max", 2**31 - 1)
        super().__init__(url_map, *args, **kwargs)


class Segment(UnicodeConverter):
    """A plain path segment (batch ids and the like): no NUL, at most 200 characters, else 404."""

    def to_python(self, value: str) -> str:
        if "\x00" in value or len(value) > 200:
            raise ValidationError()
        return value


def _has_nul(values) -> bool:
    return any("\x00" in str(key) or any("\x00" in str(v) for v in vals) for key, vals in values.lists())


def init_app(app: Flask, settings: Settings) -> None:
    app.url_map.converters["int"] = DatabaseId
    app.url_map.converters["default"] = app.url_map.converters["string"] = Segment

    @app.before_request
    def _small_bodies():
        """Only the upload routes take large bodies: a login or form post is read within a
        small limit (a 40 MB POST to /login is refused before it is read)."""
        if request.endpoint in SMALL_UPLOADS:
            request.max_content_length = SMALL_UPLOADS[request.endpoint](settings)
        elif request.endpoint not in UPLOAD_ENDPOINTS:
            request.max_content_length = settings.max_form_bytes

    @app.before_request
    def _no_nul_characters():
        """A NUL character is in no name, label, id or choice DermaScan knows, and the database
        refuses one as a parameter: a request carrying one is answered 400 before any query."""
        if _has_nul(request.args) or (
            request.mimetype in ("application/x-www-form-urlencoded", "multipart/form-data") and _has_nul(request.form)
        ):
            abort(400, "the request contains a NUL character")

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
