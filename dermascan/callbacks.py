"""Batch completion callbacks: an HMAC-SHA256-signed JSON POST to the URL the program gave,
retried with exponential backoff by the worker.

The signature header is ``X-DermaScan-Signature: t=<unix time>,v1=<hex hmac>`` over
``<t>.<body>`` with the installation secret key, the scheme Stripe and GitHub webhooks use; the
receiver recomputes it and rejects stale timestamps.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import urllib.error
import urllib.request

from sqlalchemy import func, select

from dermascan.config import Settings
from dermascan.db import session_factory
from dermascan.reports import referral_counts
from dermascan.schema import Batch, Study, iso_utc

log = logging.getLogger(__name__)
SIGNATURE_HEADER = "X-DermaScan-Signature"


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    timestamp = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, body: bytes, header: str, tolerance_s: int = 300) -> bool:
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs(time.time() - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, body, timestamp), header)


def batch_summary(session, batch: Batch) -> dict:
    counts = dict(
        session.execute(
            select(Study.status, func.count()).where(Study.batch_id == batch.id).group_by(Study.status)
        ).all()
    )
    return {
        "event": "batch.completed",
        "batch_id": batch.id,
        "completed_at": iso_utc(batch.completed_at),
        "counts": {str(k.value if hasattr(k, "value") else k): v for k, v in counts.items()},
        **referral_counts(session, batch.id),
    }


def deliver(settings: Settings, batch_id: str, attempt: int) -> str:
    """POST the completion event once. Returns "sent", "none" (no URL), "retry" or "gave_up"."""
    factory = session_factory(settings.database_url)
    with factory() as session:
        batch = session.get(Batch, batch_id)
        if batch is None or not batch.callback_url:
            return "none"
        body = json.dumps(batch_summary(session, batch), sort_keys=True).encode()
        url = batch.callback_url
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={"Content-Type": "application/json", SIGNATURE_HEADER: sign(settings.secret_key, body)},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            ok = 200 <= response.status < 300
    except (urllib.error.URLError, OSError) as exc:
        log.info("callback for batch %s failed (attempt %d): %s", batch_id, attempt + 1, exc)
        ok = False
    status = "sent" if ok else ("retry" if attempt + 1 < settings.callback_retries else "gave_up")
    with factory() as session, session.begin():
        session.get(Batch, batch_id).callback_status = f"{status} (attempt {attempt + 1})"
    return status
