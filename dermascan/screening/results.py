"""Writing screening results: claiming studies for scoring under a lease, then predictions,
statuses and referrals in one transaction — idempotently, so a redelivered message or a second
worker never writes a second prediction for the same study and bundle version, and only for the
studies the writing worker still holds (a worker that stalled past its lease writes nothing over
the one that took over)."""

from __future__ import annotations

import datetime as dt
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace

from sqlalchemy import ARRAY, Integer, and_, any_, bindparam, column, false, func, literal, or_, select, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session

from dermascan.infra.db import insert_ignoring_conflicts
from dermascan.infra.schema import (
    Batch,
    Prediction,
    Priority,
    ProgramThreshold,
    Referral,
    ReferralStatus,
    Study,
    StudyStatus,
    utcnow,
)
from dermascan.screening import follow_up, referral_policy


@dataclass
class ScoredStudy:
    study_id: int
    probability: float
    spread: float | None = None
    assessable: bool = True
    reason: str | None = None  # why the image could not be assessed
    distance: float | None = None  # the gate's feature distance
    stats: dict | None = None  # image statistics for monitoring (brightness, contrast, sharpness, size)
    embedding: list[float] | None = None  # for the lesion change measure, when the bundle has one
    missing_fields: list[str] | None = None  # the metadata fields the score was made without
    differential: list[float] | None = None  # a probability per diagnosis (model.inference.diagnosis.CODES)

    @classmethod
    def of(cls, study_id: int, score) -> ScoredStudy:
        """From the model's Score of the study (``model.inference.predictor.Score``)."""
        return cls(study_id, score.probability, score.spread, score.assessable, score.reason, score.distance,
                   score.stats, score.embedding, score.missing_fields, score.differential)  # fmt: skip


def claim(session: Session, study_ids: Sequence[int], owner: str = "", lease_s: float = 60.0) -> list:
    """The studies of a message that still need scoring, taken under a lease held by ``owner``
    until now + ``lease_s``: queued ones, ones this owner already holds (a retried task), and
    processing ones whose lease ran out (their worker died or stalled). A study another worker
    holds under a live lease, and done or failed ones, are skipped: a redelivery does no harm.

    One statement (``UPDATE … WHERE id IN (SELECT … FOR UPDATE SKIP LOCKED) RETURNING``, the
    queue pattern of PostgreSQL); rows of what scoring reads (``id``, ``image_sha256``, ``meta``,
    ``batch_id``, ``created_at``, ``priority``), in id order."""
    now = utcnow()
    claimable = (
        select(Study.id)
        .where(
            Study.id.in_(list(study_ids)),
            or_(
                Study.status == StudyStatus.QUEUED,
                and_(
                    Study.status == StudyStatus.PROCESSING,
                    or_(Study.lease_until.is_(None), Study.lease_until < now, Study.lease_owner == owner),
                ),
            ),
        )
        .order_by(Study.id)
        .with_for_update(skip_locked=True)
    )
    rows = session.execute(
        update(Study)
        .where(Study.id.in_(claimable.scalar_subquery()))
        .values(
            status=StudyStatus.PROCESSING, started_at=now, attempts=Study.attempts + 1,
            lease_owner=owner or None, lease_until=now + dt.timedelta(seconds=lease_s),
        )
        .returning(Study.id, Study.image_sha256, Study.meta, Study.batch_id, Study.created_at, Study.priority)
        .execution_options(synchronize_session=False)
    ).all()  # fmt: skip
    return sorted(rows, key=lambda row: row.id)


def renew_leases(session: Session, owner: str, lease_s: float, study_ids: Sequence[int]) -> int:
    """The heartbeat: extend the leases ``owner`` holds on ``study_ids`` (the studies its running
    tasks are scoring), in id order."""
    return session.execute(
        update(Study)
        .where(Study.id.in_(sorted(study_ids)), Study.lease_owner == owner, Study.status == StudyStatus.PROCESSING)
        .values(lease_until=utcnow() + dt.timedelta(seconds=lease_s))
    ).rowcount


