"""The specialist referral queue: ordering (tier, then suspected melanoma, then waiting time),
claiming (``SELECT … FOR UPDATE SKIP LOCKED``, so two specialists never get the same case; a case
handed to a colleague is theirs to claim), stale-claim expiry, release, hand-overs (assignment and
second opinion), decisions with the specialist's own diagnosis, and finding cases again."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import and_, case, func, or_, select, update
from sqlalchemy.orm import Session

from dermascan.errors import Conflict, Invalid, NotAllowed, NotFound
from dermascan.infra.schema import (
    Batch,
    Decision,
    DecisionAmendment,
    Referral,
    ReferralStatus,
    Role,
    Study,
    User,
    utcnow,
)
from dermascan.screening import referral_policy


class ReferralError(Conflict):
    """The case is not in a state that allows this (the default kind)."""


class CaseNotFound(ReferralError, NotFound):
    pass


class NotYourClaim(ReferralError, NotAllowed):
    pass


class UnknownDecision(ReferralError, Invalid):
    pass


class UnknownColleague(ReferralError, Invalid):
    pass


HANDOVER_KINDS = {"assign": "assigned", "second_opinion": "second opinion asked"}


@dataclass
class QueueFilter:
    site: str | None = None
    program_id: int | None = None
    batch_id: str | None = None
    suspected: str | None = None  # the model's most likely diagnosis (a code of the differential)

    def apply(self, query):
        if self.site:
            query = query.where(Study.meta["anatom_site_general"].as_string() == self.site)
        if self.program_id:
            query = query.where(Study.program_id == self.program_id)
        if self.batch_id:
            query = query.where(Study.batch_id == self.batch_id)
        if self.suspected:
            query = query.where(Referral.suspected == self.suspected)
        return query


def _claimable(now: dt.datetime, timeout_s: int):
    """Open, or claimed longer ago than the claim timeout (a stale claim returns to the queue)."""
    return or_(
        Referral.status == ReferralStatus.OPEN,
        and_(Referral.status == ReferralStatus.CLAIMED, Referral.claimed_at < now - dt.timedelta(seconds=timeout_s)),
    )


def queue_order():
    """Tier first; within a tier, suspected melanoma before the rest (melanoma is urgent, a basal
    cell carcinoma routine); then the longest waiting."""
    melanoma_first = case((Referral.suspected == "mel", 0), else_=1)
    return (Referral.tier.asc(), melanoma_first.asc(), Referral.created_at.asc(), Referral.id.asc())


def _free_for(user_id: int):
    """Not handed to someone else (a case handed to a colleague is theirs to claim)."""
    return or_(Referral.assigned_to_id.is_(None), Referral.assigned_to_id == user_id)


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
    query = (
        select(Referral)
        .join(Study, Study.id == Referral.study_id)
        .where(_claimable(now, timeout_s), _free_for(user_id))
    )
    handed_to_me = case((Referral.assigned_to_id == user_id, 0), else_=1)  # cases handed to the claimer first
    query = (
        (flt or QueueFilter())
        .apply(query)
        .order_by(handed_to_me.asc(), *queue_order())
        .limit(1)
        .with_for_update(skip_locked=True, of=Referral)
    )
    referral = session.scalar(query)
    if referral is None:
        return None
    referral.status = ReferralStatus.CLAIMED
    referral.claimed_by_id = user_id
    referral.claimed_at = now
    _claim_siblings(session, referral, user_id, timeout_s, now)
    session.flush()
    return referral


def siblings(session: Session, referral: Referral) -> list[Referral]:
    """The other undecided referrals of the same lesion (its other visits waiting), oldest visit first."""
    lesion_id = referral.study.lesion_id
    if lesion_id is None:
        return []
    return list(
        session.scalars(
            select(Referral)
            .join(Study, Study.id == Referral.study_id)
            .where(Study.lesion_id == lesion_id, Referral.id != referral.id, Referral.status != ReferralStatus.DECIDED)
            .order_by(func.coalesce(Study.acquired_at, Study.created_at), Referral.id)
        )
    )


def _claim_siblings(session: Session, referral: Referral, user_id: int, timeout_s: int, now) -> list[Referral]:
    """One lesion, one item: claiming a visit claims the lesion's other waiting visits too (those
    no one else is reviewing and not handed to someone else)."""
    if referral.study.lesion_id is None:
        return []
    taken = list(
        session.scalars(
            select(Referral)
            .join(Study, Study.id == Referral.study_id)
            .where(
                Study.lesion_id == referral.study.lesion_id, Referral.id != referral.id,
                _claimable(now, timeout_s), _free_for(user_id),
            )
            .with_for_update(skip_locked=True, of=Referral)
        )
    )  # fmt: skip
    for other in taken:
        other.status, other.claimed_by_id, other.claimed_at = ReferralStatus.CLAIMED, user_id, now
    return taken


def group_by_lesion(cases: list[Referral]) -> list[tuple[Referral, list[Referral]]]:
    """The queue as people work it: one item per lesion (its first case in queue order, with the
    lesion's other waiting visits), one per study without a lesion."""
    items: list[tuple[Referral, list[Referral]]] = []
    by_lesion: dict[int, list[Referral]] = {}
    for case_ in cases:
        lesion_id = case_.study.lesion_id
        if lesion_id is None:
            items.append((case_, []))
        elif lesion_id in by_lesion:
            by_lesion[lesion_id].append(case_)
        else:
            by_lesion[lesion_id] = []
            items.append((case_, by_lesion[lesion_id]))
    return items


def claim(session: Session, referral_id: int, user_id: int, timeout_s: int) -> Referral:
    """Claim this case (opened from a link or a search): it must be waiting, not handed to
    someone else."""
    referral = _locked(session, referral_id)
    now = utcnow()
    if referral.status == ReferralStatus.DECIDED:
        raise ReferralError("this case has already been decided")
    if _claimed_by_another(referral, user_id, timeout_s, now):
        raise ReferralError("another specialist is reviewing this case")
    if referral.assigned_to_id not in (None, user_id):
        raise NotYourClaim(f"this case is handed to {referral.assigned_to.username}")
    referral.status, referral.claimed_by_id, referral.claimed_at = ReferralStatus.CLAIMED, user_id, now
    _claim_siblings(session, referral, user_id, timeout_s, now)
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
    referral = _locked(session, referral_id)
    if referral.status == ReferralStatus.DECIDED:
        raise ReferralError("this case has already been decided")
    stale = referral.claimed_at is not None and _aware(referral.claimed_at) < utcnow() - dt.timedelta(seconds=timeout_s)
    if referral.status != ReferralStatus.CLAIMED or referral.claimed_by_id != user_id or stale:
        raise NotYourClaim("only the specialist holding the claim can do this; claim the case first")
    return referral


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _locked(session: Session, referral_id: int) -> Referral:
    """The case, locked for this transaction (FOR UPDATE); CaseNotFound if there is none."""
    referral = session.scalar(select(Referral).where(Referral.id == referral_id).with_for_update())
    if referral is None:
        raise CaseNotFound("no such case")
    return referral


def _claimed_by_another(referral: Referral, user_id: int, timeout_s: int, now: dt.datetime) -> bool:
    """Someone else holds a claim on the case that has not yet gone stale."""
    live = referral.status == ReferralStatus.CLAIMED and _aware(referral.claimed_at) >= now - dt.timedelta(seconds=timeout_s)  # fmt: skip
    return live and referral.claimed_by_id != user_id


def release(session: Session, referral_id: int, user_id: int, timeout_s: int) -> Referral:
    referral = _own_claim(session, referral_id, user_id, timeout_s)
    referral.status = ReferralStatus.OPEN
    referral.claimed_by_id = None
    referral.claimed_at = None
    return referral


def diagnosis_code(value) -> str | None:
    """A specialist's diagnosis: one of the differential's codes, "other", or nothing."""
    from model.inference.diagnosis import CODES

    text = (value or "").strip().lower()
    if not text:
        return None
    if text not in (*CODES, "other"):
        raise UnknownDecision(f"unknown diagnosis {value!r}: one of {', '.join(CODES)} or other")
    return text


def decide(
    session: Session,
    referral_id: int,
    user_id: int,
    decision: str,
    note: str | None,
    timeout_s: int,
    diagnosis: str | None = None,
    settle_lesion: bool = True,
) -> Referral:
    """Decide a case the user holds; with ``settle_lesion``, the lesion's other waiting visits get
    the same decision (``referral.settled`` lists them)."""
    try:
        choice = Decision(decision)
    except ValueError:
        raise UnknownDecision(f"unknown decision {decision!r}") from None
    code = diagnosis_code(diagnosis)
    referral = _own_claim(session, referral_id, user_id, timeout_s)
    now = utcnow()
    referral.status = ReferralStatus.DECIDED
    referral.decision = choice
    referral.specialist_diagnosis = code
    referral.note = (note or "").strip() or None
    referral.decided_by_id = user_id
    referral.decided_at = now
    referral.settled = _settle_siblings(session, referral, user_id, timeout_s, now) if settle_lesion else []
    return referral


def _settle_siblings(session: Session, referral: Referral, user_id: int, timeout_s: int, now) -> list[Referral]:
    """The lesion's other waiting visits that the decider holds, or that no one else is
    reviewing, get the same decision (a note says with which case); the rest stay open and say why
    on the case page (another specialist is reviewing one, or it is handed to a colleague)."""
    settled = []
    for other in siblings(session, referral):
        live_elsewhere = (
            other.status == ReferralStatus.CLAIMED and other.claimed_by_id != user_id
            and _aware(other.claimed_at) >= now - dt.timedelta(seconds=timeout_s)
        )  # fmt: skip
        if live_elsewhere or other.assigned_to_id not in (None, user_id):
            continue
        other.status, other.decision, other.specialist_diagnosis = ReferralStatus.DECIDED, referral.decision, referral.specialist_diagnosis  # fmt: skip
        other.note = f"Settled with case #{referral.id} (the same lesion)" + (
            f": {referral.note}" if referral.note else "."
        )
        other.decided_by_id, other.decided_at = user_id, now
        other.claimed_by_id = other.claimed_by_id or user_id
        settled.append(other)
    return settled


def amend(
    session: Session,
    referral_id: int,
    user_id: int,
    decision: str,
    note: str | None,
    reason: str,
    diagnosis: str | None = None,
    is_admin: bool = False,
) -> Referral:
    """Amend a decided case: the decision in force is kept as an earlier version (with who amends
    it, when and why) and replaced. The specialist who decided it, or an admin, may amend; a
    reason is required. Everything the first decision reached gets the new one (the caller sends
    it: a superseding verified SR, the callback; FHIR and the API read it)."""
    try:
        choice = Decision(decision)
    except ValueError:
        raise UnknownDecision(f"unknown decision {decision!r}") from None
    code = diagnosis_code(diagnosis)
    reason = (reason or "").strip()
    if not reason:
        raise UnknownDecision("an amendment needs its reason")
    referral = _locked(session, referral_id)
    if referral.status != ReferralStatus.DECIDED:
        raise ReferralError("only a decided case can be amended; decide it first")
    if referral.decided_by_id != user_id and not is_admin:
        raise NotYourClaim("only the specialist who decided this case, or an admin, can amend it")
    now = utcnow()
    session.add(DecisionAmendment(
        referral_id=referral.id, decision=referral.decision, specialist_diagnosis=referral.specialist_diagnosis,
        note=referral.note, decided_by_id=referral.decided_by_id, decided_at=referral.decided_at,
        reason=reason[:2000], amended_by_id=user_id, amended_at=now,
    ))  # fmt: skip
    referral.decision, referral.specialist_diagnosis = choice, code
    referral.note = (note or "").strip() or None
    referral.decided_by_id, referral.decided_at = user_id, now
    session.flush()
    return referral


def amendments(session: Session, referral_id: int) -> list[DecisionAmendment]:
    """The earlier versions of a case's decision, oldest first."""
    return list(
        session.scalars(
            select(DecisionAmendment)
            .where(DecisionAmendment.referral_id == referral_id)
            .order_by(DecisionAmendment.amended_at, DecisionAmendment.id)
        )
    )


def colleagues(session: Session, user_id: int) -> list[User]:
    """Who a case may be handed to: the other active specialists and admins."""
    query = select(User).where(User.id != user_id, User.role.in_([Role.SPECIALIST, Role.ADMIN]), User.active.is_(True))
    return list(session.scalars(query.order_by(User.username)))


def hand_over(
    session: Session, referral_id: int, user_id: int, to_user_id: int, kind: str, note: str | None, timeout_s: int
) -> Referral:
    """Assign the case to a colleague, or ask a colleague for a second opinion: the case leaves
    the reader's hands (claim released) and waits for the colleague, who claims and decides it;
    the request and its note show on the case page. Only an undecided case, by whoever holds its
    claim or, unclaimed, by anyone who may review it."""
    if kind not in HANDOVER_KINDS:
        raise UnknownDecision(f"unknown hand-over {kind!r}: assign or second_opinion")
    referral = _locked(session, referral_id)
    if referral.status == ReferralStatus.DECIDED:
        raise ReferralError("this case has already been decided")
    now = utcnow()
    if _claimed_by_another(referral, user_id, timeout_s, now):
        raise NotYourClaim("only the specialist holding the claim can hand this case over")
    colleague = session.get(User, to_user_id)
    if colleague is None or colleague.id not in {c.id for c in colleagues(session, user_id)}:
        raise UnknownColleague("hand the case to another specialist")
    referral.status, referral.claimed_by_id, referral.claimed_at = ReferralStatus.OPEN, None, None
    referral.assigned_to_id, referral.assigned_by_id, referral.assigned_at = colleague.id, user_id, now
    referral.assignment_kind, referral.assignment_note = kind, (note or "").strip()[:2000] or None
    session.flush()
    return referral


def handed_to(session: Session, user_id: int) -> list[Referral]:
    """Undecided cases handed to this user."""
    return list(
        session.scalars(
            select(Referral)
            .where(Referral.assigned_to_id == user_id, Referral.status != ReferralStatus.DECIDED)
            .order_by(Referral.assigned_at)
        )
    )


@dataclass
class Search:
    """Finding a case again: by the sender's reference (part of it), the patient (the sender's
    patient id, pseudonymised as at intake, or the pseudonym itself), the day received, and who
    decided it."""

    text: str | None = None
    received_from: dt.date | None = None
    received_to: dt.date | None = None
    decided_by_id: int | None = None
    status: str | None = None  # open | claimed | decided


def search(session: Session, query: Search, pseudonyms=None, limit: int = 200) -> list[Referral]:
    """Cases matching ``query``, newest first. ``pseudonyms``: the patient pseudonyms the text
    stands for in each program (the caller derives them with the installation's key)."""
    statement = select(Referral).join(Study, Study.id == Referral.study_id)
    if query.text:
        text = query.text.strip()
        matches = [
            func.lower(Study.external_id).contains(text.lower()[:200], autoescape=True),
            Study.patient_pseudonym == text,
        ]
        if pseudonyms:
            matches.append(Study.patient_pseudonym.in_(list(pseudonyms)))
        statement = statement.where(or_(*matches))
    if query.received_from:
        start = dt.datetime.combine(query.received_from, dt.time(), tzinfo=dt.UTC)
        statement = statement.where(Study.created_at >= start)
    if query.received_to:
        end = dt.datetime.combine(query.received_to + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
        statement = statement.where(Study.created_at < end)
    if query.decided_by_id:
        statement = statement.where(Referral.decided_by_id == query.decided_by_id)
    if query.status:
        statement = statement.where(Referral.status == ReferralStatus(query.status))
    return list(session.scalars(statement.order_by(Referral.created_at.desc(), Referral.id.desc()).limit(limit)))


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
