"""Lesion follow-up: each scored visit of a lesion compared with the lesion's previous visit.

A lesion's visits are ordered by when they were imaged (``Study.acquired_at``, else when they
were received), so a visit sent late with an earlier date takes its place in time. When a visit
is recorded, it is compared with the visit before it: the change in probability, "newly high
risk" (referred for its probability now, not at that visit), and — when both were scored by the
same bundle and that bundle has a change measure (``model.inference.change``) — the change measure, its
percentile among unchanged same-lesion pairs, and "changed since last visit". A comparison is
made once, when both visits are scored: a visit scored before its previous one is compared when
that one is (``compare_later_visits``); a visit inserted in between later does not redo the
comparisons already made (the record shows which visit each was compared with).

The lesion's row is locked while its visits are compared, so two workers recording two visits of
the same lesion at once take turns and neither misses the other; the locks are taken in one order
(by lesion id) and first in a write (``screening.results.record``), before any study row.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dermascan.infra.schema import Lesion, Prediction, Referral, Study, StudyStatus


def visit_time():
    return func.coalesce(Study.acquired_at, Study.created_at)


def current_prediction(session: Session, study_id: int) -> Prediction | None:
    """The study's latest prediction that decides (not a shadow bundle's)."""
    return session.scalar(
        select(Prediction)
        .where(Prediction.study_id == study_id, Prediction.shadow.is_(False))
        .order_by(Prediction.created_at.desc(), Prediction.id.desc())
        .limit(1)
    )


def current_predictions(session: Session, study_ids: Sequence[int]) -> dict[int, Prediction]:
    """:func:`current_prediction` of many studies in one query (those without one are absent)."""
    out: dict[int, Prediction] = {}
    if not study_ids:
        return out
    rows = session.scalars(
        select(Prediction)
        .where(Prediction.study_id.in_(sorted(set(study_ids))), Prediction.shadow.is_(False))
        .order_by(Prediction.study_id, Prediction.created_at.desc(), Prediction.id.desc())
    )
    for prediction in rows:
        out.setdefault(prediction.study_id, prediction)
    return out


def _visit_key(study) -> tuple:
    return (study.acquired_at or study.created_at, study.id)


def previous_visits(session: Session, studies: Sequence[Study]) -> dict[int, int]:
    """{study id: the id of the visit of the same lesion just before it in time} for many
    studies, in one query: every visit of their lesions that did not fail (a lesion has a
    handful), ordered by when it was imaged (else received), then by id."""
    lesions = sorted({s.lesion_id for s in studies if s.lesion_id is not None})
    if not lesions:
        return {}
    rows = session.execute(
        select(Study.id, Study.lesion_id, Study.acquired_at, Study.created_at).where(
            Study.lesion_id.in_(lesions), Study.status != StudyStatus.FAILED
        )
    ).all()
    by_lesion: dict[int, list] = {}
    for row in rows:
        by_lesion.setdefault(row.lesion_id, []).append(_visit_key(row))
    out = {}
    for study in studies:
        key = _visit_key(study)
        earlier = [v for v in by_lesion.get(study.lesion_id, ()) if v[1] != study.id and v < key]
        if earlier:
            out[study.id] = max(earlier)[1]
    return out


def previous_visit(session: Session, study: Study) -> Study | None:
    """The visit of the same lesion just before ``study`` in time (failed ones skipped): the one
    rule of :func:`previous_visits`, for one study."""
    earlier = previous_visits(session, [study]).get(study.id)
    return None if earlier is None else session.get(Study, earlier)


def visits(session: Session, lesion_id: int) -> list[tuple[Study, Prediction | None, Referral | None]]:
    """Every visit of a lesion in time order, with its current prediction and its referral."""
    studies = list(session.scalars(select(Study).where(Study.lesion_id == lesion_id).order_by(visit_time(), Study.id)))
    return [(s, current_prediction(session, s.id), s.referral) for s in studies]


def _compare(prediction: Prediction, earlier: Prediction, change) -> tuple[bool | None, bool | None]:
    """Fill ``prediction``'s comparison with the earlier visit's; (newly high risk, changed)."""
    prediction.previous_study_id = earlier.study_id
    referred = prediction.assessable and prediction.probability >= prediction.threshold
    if prediction.assessable and earlier.assessable:
        prediction.probability_change = round(float(prediction.probability - earlier.probability), 6)
        prediction.newly_high_risk = bool(referred and earlier.probability < earlier.threshold)
    else:
        prediction.newly_high_risk = None
    comparable = (
        change is not None
        and prediction.embedding is not None
        and earlier.embedding is not None
        and earlier.bundle_version == prediction.bundle_version
        and len(earlier.embedding) == len(prediction.embedding)
    )
    if comparable and prediction.assessable and earlier.assessable:
        measure = change.measure(earlier.embedding, prediction.embedding)
        prediction.change_measure = round(measure, 4)
        prediction.change_percentile = round(change.percentile(measure), 4)
        prediction.changed = bool(change.changed(measure))
    return prediction.newly_high_risk, prediction.changed


def lock_lesions(session: Session, study_ids: Sequence[int]) -> list[tuple[int, int]]:
    """(study id, lesion id) of the studies that name a lesion; their lesions locked, in id order.
    A result write takes these locks first, before it locks its studies: two workers writing
    visits of the same lesions take turns there, and never hold a study the other needs (a
    visit's ``previous_study_id`` points at a study another worker may be writing)."""
    rows = session.execute(
        select(Study.id, Study.lesion_id).where(Study.id.in_(list(study_ids)), Study.lesion_id.is_not(None))
    ).all()
    if rows:
        list(session.scalars(
            select(Lesion.id).where(Lesion.id.in_(sorted({r[1] for r in rows}))).order_by(Lesion.id).with_for_update()
        ))  # fmt: skip
    return [(r[0], r[1]) for r in rows]


def compare_visits(
    session: Session, bundle_version: str, study_ids: Sequence[int], change=None, locked: Sequence | None = None
) -> dict:
    """Each just-scored study of a lesion against its previous visit, in the caller's
    transaction → {study id: (newly high risk, changed)} for those compared. ``locked``: what
    :func:`lock_lesions` returned for these studies where the caller has taken the locks already."""
    if locked is None:
        named = lock_lesions(session, study_ids)
    else:
        wanted = set(study_ids)
        named = [(s, lesion) for s, lesion in locked if s in wanted]
    out: dict[int, tuple] = {}
    if not named:
        return out
    # a handful of queries for the whole piece, not four per visit
    studies = sorted(session.scalars(select(Study).where(Study.id.in_([sid for sid, _ in named]))), key=_visit_key)
    earlier = previous_visits(session, studies)
    mine = {
        p.study_id: p
        for p in session.scalars(
            select(Prediction).where(
                Prediction.study_id.in_(list(earlier)), Prediction.bundle_version == bundle_version
            )
        )
    }
    before_of = current_predictions(session, list(earlier.values()))
    for study in studies:
        prediction = mine.get(study.id)
        if study.id not in earlier or prediction is None:
            continue
        prediction.previous_study_id = earlier[study.id]
        before = before_of.get(earlier[study.id])
        if before is not None:  # else compared when the earlier visit is scored
            out[study.id] = _compare(prediction, before, change)
    session.flush()
    return out


def compare_later_visits(session: Session, bundle_version: str, study_ids: Sequence[int], change=None) -> dict:
    """Visits scored earlier that were waiting for one of ``study_ids`` (their previous visit) to
    be scored, compared now → {later study id: (newly high risk, changed)}."""
    if not study_ids:
        return {}
    waiting = list(
        session.scalars(
            select(Prediction).where(
                Prediction.previous_study_id.in_(list(study_ids)),
                Prediction.shadow.is_(False),
                Prediction.newly_high_risk.is_(None),
                Prediction.probability_change.is_(None),
                Prediction.change_measure.is_(None),
            )
        )
    )
    out: dict[int, tuple] = {}
    before_of = current_predictions(session, [p.previous_study_id for p in waiting])
    for prediction in waiting:
        before = before_of.get(prediction.previous_study_id)
        if before is not None and before.bundle_version == bundle_version:
            out[prediction.study_id] = _compare(prediction, before, change)
    session.flush()
    return out


def lesion_counts(session: Session, lesion_ids: Sequence[int]) -> dict[int, int]:
    """Visits per lesion."""
    if not lesion_ids:
        return {}
    return dict(
        session.execute(
            select(Study.lesion_id, func.count()).where(Study.lesion_id.in_(list(lesion_ids))).group_by(Study.lesion_id)
        ).all()
    )