def release(session: Session, study_ids: Sequence[int], owner: str) -> int:
    """Give back the leases ``owner`` still holds on ``study_ids`` (a task that ends without writing
    them): the studies are queued again, for the task's retry or, should its message be lost, the
    sweeper."""
    return session.execute(
        update(Study)
        .where(Study.id.in_(sorted(study_ids)), Study.lease_owner == owner, Study.status == StudyStatus.PROCESSING)
        .values(status=StudyStatus.QUEUED, started_at=None, lease_owner=None, lease_until=None)
    ).rowcount


def gather_interactive(
    session: Session, exclude: Sequence[int], limit: int, owner: str = "", lease_s: float = 60.0
) -> list[int]:
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
        now = utcnow()
        session.execute(
            update(Study)
            .where(Study.id.in_(ids), Study.status == StudyStatus.QUEUED)
            .values(
                status=StudyStatus.PROCESSING, started_at=now, attempts=Study.attempts + 1,
                lease_owner=owner or None, lease_until=now + dt.timedelta(seconds=lease_s),
            )
        )  # fmt: skip
    return ids


def _studies_to_write(session: Session, bundle_version: str, study_ids: Sequence[int], owner: str | None) -> dict:
    """{study id: (its visit: id, lesion_id, acquired_at, created_at; its program's own threshold
    for this bundle or None)} of the studies a write may write, locked in id order (with an
    ``owner``: only those it still holds) — one query for the lease check, the program
    thresholds and the follow-up."""
    if not study_ids:
        return {}
    query = (
        select(Study.id, Study.lesion_id, Study.acquired_at, Study.created_at, ProgramThreshold.threshold)
        .outerjoin(
            ProgramThreshold,
            and_(ProgramThreshold.program_id == Study.program_id, ProgramThreshold.bundle_version == bundle_version),
        )
        .where(Study.id.in_(sorted(set(study_ids))))
        .order_by(Study.id)
    )
    if owner is not None:
        query = query.where(Study.lease_owner == owner, Study.status == StudyStatus.PROCESSING)
        query = query.with_for_update(of=Study)
    return {row.id: row for row in session.execute(query)}


def record(
    session: Session,
    bundle_version: str,
    threshold: float,
    scored: Sequence[ScoredStudy],
    failed: Sequence[tuple[int, str]] = (),
    owner: str | None = None,
    change=None,
) -> dict:
    """Write one batch's results in the caller's transaction: predictions (duplicates ignored),
    statuses, and the referrals the referral policy decides (high risk at or above ``threshold``;
    every not-assessable image, to be checked by a person; with lesion follow-up, the comparison
    with each lesion's previous visit — ``change``: the bundle's change measure,
    ``model.inference.change``, or None). The returned ``high_risk`` lists the study ids referred
    for their probability (they get heat maps).

    What is written is decided first — two or three reads: the lesions' and the studies' locks
    with the lease check and the programs' thresholds, and, for visits of a lesion, their previous
    visits — and then written on PostgreSQL in **one statement** (predictions, statuses and
    referrals; :func:`_write_postgresql`)."""
    now = utcnow()
    failed = list(failed)
    # row locks in one order: the lesions of the visits first (by id), then the studies (by id)
    follow_up.lock_lesions(session, [s.study_id for s in scored])
    studies = _studies_to_write(session, bundle_version, [s.study_id for s in scored] + [f[0] for f in failed], owner)
    lost: list[int] = []
    if owner is not None:  # results are written only for the studies this worker still holds
        lost = sorted(({s.study_id for s in scored} | {f[0] for f in failed}) - set(studies))
        scored = [s for s in scored if s.study_id in studies]
        failed = [f for f in failed if f[0] in studies]
    # a program with a threshold of its own for this bundle (set from its local validation) is
    # referred by it; every other study by the bundle's
    thresholds = {
        s.study_id: threshold if s.study_id not in studies or studies[s.study_id].threshold is None
        else studies[s.study_id].threshold
        for s in scored
    }  # fmt: skip
    new = {s.study_id: _values(s, bundle_version, thresholds[s.study_id]) for s in scored}
    visits = [studies[s.study_id] for s in scored if s.study_id in studies]
    followed = any(v.lesion_id is not None for v in visits)
    compared = follow_up.compare_new_visits(session, visits, new, change, [f[0] for f in failed]) if followed else {}
    decided = [
        (s, referral_policy.decide(s.probability, thresholds[s.study_id], s.assessable,
                                   compared.get(s.study_id, {}).get("newly_high_risk"),
                                   compared.get(s.study_id, {}).get("changed")))
        for s in scored
    ]  # fmt: skip
    referred = [(s, r) for s, r in decided if r is not None]
    rows = _prediction_rows(bundle_version, thresholds, scored, now, compared=compared)
    if session.get_bind().dialect.name == "postgresql":
        _write_postgresql(session, bundle_version, rows, failed, referred, now)
    else:
        insert_ignoring_conflicts(session, Prediction.__table__, rows, ["study_id", "bundle_version"])
        _set_statuses(session, [s.study_id for s in scored], failed, now)
        _insert_referrals(session, bundle_version, referred, now)
    later = {}
    if followed:  # visits scored earlier that waited for one of these (their previous visit)
        later = follow_up.compare_later_visits(session, bundle_version, [s.study_id for s in scored], change)
        _refer_later_visits(session, bundle_version, later, now)
    return {
        "scored": len(scored),
        "failed": len(failed),
        "referred": len(referred),
        "high_risk": _heatmaps_wanted(session, referred, later, compared),
        "not_assessable": [s.study_id for s, r in referred if r.category == referral_policy.NOT_ASSESSABLE],
        "lost_lease": lost,
        "scored_ids": [s.study_id for s in scored],
    }


