"""What every request and reply gets at the door: small bodies except on the upload routes, and the
security headers (no framing, no MIME sniffing, no referrer, a strict CSP, no caching of patient
data)."""

from __future__ import annotations

from flask import Flask, request

from dermascan.config import Settings

UPLOAD_ENDPOINTS = {
    "portal.upload_single", "portal.upload_bulk", "api.create_batch", "dicomweb.stow", "api.import_outcomes",
}  # fmt: skip
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)


def init_app(app: Flask, settings: Settings) -> None:
    @app.before_request
    def _small_bodies():
        """Only the upload routes take large bodies: a login or form post is read within a
        small limit (a 40 MB POST to /login is refused before it is read)."""
        if request.endpoint not in UPLOAD_ENDPOINTS:
            request.max_content_length = settings.max_form_bytes

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
