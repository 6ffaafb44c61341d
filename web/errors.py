"""Errors at the web door: domain errors → HTTP statuses (the one place the web layer maps the
core's kinds of refusal), and the handlers that answer the machine doors in JSON and a store that
is down with 503."""

from __future__ import annotations

from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

from dermascan.config import Settings
from dermascan.errors import Conflict, DomainError, NotAllowed, NotFound, TooLarge
from dermascan.infra.blobs import BlobUnavailable

STATUSES = ((TooLarge, 413), (NotFound, 404), (NotAllowed, 403), (Conflict, 409))


def http_status(exc: DomainError) -> int:
    """413, 404, 403 or 409 by the error's kind; 400 for anything else the domain refuses."""
    return next((status for kind, status in STATUSES if isinstance(exc, kind)), 400)


def _machine_door() -> bool:
    return request.path.startswith(("/api/", "/dicomweb/"))


def init_app(app: Flask, settings: Settings) -> None:
    @app.errorhandler(BlobUnavailable)
    def _store_down(exc: BlobUnavailable):
        """The object store cannot be reached: nothing was stored (the transaction rolled back);
        the sender retries later."""
        message = "the image store is unreachable; nothing was stored — retry later"
        response = (
            jsonify({"error": message}) if _machine_door() else app.response_class(message, mimetype="text/plain")
        )
        response.status_code = 503
        response.headers["Retry-After"] = "30"
        return response

    @app.errorhandler(DomainError)
    def _refused(exc: DomainError):
        """A refusal the view did not answer itself (a bad query argument, say): its status by
        kind, its message — never a server error."""
        status = http_status(exc)
        if _machine_door():
            return jsonify({"error": str(exc)}), status
        return app.response_class(str(exc), status=status, mimetype="text/plain")

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        if _machine_door():
            message = (
                exc.description
                if exc.code != 413
                else (f"the request is too large (limit {settings.max_request_bytes:,} bytes)")
            )
            return jsonify({"error": message}), exc.code
        return exc