def _values(scored: ScoredStudy, bundle_version: str, threshold: float) -> SimpleNamespace:
    """What a comparison with another visit reads of a prediction about to be written."""
    return SimpleNamespace(
        study_id=scored.study_id, probability=float(scored.probability), threshold=float(threshold),
        assessable=bool(scored.assessable), embedding=scored.embedding, bundle_version=bundle_version,
    )  # fmt: skip


def record_shadow(session: Session, bundle_version: str, threshold: float, scored: Sequence[ScoredStudy]) -> int:
    """A shadow bundle's predictions for the same studies, in the caller's transaction: stored
    with their bundle version and ``shadow``; no status, referral, result or delivery follows."""
    _insert_predictions(session, bundle_version, {s.study_id: threshold for s in scored}, scored, utcnow(), shadow=True)
    return len(scored)


def _insert_predictions(
    session: Session, bundle_version: str, thresholds: dict[int, float], scored, now, shadow: bool = False
) -> None:
    rows = _prediction_rows(bundle_version, thresholds, scored, now, shadow)
    insert_ignoring_conflicts(session, Prediction.__table__, rows, ["study_id", "bundle_version"])


COMPARED = ("previous_study_id", "probability_change", "newly_high_risk", "change_measure", "change_percentile",
            "changed")  # fmt: skip


def _finite(value) -> float | None:
    """A float column's value: None for none, and for a value that is not a finite number."""
    return None if value is None or not math.isfinite(value) else float(value)


def _prediction_rows(bundle_version: str, thresholds: dict[int, float], scored, now, shadow: bool = False,
                     compared: dict | None = None) -> list[dict]:  # fmt: skip
    """The predictions' rows, every row with the same keys (``compared``: {study id: the
    comparison with the previous visit}, :func:`follow_up.compare_new_visits`)."""
    compared = compared or {}
    return [
        {
            "study_id": s.study_id,
            "bundle_version": bundle_version,
            "probability": float(s.probability),
            "threshold": float(thresholds[s.study_id]),
            "spread": _finite(s.spread),
            "assessable": bool(s.assessable),
            "not_assessable_reason": None if s.assessable else (s.reason or "not assessable")[:120],
            "feature_distance": _finite(s.distance),
            "shadow": shadow,
            "image_stats": s.stats,
            "embedding": s.embedding,
            "missing_fields": s.missing_fields,
            "differential": s.differential,
            "created_at": now,
            **{name: compared.get(s.study_id, {}).get(name) for name in COMPARED},
        }
        for s in scored
    ]


def _set_statuses(session: Session, done_ids: list[int], failed: Sequence[tuple[int, str]], now) -> None:
    if done_ids:
        session.execute(
            update(Study)
            .where(Study.id.in_(done_ids))
            .values(status=StudyStatus.DONE, finished_at=now, error=None, lease_owner=None, lease_until=None)
        )
    for study_id, reason in failed:
        session.execute(
            update(Study)
            .where(Study.id == study_id, Study.status != StudyStatus.DONE)
            .values(status=StudyStatus.FAILED, finished_at=now, error=reason[:2000], lease_owner=None, lease_until=None)
        )


