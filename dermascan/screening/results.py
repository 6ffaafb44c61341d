"""Writing screening results: claiming studies for scoring, then predictions, statuses and
referrals in one transaction — idempotently, so a redelivered message or a second worker never
writes a second prediction for the same study and bundle version."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from dermascan.infra.db import insert_ignoring_conflicts
from dermascan.infra.schema import Batch, Prediction, Priority, Referral, Study, StudyStatus, utcnow
from dermascan.screening import referral_policy


@dataclass
class ScoredStudy:
    study_id: int
    probability: float
    spread: float | None = None
    assessable: bool = True
    reason: str | None = None  # why the image could not be assessed
    distance: float | None = None  # the gate's feature distance
    stats: dict | None = None  # image statistics for monitoring (brightness, contrast, sharpness, size)


def claim(session: Session, study_ids: Sequence[int]) -> list[Study]:
    """The studies of a message that still need scoring (queued, or processing by a worker that
    died), marked processing. Done and failed studies are skipped: a redelivery does no harm."""
    rows = list(
        session.scalars(
            select(Study)
            .where(Study.id.in_(list(study_ids)), Study.status.in_([StudyStatus.QUEUED, StudyStatus.PROCESSING]))
            .order_by(Study.id)
        )
    )
    if rows:
        session.execute(
            update(Study)
            .where(Study.id.in_([s.id for s in rows]))
            .values(status=StudyStatus.PROCESSING, started_at=utcnow(), attempts=Study.attempts + 1)
        )
    return rows


def gather_interactive(session: Session, exclude: Sequence[int], limit: int) -> list[int]:
    """Claim up to ``limit`` more queued interactive studies for a dynamic batch (each still has
    its own message; when that arrives, the study is done and the message is a no-op)."""
    if limit <= 0:
        return []
    query = (
        select(Study.id)
        .where(
            Study.status == StudyStatus.QUEUED, Study.priority == Priority.INTERACTIVE, Study.id.not_in(list(exclude))
        )
        .order_by(Study.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    ids = list(session.scalars(query))
    if ids:
        session.execute(
            update(Study)
            .where(Study.id.in_(ids), Study.status == StudyStatus.QUEUED)
            .values(status=StudyStatus.PROCESSING, started_at=utcnow(), attempts=Study.attempts + 1)
        )
    return ids


def record(
    session: Session,
    bundle_version: str,
    threshold: float,
    scored: Sequence[ScoredStudy],
    failed: Sequence[tuple[int, str]] = (),
) -> dict:
    """Write one batch's results in the caller's transaction: predictions (one multi-row insert,
    duplicates ignored), statuses, and the referrals the referral policy decides (high risk at or
    above ``threshold``; every not-assessable image, to be checked by a person). The returned
    ``high_risk`` lists the study ids referred for their probability (they get heat maps)."""
    now = utcnow()
    _insert_predictions(session, bundle_version, threshold, scored, now)
    _set_statuses(session, [s.study_id for s in scored], failed, now)
    decided = [(s, referral_policy.decide(s.probability, threshold, s.assessable)) for s in scored]
    referred = [(s, r) for s, r in decided if r is not None]
    _insert_referrals(session, bundle_version, referred, now)
    return {
        "scored": len(scored),
        "failed": len(failed),
        "referred": len(referred),
        "high_risk": [s.study_id for s, r in referred if r.category == referral_policy.HIGH_RISK],
        "not_assessable": [s.study_id for s, r in referred if r.category == referral_policy.NOT_ASSESSABLE],
    }


def record_shadow(session: Session, bundle_version: str, threshold: float, scored: Sequence[ScoredStudy]) -> int:
    """A shadow bundle's predictions for the same studies, in the caller's transaction: stored
    with their bundle version and ``shadow``; no status, referral, result or delivery follows."""
    _insert_predictions(session, bundle_version, threshold, scored, utcnow(), shadow=True)
    return len(scored)


def _insert_predictions(
    session: Session, bundle_version: str, threshold: float, scored, now, shadow: bool = False
) -> None:
    rows = [
        {
            "study_id": s.study_id,
            "bundle_version": bundle_version,
            "probability": float(s.probability),
            "threshold": float(threshold),
            "spread": None if s.spread is None else float(s.spread),
            "assessable": bool(s.assessable),
            "not_assessable_reason": None if s.assessable else (s.reason or "not assessable")[:120],
            "feature_distance": None if s.distance is None else float(s.distance),
            "shadow": shadow,
            "image_stats": s.stats,
            "created_at": now,
        }
        for s in scored
    ]
    insert_ignoring_conflicts(session, Prediction.__table__, rows, ["study_id", "bundle_version"])


def _set_statuses(session: Session, done_ids: list[int], failed: Sequence[tuple[int, str]], now) -> None:
    if done_ids:
        session.execute(
            update(Study).where(Study.id.in_(done_ids)).values(status=StudyStatus.DONE, finished_at=now, error=None)
        )
    for study_id, reason in failed:
        session.execute(
            update(Study)
            .where(Study.id == study_id, Study.status != StudyStatus.DONE)
            .values(status=StudyStatus.FAILED, finished_at=now, error=reason[:2000])
        )


def _insert_referrals(session: Session, bundle_version: str, referred, now) -> None:
    """One referral per referred study (a redelivered batch adds none), tied to its prediction."""
    if not referred:
        return
    predictions = dict(
        session.execute(
            select(Prediction.study_id, Prediction.id).where(
                Prediction.study_id.in_([s.study_id for s, _ in referred]), Prediction.bundle_version == bundle_version
            )
        ).all()
    )
    rows = [
        {
            "study_id": s.study_id, "prediction_id": predictions[s.study_id], "probability": float(s.probability),
            "category": r.category, "tier": r.tier, "status": "open", "created_at": now,
        }
        for s, r in referred
    ]  # fmt: skip
    insert_ignoring_conflicts(session, Referral.__table__, rows, ["study_id"])


def finished_batches(session: Session, batch_ids: Sequence[str]) -> list[str]:
    """Of ``batch_ids``, those with no study left queued or processing, not yet marked complete;
    marks them complete (so a completion callback is sent once)."""
    done = []
    for batch_id in set(b for b in batch_ids if b):
        pending = session.scalar(
            select(func.count())
            .select_from(Study)
            .where(Study.batch_id == batch_id, Study.status.in_([StudyStatus.QUEUED, StudyStatus.PROCESSING]))
        )
        if pending == 0:
            changed = session.execute(
                update(Batch).where(Batch.id == batch_id, Batch.completed_at.is_(None)).values(completed_at=utcnow())
            ).rowcount
            if changed:
                done.append(batch_id)
    return done
