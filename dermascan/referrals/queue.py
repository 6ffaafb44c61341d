"""The specialist referral queue: ordering, claiming (``SELECT … FOR UPDATE SKIP LOCKED``, so
two specialists never get the same case), stale-claim expiry, release and decisions."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from dermascan.errors import Conflict, Invalid, NotAllowed, NotFound
from dermascan.infra.schema import Batch, Decision, Referral, ReferralStatus, Study, utcnow
from dermascan.screening import referral_policy


class ReferralError(Conflict):
    """The case is not in a state that allows this (the default kind)."""


class CaseNotFound(ReferralError, NotFound):
    pass


class NotYourClaim(ReferralError, NotAllowed):
    pass


class UnknownDecision(ReferralError, Invalid):
    pass


@dataclass
class QueueFilter:
    site: str | None = None
    program_id: int | None = None
    batch_id: str | None = None

    def apply(self, query):
        if self.site:
            query = query.where(Study.meta["anatom_site_general"].as_string() == self.site)
        if self.program_id:
            query = query.where(Study.program_id == self.program_id)
        if self.batch_id:
            query = query.where(Study.batch_id == self.batch_id)
        return query


def _claimable(now: dt.datetime, timeout_s: int):
    """Open, or claimed longer ago than the claim timeout (a stale claim returns to the queue)."""
    return or_(
        Referral.status == ReferralStatus.OPEN,
        and_(Referral.status == ReferralStatus.CLAIMED, Referral.claimed_at < now - dt.timedelta(seconds=timeout_s)),
    )


def queue_order():
    return (Referral.tier.asc(), Referral.created_at.asc(), Referral.id.asc())


def open_cases(session: Session, timeout_s: int, flt: QueueFilter | None = None, limit: int = 200) -> list[Referral]:
    query = select(Referral).join(Study, Study.id == Referral.study_id).where(_claimable(utcnow(), timeout_s))
    query = (flt or QueueFilter()).apply(query)
    return list(session.scalars(query.order_by(*queue_order()).limit(limit)))


def queue_stats(session: Session, timeout_s: int, flt: QueueFilter | None = None) -> dict:
    now = utcnow()
    base = select(func.count(), func.min(Referral.created_at)).join(Study, Study.id == Referral.study_id)
    base = (flt or QueueFilter()).apply(base)
    waiting, oldest = session.execute(base.where(_claimable(now, timeout_s))).one()
    claimed = session.scalar(
        (flt or QueueFilter()).apply(
            select(func.count())
            .select_from(Referral)
            .join(Study, Study.id == Referral.study_id)
            .where(
                Referral.status == ReferralStatus.CLAIMED, Referral.claimed_at >= now - dt.timedelta(seconds=timeout_s)
            )
        )
    )
    by_category_tier = session.execute(
        (flt or QueueFilter())
        .apply(select(Referral.category, Referral.tier, func.count()).join(Study, Study.id == Referral.study_id))
        .where(_claimable(now, timeout_s))
        .group_by(Referral.category, Referral.tier)
    ).all()
    by_tier: dict[int, int] = {}
    for category, tier, n in by_category_tier:
        if category != referral_policy.NOT_ASSESSABLE:
            by_tier[tier] = by_tier.get(tier, 0) + n
    not_assessable = sum(n for category, _, n in by_category_tier if category == referral_policy.NOT_ASSESSABLE)
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=dt.UTC)
    return {
        "waiting": waiting,
        "claimed": claimed,
        "by_tier": by_tier,
        "not_assessable": not_assessable,
        "oldest_age_s": None if oldest is None else (now - oldest).total_seconds(),
    }


def claim_next(session: Session, user_id: int, timeout_s: int, flt: QueueFilter | None = None) -> Referral | None:
    """Claim the top case. Concurrent claimers skip rows another transaction has locked."""
    now = utcnow()
    query = select(Referral).join(Study, Study.id == Referral.study_id).where(_claimable(now, timeout_s))
    query = (
        (flt or QueueFilter())
        .apply(query)
        .order_by(*queue_order())
        .limit(1)
        .with_for_update(skip_locked=True, of=Referral)
    )
    referral = session.scalar(query)
    if referral is None:
        return None
    referral.status = ReferralStatus.CLAIMED
    referral.claimed_by_id = user_id
    referral.claimed_at = now
    session.flush()
    return referral


def current_claim(session: Session, user_id: int, timeout_s: int) -> Referral | None:
    now = utcnow()
    return session.scalar(
        select(Referral)
        .where(
            Referral.status == ReferralStatus.CLAIMED,
            Referral.claimed_by_id == user_id,
            Referral.claimed_at >= now - dt.timedelta(seconds=timeout_s),
        )
        .order_by(Referral.claimed_at)
        .limit(1)
    )


def _own_claim(session: Session, referral_id: int, user_id: int, timeout_s: int) -> Referral:
    referral = session.scalar(select(Referral).where(Referral.id == referral_id).with_for_update())
    if referral is None:
        raise CaseNotFound("no such case")
    if referral.status == ReferralStatus.DECIDED:
        raise ReferralError("this case has already been decided")
    stale = referral.claimed_at is not None and _aware(referral.claimed_at) < utcnow() - dt.timedelta(seconds=timeout_s)
    if referral.status != ReferralStatus.CLAIMED or referral.claimed_by_id != user_id or stale:
        raise NotYourClaim("only the specialist holding the claim can do this; claim the case first")
    return referral


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def release(session: Session, referral_id: int, user_id: int, timeout_s: int) -> Referral:
    referral = _own_claim(session, referral_id, user_id, timeout_s)
    referral.status = ReferralStatus.OPEN
    referral.claimed_by_id = None
    referral.claimed_at = None
    return referral


def decide(
    session: Session, referral_id: int, user_id: int, decision: str, note: str | None, timeout_s: int
) -> Referral:
    try:
        choice = Decision(decision)
    except ValueError:
        raise UnknownDecision(f"unknown decision {decision!r}") from None
    referral = _own_claim(session, referral_id, user_id, timeout_s)
    referral.status = ReferralStatus.DECIDED
    referral.decision = choice
    referral.note = (note or "").strip() or None
    referral.decided_by_id = user_id
    referral.decided_at = utcnow()
    return referral


def expire_stale_claims(session: Session, timeout_s: int) -> int:
    """Return stale claims to the queue explicitly (the queue also treats them as open)."""
    cutoff = utcnow() - dt.timedelta(seconds=timeout_s)
    return session.execute(
        update(Referral)
        .where(Referral.status == ReferralStatus.CLAIMED, Referral.claimed_at < cutoff)
        .values(status=ReferralStatus.OPEN, claimed_by_id=None, claimed_at=None)
    ).rowcount


def same_patient(session: Session, study: Study, limit: int = 20) -> list[Study]:
    """Other lesions of the same (pseudonymised) patient in the same batch."""
    if not study.patient_pseudonym:
        return []
    query = select(Study).where(Study.patient_pseudonym == study.patient_pseudonym, Study.id != study.id)
    if study.batch_id:
        query = query.where(Study.batch_id == study.batch_id)
    return list(session.scalars(query.order_by(Study.id).limit(limit)))


def batches_with_referrals(session: Session) -> list[Batch]:
    return list(
        session.scalars(
            select(Batch)
            .where(Batch.id.in_(select(Study.batch_id).join(Referral, Referral.study_id == Study.id)))
            .order_by(Batch.created_at.desc())
            .limit(100)
        )
    )
