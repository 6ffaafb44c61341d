"""The audit trail: one row per case view, claim, release and decision, login and token use."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from dermascan.infra.schema import AuditEvent, iso_utc, utcnow
from dermascan.security import csv_cells


def record(
    session: Session,
    action: str,
    *,
    user_id: int | None = None,
    token_id: int | None = None,
    object_type: str | None = None,
    object_id=None,
    detail: dict | None = None,
    ip: str | None = None,
) -> AuditEvent:
    event = AuditEvent(
        at=utcnow(),
        action=action,
        user_id=user_id,
        token_id=token_id,
        object_type=object_type,
        object_id=None if object_id is None else str(object_id)[:64],  # the column's width
        detail=detail,
        ip=ip,
    )
    session.add(event)
    return event


@dataclass(frozen=True)
class Actor:
    """Who does an admin action: a portal user (and the address they came from) or a command of the
    CLI (``by``); the room's function that does the action records it with this."""

    user_id: int | None = None
    ip: str | None = None
    by: str | None = None

    def record(self, session: Session, action: str, *, object_type=None, object_id=None, detail=None) -> AuditEvent:
        detail = {**(detail or {}), **({"by": self.by} if self.by else {})}
        return record(session, action, user_id=self.user_id, object_type=object_type, object_id=object_id,
                      detail=detail or None, ip=self.ip)  # fmt: skip


SYSTEM = Actor()


def command(name: str) -> Actor:
    """The actor of a CLI command (``dermascan …``)."""
    return Actor(by=name)


CSV_COLUMNS = ["id", "at", "action", "user", "token_id", "object_type", "object_id", "detail", "ip"]


def to_csv(events: Iterable[AuditEvent], header: bool = True) -> str:
    import json

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    if header:
        writer.writerow(CSV_COLUMNS)
    for e in events:
        writer.writerow(
            [
                csv_cells.safe(cell)
                for cell in (
                    e.id,
                    iso_utc(e.at) or "",
                    e.action,
                    e.user.username if e.user else "",
                    e.token_id or "",
                    e.object_type or "",
                    e.object_id or "",
                    json.dumps(e.detail, sort_keys=True) if e.detail else "",
                    e.ip or "",
                )
            ]
        )
    return buffer.getvalue()


def stream_csv(factory, page: int = 2000) -> Iterator[str]:
    """The whole trail as CSV text, a page of events at a time (keyset pagination in a session of
    its own): memory stays flat however long the trail."""
    from sqlalchemy import select
    from sqlalchemy.orm import joinedload

    yield to_csv([], header=True)
    last = 0
    while True:
        with factory() as session:
            events = list(
                session.scalars(
                    select(AuditEvent)
                    .options(joinedload(AuditEvent.user))
                    .where(AuditEvent.id > last)
                    .order_by(AuditEvent.id)
                    .limit(page)
                )
            )
            if not events:
                return
            yield to_csv(events, header=False)
        last = events[-1].id


@dataclass(frozen=True)
class EventFilter:
    """Which audit events to show: by action, by user name, from and before a day, about a study
    (the study itself, or its referral)."""

    action: str | None = None
    user: str | None = None
    since: object = None  # a datetime, inclusive
    until: object = None  # a datetime, exclusive
    study_id: int | None = None


def events_page(session: Session, page: int, per_page: int = 100, action: str | None = None,
                where: EventFilter | None = None) -> list[AuditEvent]:  # fmt: skip
    """One page of the audit trail, newest first, filtered."""
    from sqlalchemy import and_, or_

    from dermascan.infra.schema import Referral, User

    where = where or EventFilter(action=action)
    query = select(AuditEvent).order_by(AuditEvent.id.desc())
    if where.action:
        query = query.where(AuditEvent.action == where.action)
    if where.user:
        query = query.where(AuditEvent.user_id.in_(select(User.id).where(User.username == where.user)))
    if where.since is not None:
        query = query.where(AuditEvent.at >= where.since)
    if where.until is not None:
        query = query.where(AuditEvent.at < where.until)
    if where.study_id is not None:
        referrals = [str(r) for r in session.scalars(select(Referral.id).where(Referral.study_id == where.study_id))]
        query = query.where(or_(
            and_(AuditEvent.object_type == "study", AuditEvent.object_id == str(where.study_id)),
            and_(AuditEvent.object_type == "referral", AuditEvent.object_id.in_(referrals or ["-"])),
        ))  # fmt: skip
    return list(session.scalars(query.offset((page - 1) * per_page).limit(per_page)))


def actions(session: Session) -> list[str]:
    """Every action the trail holds, for the page's filter."""
    return sorted(session.scalars(select(AuditEvent.action).distinct()))