def suspected_code(differential) -> str | None:
    """The most likely class of a differential (a probability per class, in the model's order)."""
    if not differential:
        return None
    from model.inference.diagnosis import CODES

    return CODES[max(range(len(differential)), key=lambda i: differential[i])]


def _referral_rows(referred, now) -> list[dict]:
    """One row per referred study (its prediction's id is added where it is written)."""
    return [
        {
            "study_id": s.study_id, "probability": float(s.probability), "category": r.category, "tier": r.tier,
            "status": "open", "created_at": now, "suspected": suspected_code(s.differential) if s.assessable else None,
        }
        for s, r in referred
    ]  # fmt: skip


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
    rows = [{**row, "prediction_id": predictions[row["study_id"]]} for row in _referral_rows(referred, now)]
    insert_ignoring_conflicts(session, Referral.__table__, rows, ["study_id"])


def _recordset(name: str, table, columns: Sequence[str], extra: dict | None = None):
    """A JSON array bound as ``name``, read back as rows of ``table``'s ``columns`` (their types)
    — PostgreSQL's ``jsonb_to_recordset``: a piece's rows travel as one parameter."""
    typed = [column(c, table.c[c].type) for c in columns] + [column(c, t) for c, t in (extra or {}).items()]
    return (
        func.jsonb_to_recordset(bindparam(name, type_=JSONB)).table_valued(*typed).render_derived(name, with_types=True)
    )


_PREDICTION_IN = ("study_id", "probability", "threshold", "spread", "assessable", "not_assessable_reason",
                  "feature_distance", "image_stats", "embedding", "missing_fields", "differential", *COMPARED)  # fmt: skip
_REFERRAL_IN = ("study_id", "probability", "category", "tier", "suspected")


@functools.cache
def _write_statement():
    """The one statement that writes a piece's results on PostgreSQL: its predictions inserted
    (a study already predicted by this bundle keeps its prediction), the scored studies marked
    done and the failed ones failed (unless done), the referrals inserted (one per study, tied to
    the prediction inserted here or the one that was there). Data-modifying CTEs; the rows come
    as three JSON parameters, so the statement is compiled once and cached."""
    predictions, studies, referrals = Prediction.__table__, Study.__table__, Referral.__table__
    given = _recordset("predictions", predictions, _PREDICTION_IN)
    inserted = (
        postgresql.insert(predictions)
        .from_select(
            [*_PREDICTION_IN, "bundle_version", "shadow", "created_at"],
            select(*(given.c[c] for c in _PREDICTION_IN), bindparam("version", type_=predictions.c.bundle_version.type),
                   false(), bindparam("now", type_=predictions.c.created_at.type)),
        )
        .on_conflict_do_nothing(index_elements=["study_id", "bundle_version"])
        .returning(predictions.c.id, predictions.c.study_id)
        .cte("inserted")
    )  # fmt: skip
    done = (
        update(studies)
        .where(studies.c.id == any_(bindparam("done", type_=ARRAY(Integer))))
        .values(status=StudyStatus.DONE, finished_at=bindparam("now"), error=None, lease_owner=None, lease_until=None)
        .returning(studies.c.id)
        .cte("done")
    )
    failing = _recordset("failed", studies, ("id", "error"))
    failed = (
        update(studies)
        .where(studies.c.id == failing.c.id, studies.c.status != StudyStatus.DONE)
        .values(status=StudyStatus.FAILED, finished_at=bindparam("now"), error=failing.c.error, lease_owner=None,
                lease_until=None)
        .returning(studies.c.id)
        .cte("failed")
    )  # fmt: skip
    wanted = _recordset("referrals", referrals, _REFERRAL_IN)
    existing = (
        select(predictions.c.id)
        .where(predictions.c.study_id == wanted.c.study_id, predictions.c.bundle_version == bindparam("version"))
        .scalar_subquery()
    )
    referred = (
        postgresql.insert(referrals)
        .from_select(
            [*_REFERRAL_IN, "prediction_id", "status", "created_at"],
            select(*(wanted.c[c] for c in _REFERRAL_IN), func.coalesce(inserted.c.id, existing),
                   literal(ReferralStatus.OPEN, referrals.c.status.type), bindparam("now"))
            .select_from(wanted.outerjoin(inserted, inserted.c.study_id == wanted.c.study_id)),
        )
        .on_conflict_do_nothing(index_elements=["study_id"])
        .returning(referrals.c.study_id)
        .cte("referred")
    )  # fmt: skip
    # every CTE is named in the outer query, so that each is rendered (PostgreSQL runs them once)
    return select(
        *(select(func.count()).select_from(cte).scalar_subquery() for cte in (inserted, done, failed, referred))
    )


