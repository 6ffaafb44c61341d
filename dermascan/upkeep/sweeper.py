"""The sweeper (Celery beat, and ``dermascan sweep``): what fell through the cracks is sent
again — studies never sent (the broker was down), queued too long (a message lost with a
broker), stuck in ``processing`` (a worker died) — stale referral claims go back to the queue,
and the retention policy is applied."""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import and_, or_, select, update

from dermascan.config import Settings
from dermascan.infra.db import session_factory
from dermascan.infra.schema import Priority, Study, StudyStatus, utcnow
from dermascan.intake.submission import enqueue
from dermascan.referrals import queue as referrals

log = logging.getLogger(__name__)


def sweep(settings: Settings, now: dt.datetime | None = None, unsent_after_s: float = 5.0) -> dict:
    """Re-send studies that fell through the cracks.

    - queued and never sent (the broker was down at submit time), after ``unsent_after_s``;
    - queued and sent longer ago than ``sweep_queued_after_s`` (a message lost with a broker);
    - processing for longer than ``sweep_processing_after_s`` (a worker died mid-batch).
    Each is stamped when re-sent, so a long backlog is not re-sent on every sweep.
    """
    now = now or utcnow()
    factory = session_factory(settings.database_url)
    with factory() as session, session.begin():
        rows = session.execute(
            select(Study.id, Study.priority, Study.status)
            .where(
                or_(
                    and_(
                        Study.status == StudyStatus.QUEUED,
                        Study.enqueued_at.is_(None),
                        Study.created_at < now - dt.timedelta(seconds=unsent_after_s),
                    ),
                    and_(
                        Study.status == StudyStatus.QUEUED,
                        Study.enqueued_at < now - dt.timedelta(seconds=settings.sweep_queued_after_s),
                    ),
                    and_(
                        Study.status == StudyStatus.PROCESSING,
                        Study.started_at < now - dt.timedelta(seconds=settings.sweep_processing_after_s),
                    ),
                )
            )
            .order_by(Study.id)
            .with_for_update(skip_locked=True)
        ).all()
        stuck = [r.id for r in rows if r.status == StudyStatus.PROCESSING]
        if stuck:
            session.execute(update(Study).where(Study.id.in_(stuck)).values(status=StudyStatus.QUEUED, started_at=None))
        claims = referrals.expire_stale_claims(session, settings.claim_timeout_s)
    interactive = [r.id for r in rows if r.priority == Priority.INTERACTIVE]
    bulk = [r.id for r in rows if r.priority != Priority.INTERACTIVE]
    sent = enqueue(settings, interactive, True) + enqueue(settings, bulk, False)
    if rows or claims:
        log.info(
            "sweep: %d found (%d stuck processing), %d re-sent; %d stale claims released",
            len(rows),
            len(stuck),
            len(sent),
            claims,
        )
    purged = {}
    if settings.retention_days > 0:
        from dermascan.infra.blobs import blob_store
        from dermascan.upkeep import retention

        purged = retention.purge(factory, blob_store(settings), settings.retention_days, now=now)
    return {
        "found": len(rows), "stuck_processing": len(stuck), "sent": len(sent), "stale_claims": claims,
        "purged": purged.get("studies", 0),
    }  # fmt: skip
