"""PACS destinations per program: a DIMSE C-STORE peer (host, port, AE title, optional TLS) or a
STOW-RS URL (optional credentials, kept encrypted). What an administrator enters is validated here
before it is kept (the admin page and ``dermascan destination`` both come through here)."""

from __future__ import annotations

from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from dermascan.config import Settings
from dermascan.errors import Invalid
from dermascan.infra.schema import DicomDestination, Program
from dermascan.security import keys, outbound
from dermascan.security.audit import SYSTEM, Actor


class BadDestination(Invalid):
    """A destination an administrator entered that cannot be used (kept out of the database)."""


def policy(settings: Settings) -> outbound.Policy:
    """PACS live on hospital networks: private addresses are allowed; DermaScan's own host,
    link-local (cloud metadata), unspecified, multicast and reserved ones are not, unless the
    operator listed the host in DERMASCAN_DESTINATION_ALLOW_HOSTS."""
    return outbound.Policy(True, tuple(outbound.listed_hosts(settings.destination_allow_hosts)), "destination")


def _check_host(settings: Settings, host: str) -> None:
    try:
        policy(settings).check_host(host)
    except outbound.OutboundRefused as exc:
        raise BadDestination(f"{exc} (an operator may list it in DERMASCAN_DESTINATION_ALLOW_HOSTS)") from None


def warnings(destination: DicomDestination) -> list[str]:
    """What an administrator should know about a destination that works but is not safe."""
    out = []
    if destination.kind == "stow" and (destination.url or "").lower().startswith("http://"):
        if destination.secret_encrypted:
            out.append("sends its credentials over plain http: anyone on the network path can read them — use https")
        else:
            out.append("plain http: results travel unencrypted — use https")
    if destination.kind == "dimse" and not destination.tls:
        out.append("DIMSE without TLS: results travel unencrypted on the hospital network")
    return out


def _ae_title(value: str) -> str:
    value = (value or "").strip()
    if not value or len(value) > 16 or not value.isascii() or "\\" in value or not value.isprintable():
        raise BadDestination("an AE title is 1 to 16 printable ASCII characters, no backslash")
    return value


def add_destination(
    session: Session,
    settings: Settings,
    program: Program,
    name: str,
    *,
    host: str | None = None,
    port: int | None = None,
    ae_title: str | None = None,
    tls: bool = False,
    url: str | None = None,
    username: str | None = None,
    secret: str | None = None,
    actor: Actor = SYSTEM,
) -> DicomDestination:
    """A DIMSE destination (host, port, AE title) or a STOW-RS one (url, optional credentials),
    audited."""
    name = (name or "").strip()
    if not name or len(name) > 64:
        raise BadDestination("a destination needs a name of at most 64 characters")
    if session.scalar(
        select(DicomDestination).where(DicomDestination.program_id == program.id, DicomDestination.name == name)
    ):
        raise BadDestination(f"program {program.name} already has a destination named {name!r}")
    if bool(url) == bool(host):
        raise BadDestination("give either a host, port and AE title (DIMSE) or a STOW-RS URL, not both")
    row = DicomDestination(program_id=program.id, name=name, enabled=True)
    if host:
        host = host.strip()
        if len(host) > 253 or any(c.isspace() or c in "/@?#" for c in host):
            raise BadDestination("a DIMSE destination needs a host name or address")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise BadDestination("a DIMSE destination needs a port between 1 and 65535")
        _check_host(settings, host)
        row.kind, row.host, row.port, row.ae_title, row.tls = "dimse", host, port, _ae_title(ae_title), tls
    else:
        url = url.strip()
        try:
            parts = urlsplit(url)
            _ = parts.port
        except ValueError:
            raise BadDestination("a STOW-RS destination needs a valid http(s) URL") from None
        if (
            len(url) > 2000
            or parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.username
            or parts.password
        ):
            raise BadDestination("a STOW-RS destination needs an http(s) URL without credentials in it")
        _check_host(settings, parts.hostname)
        row.kind, row.url, row.username = "stow", url, (username or None)
        if secret:
            row.secret_encrypted = keys.destination_cipher(settings.secret_key).encrypt(secret.encode())
    session.add(row)
    session.flush()
    actor.record(session, "destination_added", object_type="destination", object_id=row.id,
                 detail={"program": program.name, "name": name, "target": row.target})  # fmt: skip
    return row


def set_enabled(session: Session, row: DicomDestination, enabled: bool, actor: Actor = SYSTEM) -> None:
    """Send to this destination again, or stop sending to it (its deliveries wait), audited."""
    row.enabled = bool(enabled)
    actor.record(session, "destination_enabled" if row.enabled else "destination_disabled", object_type="destination",
                 object_id=row.id, detail={"program": row.program.name, "name": row.name})  # fmt: skip


def listed(session: Session, program_id: int | None = None) -> list[DicomDestination]:
    query = select(DicomDestination).order_by(DicomDestination.program_id, DicomDestination.name)
    if program_id is not None:
        query = query.where(DicomDestination.program_id == program_id)
    return list(session.scalars(query))


def find_destination(session: Session, program: str, name: str) -> DicomDestination | None:
    return session.scalar(
        select(DicomDestination).join(Program).where(Program.name == program, DicomDestination.name == name)
    )
