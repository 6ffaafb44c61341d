"""Batch completion callbacks: an HMAC-SHA256-signed JSON POST to the URL the program gave,
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
import ipaddress
import json
import logging
import socket
import ssl
import time
from urllib.parse import urlsplit

from sqlalchemy import func, select

from dermascan.config import Settings
from dermascan.infra.db import session_factory
from dermascan.infra.schema import Batch, Program, Study, iso_utc
from dermascan.results_out import retry
from dermascan.screening.reports import referral_counts
from dermascan.security import keys

log = logging.getLogger(__name__)
SIGNATURE_HEADER = "X-DermaScan-Signature"
MAX_URL = 2000


class CallbackRefused(ValueError):
    """A callback URL or address that DermaScan will not call."""


def allowed_hosts(settings: Settings) -> list[str]:
    return [h.strip().lower() for h in settings.callback_allow_hosts.split(",") if h.strip()]


def _listed(host: str, ip, listed: list[str]) -> bool:
    """The admin listed this host name, or an address or network that holds ``ip``."""
    host = host.lower().strip("[]")
    for entry in listed:
        if entry == host:
            return True
        try:
            if ip is not None and ip in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


def check_url(settings: Settings, url) -> str | None:
    """A callback URL as given by a program: None, or a URL DermaScan may call (else CallbackRefused)."""
    if url in (None, ""):
        return None
    url = str(url).strip()
    parts = urlsplit(url)
    host = parts.hostname or ""
    if len(url) > MAX_URL or parts.scheme not in ("http", "https") or not host:
        raise CallbackRefused(f"callback_url must be an https URL of at most {MAX_URL} characters")
    if parts.username or parts.password:
        raise CallbackRefused("callback_url must not carry credentials")
    listed = allowed_hosts(settings)
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if parts.scheme == "http" and not _listed(host, literal, listed):
        raise CallbackRefused(
            "callback_url must use https (http only for hosts an administrator allowed in DERMASCAN_CALLBACK_ALLOW_HOSTS)"
        )
    if literal is not None and not _public(literal) and not _listed(host, literal, listed):
        raise CallbackRefused(f"callback_url points at a {_kind(literal)} address, which DermaScan does not call")
    return url


def _public(ip) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _kind(ip) -> str:
    for name in ("loopback", "private", "link_local", "multicast", "reserved", "unspecified"):
        if getattr(ip, f"is_{name}", False):
            return name.replace("_", "-")
    return "non-public"


def _connect(host: str, port: int, timeout: float, listed: list[str]) -> socket.socket:
    """Resolve, check every address at connect time, connect to the first allowed one."""
    refused = None
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        ip = ipaddress.ip_address(address[0])
        if not (_public(ip) or _listed(host, ip, listed)):
            refused = CallbackRefused(f"{host} resolves to a {_kind(ip)} address ({ip}), which DermaScan does not call")
            continue
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except OSError:
            sock.close()
            raise
        return sock
    raise refused or OSError(f"{host} did not resolve")


class _GuardedHTTP(http.client.HTTPConnection):
    listed: list[str] = []

    def connect(self):
        self.sock = _connect(self.host, self.port, self.timeout, self.listed)


class _GuardedHTTPS(http.client.HTTPSConnection):
    listed: list[str] = []

    def connect(self):
        sock = _connect(self.host, self.port, self.timeout, self.listed)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def post(settings: Settings, url: str, body: bytes, headers: dict, timeout: float = 10) -> int:
    """POST once through the guarded connection; the HTTP status (a redirect is not followed)."""
    url = check_url(settings, url)
    parts = urlsplit(url)
    listed = allowed_hosts(settings)
    if parts.scheme == "https":
        connection = _GuardedHTTPS(parts.hostname, parts.port, timeout=timeout, context=ssl.create_default_context())
    else:
        connection = _GuardedHTTP(parts.hostname, parts.port, timeout=timeout)
    connection.listed = listed
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
    factory = session_factory(settings.database_url)
    with factory() as session:
        batch = session.get(Batch, batch_id)
        if batch is None or not batch.callback_url:
            return "none"
        body = json.dumps(batch_summary(session, batch), sort_keys=True).encode()
        url = batch.callback_url
        program = session.get(Program, batch.program_id)
        generation = program.callback_secret_generation
    ok, final = False, False
    if not generation:
        log.warning("callback for batch %s not sent: its program has no callback secret", batch_id)
        final = True
    else:
        secret = keys.callback_secret(settings.secret_key, batch.program_id, generation)
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(secret, body)}
        try:
            code = post(settings, url, body, headers)
            ok = 200 <= code < 300
            if not ok:
                log.info("callback for batch %s answered %d (attempt %d)", batch_id, code, attempt + 1)
        except CallbackRefused as exc:
            log.warning("callback for batch %s refused: %s", batch_id, exc)
            final = True
        except (OSError, http.client.HTTPException) as exc:
            log.info("callback for batch %s failed (attempt %d): %s", batch_id, attempt + 1, exc)
    retry = not ok and not final and attempt + 1 < settings.callback_retries
    status = "sent" if ok else ("retry" if retry else "gave_up")
    with factory() as session, session.begin():
        session.get(Batch, batch_id).callback_status = f"{status} (attempt {attempt + 1})"
    return status


def retry_delay(settings: Settings, attempt: int) -> float:
    return retry.delay(settings.callback_retry_s, attempt)
