"""The sweeper: what fell through the cracks is sent again, without anyone's help.

- a study never sent (the broker was down at submit time), after a few seconds;
- a queued study whose message the broker no longer holds (a Redis without persistence that
  restarted lost it), ``sweep_lost_after_s`` after it was sent; where the broker cannot be read,
  any queued study sent longer ago than ``sweep_queued_after_s``;
- a study whose worker's lease ran out (the worker was killed, or stalled past its heartbeat), at
  once, whatever its age; rows from before leases existed after ``sweep_processing_after_s``.

Each is stamped when re-sent, and messages are idempotent (a study already done or held under a
live lease is skipped by the worker that receives it), so a duplicate costs a lookup, never a
second score. Stale referral claims go back to the queue, and the retention policy is applied.

Every worker runs :func:`run_forever` in a thread of its own; :func:`guarded_sweep` lets one sweep
run at a time across the deployment (a PostgreSQL advisory lock; a lock file on the embedded
default), so recovery does not depend on someone starting beat. ``dermascan sweep`` and the beat
service go through the same guard.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import threading
from contextlib import contextmanager

from sqlalchemy import and_, or_, select, text, update

from dermascan.config import Settings
from dermascan.infra import broker
from dermascan.infra.db import engine_for, session_factory
from dermascan.infra.schema import Priority, Study, StudyStatus, utcnow
from dermascan.intake.submission import enqueue
from dermascan.referrals import queue

log = logging.getLogger(__name__)
LOCK_KEY = 0x44534E5357  # "DSNSW": the deployment's one sweep lock


def sweep(settings: Settings, now: dt.datetime | None = None, unsent_after_s: float = 5.0) -> dict:
    """One pass of the sweeper (see the module docstring)."""
    now = now or utcnow()
    held = broker.held_study_ids(settings)
    queued_after = settings.sweep_lost_after_s if held is not None else settings.sweep_queued_after_s
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
                        Study.enqueued_at < now - dt.timedelta(seconds=queued_after),
                    ),
                    and_(Study.status == StudyStatus.PROCESSING, Study.lease_until < now),
                    and_(
                        Study.status == StudyStatus.PROCESSING,
                        Study.lease_until.is_(None),
                        Study.started_at < now - dt.timedelta(seconds=settings.sweep_processing_after_s),
                    ),
                )
            )
            .order_by(Study.id)
            .with_for_update(skip_locked=True)
        ).all()
        if held is not None:  # a queued study whose message is still in the broker is only waiting
            rows = [r for r in rows if r.status != StudyStatus.QUEUED or r.id not in held]
        stuck = [r.id for r in rows if r.status == StudyStatus.PROCESSING]
        for start in range(0, len(stuck), 1000):
            session.execute(
                update(Study)
                .where(Study.id.in_(stuck[start : start + 1000]))
                .values(status=StudyStatus.QUEUED, started_at=None, lease_owner=None, lease_until=None)
            )
        claims = queue.expire_stale_claims(session, settings.claim_timeout_s)
    interactive = [r.id for r in rows if r.priority == Priority.INTERACTIVE]
    bulk = [r.id for r in rows if r.priority != Priority.INTERACTIVE]
    sent = enqueue(settings, interactive, True) + enqueue(settings, bulk, False)
    if rows or claims:
        log.info(
            "sweep: %d found (%d whose worker's lease ran out), %d re-sent; %d stale claims released%s",
            len(rows), len(stuck), len(sent), claims,
            "" if held is not None else " (the broker could not be read: by age alone)",
        )  # fmt: skip
    purged = {}
    if settings.retention_days > 0:
        from dermascan.infra.blobs import blob_store
        from dermascan.upkeep import retention

        purged = retention.purge(factory, blob_store(settings), settings.retention_days, now=now)
    return {
        "found": len(rows), "stuck_processing": len(stuck), "sent": len(sent), "stale_claims": claims,
        "purged": purged.get("studies", 0), "broker_read": held is not None,
    }  # fmt: skip


@contextmanager
def sweep_lock(settings: Settings):
    """Yields True when this process holds the deployment's sweep lock (else False: another
    sweep is running). PostgreSQL: a session advisory lock, released with the connection if the
    process dies; SQLite (one machine): an exclusive lock on a file in the data directory."""
    if settings.database_url.startswith("postgresql"):
        with engine_for(settings.database_url).connect() as connection:
            got = connection.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": LOCK_KEY}).scalar()
            try:
                yield bool(got)
            finally:
                if got:
                    connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK_KEY})
                connection.rollback()
        return
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.data_dir / "sweep.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def guarded_sweep(settings: Settings) -> dict | None:
    """One sweep unless another process is sweeping now (then None)."""
    with sweep_lock(settings) as mine:
        return sweep(settings) if mine else None


def run_forever(settings: Settings, stop: threading.Event) -> None:
    """A worker's sweeper thread: a guarded sweep every ``sweep_interval_s``; a failing pass (the
    database or broker restarting) is logged and the next one tries again."""
    while not stop.wait(settings.sweep_interval_s):
        try:
            guarded_sweep(settings)
        except Exception as exc:
            log.warning("sweep failed, trying again in %d s: %s", settings.sweep_interval_s, exc)
