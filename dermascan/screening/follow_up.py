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


def _visit_key(study) -> tuple:
    return (study.acquired_at or study.created_at, study.id)


def previous_visits(session: Session, studies: Sequence[Study], failing: Sequence[int] = ()) -> dict[int, int]:
    """{study id: the id of the visit of the same lesion just before it in time} for many
    studies, in one query: every visit of their lesions that did not fail (a lesion has a
    handful; ``failing``: visits failing in the same write), ordered by when it was imaged (else
    received), then by id."""
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
        if row.id not in failing:
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


def comparison(new, earlier, change) -> dict:
    """The comparison of a visit's prediction ``new`` with the previous visit's ``earlier`` (each
    with ``study_id``, ``probability``, ``threshold``, ``assessable``, ``embedding`` and
    ``bundle_version``: a Prediction or the values about to be written), as the prediction's
    columns: the visit compared with, the change in probability, newly high risk and — where the
    bundle's change measure applies to both — the change measure, its percentile and changed."""
    out = {"previous_study_id": earlier.study_id, "probability_change": None, "newly_high_risk": None,
           "change_measure": None, "change_percentile": None, "changed": None}  # fmt: skip
    referred = new.assessable and new.probability >= new.threshold
    if new.assessable and earlier.assessable:
        out["probability_change"] = round(float(new.probability - earlier.probability), 6)
        out["newly_high_risk"] = bool(referred and earlier.probability < earlier.threshold)
    comparable = (
        change is not None
        and new.embedding is not None
        and earlier.embedding is not None
        and earlier.bundle_version == new.bundle_version
        and len(earlier.embedding) == len(new.embedding)
    )
    if comparable and new.assessable and earlier.assessable:
        measure = change.measure(earlier.embedding, new.embedding)
        out["change_measure"] = round(measure, 4)
        out["change_percentile"] = round(change.percentile(measure), 4)
        out["changed"] = bool(change.changed(measure))
    return out


def _compare(prediction: Prediction, earlier, change) -> tuple[bool | None, bool | None]:
    """Fill ``prediction``'s comparison with the earlier visit's; (newly high risk, changed)."""
    for name, value in comparison(prediction, earlier, change).items():
        setattr(prediction, name, value)
    return prediction.newly_high_risk, prediction.changed


def lock_lesions(session: Session, study_ids: Sequence[int]) -> None:
    """Lock the lesions these studies name, in id order, in one statement. A result write takes
    these locks first, before it locks its studies: two workers writing visits of the same lesions
    take turns there, and never hold a study the other needs (a visit's ``previous_study_id``
    points at a study another worker may be writing)."""
    if study_ids:
        named = select(Study.lesion_id).where(Study.id.in_(list(study_ids)), Study.lesion_id.is_not(None))
        session.execute(select(Lesion.id).where(Lesion.id.in_(named)).order_by(Lesion.id).with_for_update()).all()


def current_predictions(session: Session, study_ids: Sequence[int]) -> dict[int, object]:
    """The current prediction (:func:`current_prediction`) of each of these studies, in one query
    (those without one absent), as rows of the values a comparison reads — no ORM objects, for the
    result write's hot path."""
    if not study_ids:
        return {}
    rows = session.execute(
        select(Prediction.study_id, Prediction.probability, Prediction.threshold, Prediction.assessable,
               Prediction.embedding, Prediction.bundle_version)
        .where(Prediction.study_id.in_(sorted(set(study_ids))), Prediction.shadow.is_(False))
        .order_by(Prediction.study_id, Prediction.created_at.desc(), Prediction.id.desc())
    )  # fmt: skip
    out: dict[int, object] = {}
    for row in rows:
        out.setdefault(row.study_id, row)
    return out


def compare_new_visits(
    session: Session, visits: Sequence, new: dict, change=None, failing: Sequence[int] = ()
) -> dict[int, dict]:
    """The just-scored visits of lesions (rows with ``id``, ``lesion_id``, ``acquired_at``,
    ``created_at``), each against its previous visit, before their predictions are written →
    {study id: the comparison columns of :func:`comparison`}. ``new``: {study id: the values
    about to be written} — a previous visit scored in the same write is compared with them; a
    visit whose previous visit has no prediction yet gets only ``previous_study_id`` (it is
    compared when that one is scored, :func:`compare_later_visits`). ``failing``: studies of the
    same write that failed (never a previous visit)."""
    named = [v for v in visits if v.lesion_id is not None and v.id in new]
    if not named:
        return {}
    earlier = previous_visits(session, named, set(failing))  # two queries for the whole piece
    before_of = current_predictions(session, [e for e in earlier.values() if e not in new])
    out: dict[int, dict] = {}
    for study_id, previous in earlier.items():
        before = new.get(previous) or before_of.get(previous)
        out[study_id] = {"previous_study_id": previous} if before is None else comparison(new[study_id], before, change)
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