def _write_postgresql(session: Session, bundle_version: str, rows: list[dict], failed, referred, now) -> None:
    """Predictions, statuses and referrals of a piece in one statement (:func:`_write_statement`)."""
    if not rows and not failed:
        return
    session.execute(_write_statement(), {
        "predictions": [{c: row[c] for c in _PREDICTION_IN} for row in rows],
        "version": bundle_version, "now": now, "done": [row["study_id"] for row in rows],
        "failed": [{"id": study_id, "error": reason[:2000]} for study_id, reason in failed],
        "referrals": [{c: row[c] for c in _REFERRAL_IN} for row in _referral_rows(referred, now)],
    })  # fmt: skip


def _heatmaps_wanted(session: Session, referred, later: dict, compared: dict) -> list[int]:
    """The studies that get heat maps: those referred for their probability or their change, and
    — so that a specialist compares like with like — the previous visit of each referred visit of
    a followed lesion (``compared``: the just-written visits' comparisons; ``later``: visits
    scored before their previous visit, compared now)."""
    wanted = [s.study_id for s, r in referred if r.category != referral_policy.NOT_ASSESSABLE]
    wanted += [study_id for study_id, (newly, changed) in later.items() if newly or changed]
    wanted += [compared[s.study_id]["previous_study_id"] for s, _ in referred if s.study_id in compared]
    if later:
        wanted += session.scalars(
            select(Prediction.previous_study_id).where(
                Prediction.study_id.in_(list(later)),
                Prediction.previous_study_id.is_not(None),
                Prediction.shadow.is_(False),
            )
        ).all()
    return list(dict.fromkeys(wanted))


def _refer_later_visits(session: Session, bundle_version: str, later: dict, now) -> None:
    """A later visit compared only now (it was scored before this, its previous visit): referred
    as "changed since last visit" when it was cleared, or raised to "newly high risk" while its
    referral is still open."""
    for study_id, (newly, changed) in later.items():
        prediction = session.scalar(
            select(Prediction).where(Prediction.study_id == study_id, Prediction.bundle_version == bundle_version)
        )
        decision = referral_policy.decide(prediction.probability, prediction.threshold, prediction.assessable, newly, changed)  # fmt: skip
        if decision is None:
            continue
        referral = session.scalar(select(Referral).where(Referral.study_id == study_id))
        if referral is None:
            insert_ignoring_conflicts(session, Referral.__table__, [{
                "study_id": study_id, "prediction_id": prediction.id, "probability": float(prediction.probability),
                "category": decision.category, "tier": decision.tier, "status": "open", "created_at": now,
                "suspected": suspected_code(prediction.differential) if prediction.assessable else None,
            }], ["study_id"])  # fmt: skip
        elif referral.status == "open" and decision.tier < referral.tier:
            referral.category, referral.tier = decision.category, decision.tier


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


def needing_heatmaps(session: Session, study_ids: Sequence[int], bundle_version: str) -> list[tuple[int, str, dict]]:
    """(prediction id, image sha256, metadata) of the studies whose prediction by ``bundle_version``
    has no heat map yet."""
    rows = session.execute(
        select(Prediction.id, Study.image_sha256, Study.meta)
        .join(Prediction, Prediction.study_id == Study.id)
        .where(
            Study.id.in_(list(study_ids)), Prediction.bundle_version == bundle_version,
            Prediction.heatmap_sha256.is_(None),
        )
        .order_by(Study.id)
    ).all()  # fmt: skip
    return [(pid, sha, dict(meta or {})) for pid, sha, meta in rows]


def set_heatmap(session: Session, prediction_id: int, digest: str) -> None:
    """Record a prediction's heat map (a blob's sha256)."""
    session.execute(update(Prediction).where(Prediction.id == prediction_id).values(heatmap_sha256=digest))
