"""Domain errors → HTTP statuses: the one place the web layer maps the core's kinds of refusal."""

from __future__ import annotations

from dermascan.errors import Conflict, DomainError, NotAllowed, NotFound, TooLarge

STATUSES = ((TooLarge, 413), (NotFound, 404), (NotAllowed, 403), (Conflict, 409))


def http_status(exc: DomainError) -> int:
    """413, 404, 403 or 409 by the error's kind; 400 for anything else the domain refuses."""
    return next((status for kind, status in STATUSES if isinstance(exc, kind)), 400)
