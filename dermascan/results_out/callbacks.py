"""Callbacks — a batch completed, a specialist decided one of its studies: an HMAC-SHA256-signed
JSON POST to the URL the program gave with the batch,
retried with exponential backoff on their own queue (``callbacks``), so a slow endpoint never
holds a scoring worker.

The signature header is ``X-DermaScan-Signature: t=<unix time>,v1=<hex hmac>`` over
``<t>.<body>`` with the program's own callback secret (``dermascan.security.keys``; issued and rotated by
``dermascan program callback-secret``), the scheme Stripe and GitHub webhooks use; the receiver
recomputes it and rejects stale timestamps.

No server-side request forgery: the URL must be https (http only for hosts an admin listed in
``DERMASCAN_CALLBACK_ALLOW_HOSTS``); the address is checked when the connection is made, after
resolving, so DNS rebinding cannot get around it — loopback, private, link-local, multicast,
reserved and shared addresses are refused unless the host is listed; redirects are not followed.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import socket
import ssl
import time
from urllib.parse import urlsplit

from sqlalchemy import func, select

from dermascan.config import Settings
from dermascan.infra.db import session_factory
from dermascan.infra.schema import Batch, Program, Referral, Study, iso_utc
from dermascan.results_out import retry
from dermascan.screening.reports import referral_counts
from dermascan.security import keys, outbound
from dermascan.security.outbound import OutboundRefused

log = logging.getLogger(__name__)
SIGNATURE_HEADER = "X-DermaScan-Signature"
MAX_URL = 2000


class CallbackRefused(OutboundRefused):
    """A callback URL or address that DermaScan will not call."""


def policy(settings: Settings) -> outbound.Policy:
    """Callbacks go to the internet: no private, loopback, link-local or other inside address,
    unless the operator listed the host in DERMASCAN_CALLBACK_ALLOW_HOSTS."""
    return outbound.Policy(False, tuple(outbound.listed_hosts(settings.callback_allow_hosts)), "callback_url")


def check_url(settings: Settings, url) -> str | None:
    """A callback URL as given by a program: None, or a URL DermaScan may call (else CallbackRefused)."""
    if url in (None, ""):
        return None
    url = str(url).strip()
    try:
        parts = urlsplit(url)
        host, _ = parts.hostname or "", parts.port
    except ValueError:
        raise CallbackRefused("callback_url is not a valid URL") from None
    if len(url) > MAX_URL or parts.scheme not in ("http", "https") or not host:
        raise CallbackRefused(f"callback_url must be an https URL of at most {MAX_URL} characters")
    if parts.username or parts.password:
        raise CallbackRefused("callback_url must not carry credentials")
    rule = policy(settings)
    if parts.scheme == "http" and not rule.is_listed(host):
        raise CallbackRefused(
            "callback_url must use https (http only for hosts an administrator allowed in DERMASCAN_CALLBACK_ALLOW_HOSTS)"
        )
    try:
        rule.check_host(host)
    except OutboundRefused as exc:
        raise CallbackRefused(str(exc)) from None
    return url


def _connect(host: str, port: int, timeout: float, rule: outbound.Policy) -> socket.socket:
    """Resolve, check every address at connect time, connect to the first allowed one."""
    try:
        return rule.connect(host, port, timeout)
    except OutboundRefused as exc:
        raise CallbackRefused(str(exc)) from None


class _GuardedHTTP(http.client.HTTPConnection):
    rule: outbound.Policy

    def connect(self):
        self.sock = _connect(self.host, self.port, self.timeout, self.rule)


class _GuardedHTTPS(http.client.HTTPSConnection):
    rule: outbound.Policy

    def connect(self):
        sock = _connect(self.host, self.port, self.timeout, self.rule)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def post(settings: Settings, url: str, body: bytes, headers: dict, timeout: float = 10) -> int:
    """POST once through the guarded connection; the HTTP status (a redirect is not followed)."""
    url = check_url(settings, url)
    parts = urlsplit(url)
    if parts.scheme == "https":
        connection = _GuardedHTTPS(parts.hostname, parts.port, timeout=timeout, context=ssl.create_default_context())
    else:
        connection = _GuardedHTTP(parts.hostname, parts.port, timeout=timeout)
    connection.rule = policy(settings)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request("POST", path, body=body, headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


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

    def event(session, batch: Batch):
        return (batch.callback_url, batch.program_id, batch_summary(session, batch)) if batch.callback_url else None

    return _deliver_event(settings, Batch, batch_id, event, f"batch {batch_id}", attempt)


def decision_event(session, referral: Referral) -> dict:
    """What a sender is told when a specialist decides one of its studies: the study (DermaScan's
    id and the sender's reference), the decision, its label, the specialist's coded diagnosis and
    when. The note stays in DermaScan (it may name people); the sender reads the rest from the API."""
    from dermascan.screening.reports import decision_fields

    study = referral.study
    return {
        "event": "study.decision_amended" if referral.amendments else "study.decided",
        "study_id": study.id,
        "external_id": study.external_id,
        "batch_id": study.batch_id,
        **decision_fields(referral),
    }


def deliver_decision(settings: Settings, referral_id: int, attempt: int) -> str:
    """POST a decision event once, to the callback URL of the study's batch. Returns "sent",
    "none" (no URL or not decided), "retry" or "gave_up"."""

    def event(session, referral: Referral):
        batch = session.get(Batch, referral.study.batch_id) if referral.study.batch_id else None
        if referral.decision is None or batch is None or not batch.callback_url:
            return None
        return batch.callback_url, batch.program_id, decision_event(session, referral)

    return _deliver_event(settings, Referral, referral_id, event, f"decision on case {referral_id}", attempt)


def _deliver_event(settings: Settings, model, key, event_of, what: str, attempt: int) -> str:
    """Read the row (``model`` by ``key``) and its event (``event_of``: (url, program id, event) or
    None when there is nothing to send), POST it signed once, and record how it went on the row."""
    factory = session_factory(settings.database_url)
    with factory() as session:
        row = session.get(model, key)
        found = None if row is None else event_of(session, row)
        if found is None:
            return "none"
        url, program_id, event = found
        body = json.dumps(event, sort_keys=True).encode()
    status = _post_signed(settings, factory, program_id, url, body, what, attempt)
    with factory() as session, session.begin():
        session.get(model, key).callback_status = f"{status} (attempt {attempt + 1})"
    return status


def wants_decision_callback(session, referral: Referral) -> bool:
    batch = session.get(Batch, referral.study.batch_id) if referral.study.batch_id else None
    return batch is not None and bool(batch.callback_url)


def _post_signed(settings: Settings, factory, program_id: int, url: str, body: bytes, what: str, attempt: int) -> str:
    """Sign ``body`` with the program's callback secret and POST it once: "sent", "retry" or
    "gave_up" (no secret, a refused address, or the last attempt failed)."""
    with factory() as session:
        generation = session.get(Program, program_id).callback_secret_generation
    ok, final = False, False
    if not generation:
        log.warning("callback for %s not sent: its program has no callback secret", what)
        final = True
    else:
        secret = keys.callback_secret(settings.secret_key, program_id, generation)
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(secret, body)}
        try:
            code = post(settings, url, body, headers)
            ok = 200 <= code < 300
            if not ok:
                log.info("callback for %s answered %d (attempt %d)", what, code, attempt + 1)
        except CallbackRefused as exc:
            log.warning("callback for %s refused: %s", what, exc)
            final = True
        except (OSError, http.client.HTTPException) as exc:
            log.info("callback for %s failed (attempt %d): %s", what, attempt + 1, exc)
    retry = not ok and not final and attempt + 1 < settings.callback_retries
    return "sent" if ok else ("retry" if retry else "gave_up")


def retry_delay(settings: Settings, attempt: int) -> float:
    return retry.delay(settings.callback_retry_s, attempt)
