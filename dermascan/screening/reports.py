"""Batch status counts and result tables, shared by the CLI, the portal and the REST API."""

from __future__ import annotations

import csv
import io

from sqlalchemy import false, func, select
from sqlalchemy.orm import Session

from dermascan.infra.schema import (
    Batch,
    ModelBundle,
    Outcome,
    Prediction,
    Program,
    Referral,
    Study,
    StudyStatus,
    iso_utc,
)  # fmt: skip
from dermascan.screening import follow_up, referral_policy
from dermascan.security import csv_cells
from model.inference.calibration import at_prevalence

RESULT_COLUMNS = [
    "study_id",
    "external_id",
    "status",
    "assessable",
    "not_assessable_reason",
    "probability",
    "probability_at_program_prevalence",
    "threshold",
    "referred",
    "referral_category",
    "spread",
    "bundle_version",
    "error",
    "age_approx",
    "sex",
    "anatom_site_general",
    "sop_instance_uid",
    "lesion_id",
    "dermascan_lesion_id",
    "acquired_at",
    "previous_study_id",
    "probability_change",
    "change_measure",
    "change_percentile",
    "changed_since_last_visit",
    "newly_high_risk",
    "referral_reason",
    "missing_fields",
    "suspected_diagnosis",
    "suspected_diagnosis_probability",
    "decision",
    "decided_at",
    "specialist_diagnosis",
    "decision_amendments",
    "decision_amendment_reason",
    "created_at",
    "finished_at",
]
# the referral categories that send a study to the specialists for its risk (not for its image)
REFERRED = (referral_policy.NEWLY_HIGH_RISK, referral_policy.HIGH_RISK, referral_policy.CHANGED)


def status_counts(session: Session, batch_id: str) -> dict:
    counts = {s.value: 0 for s in StudyStatus}
    for status, n in session.execute(
        select(Study.status, func.count()).where(Study.batch_id == batch_id).group_by(Study.status)
    ):
        counts[StudyStatus(status).value] = n
    counts["total"] = sum(counts[s.value] for s in StudyStatus)
    counts.update(referral_counts(session, batch_id))
    return counts


def referral_counts(session: Session, batch_id: str) -> dict:
    """Studies of a batch referred for their probability, and those the gate could not assess."""
    by_category = dict(
        session.execute(
            select(Referral.category, func.count())
            .join(Study, Study.id == Referral.study_id)
            .where(Study.batch_id == batch_id)
            .group_by(Referral.category)
        ).all()
    )
    return {
        "referred": sum(by_category.get(c, 0) for c in referral_policy.BY_PROBABILITY),
        "newly_high_risk": by_category.get(referral_policy.NEWLY_HIGH_RISK, 0),
        "changed_since_last_visit": by_category.get(referral_policy.CHANGED, 0),
        "not_assessable": by_category.get(referral_policy.NOT_ASSESSABLE, 0),
    }


def batch_summary(session: Session, batch: Batch) -> dict:
    counts = status_counts(session, batch.id)
    finished = counts["done"] + counts["failed"]
    return {
        "batch_id": batch.id,
        "label": batch.label,
        "source": batch.source,
        "created_at": iso_utc(batch.created_at),
        "completed_at": iso_utc(batch.completed_at),
        "state": "complete"
        if counts["total"] and finished == counts["total"]
        else ("empty" if not counts["total"] else "running"),
        "counts": counts,
        "rejected_records": batch.rejected,
        "progress": round(finished / counts["total"], 4) if counts["total"] else 1.0,
    }


def latest_predictions(session: Session, study_ids) -> dict[int, Prediction]:
    """The newest deciding prediction per study (shadow bundles' predictions decide nothing and
    are never a study's result)."""
    out: dict[int, Prediction] = {}
    for p in session.scalars(
        select(Prediction)
        .where(Prediction.study_id.in_(list(study_ids)), Prediction.shadow.is_(False))
        .order_by(Prediction.created_at, Prediction.id)
    ):
        out[p.study_id] = p
    return out


def result_rows(
    session: Session, batch_id: str, offset: int = 0, limit: int | None = None, after_id: int | None = None
) -> list[dict]:
    """A batch's result rows in study order: a page by offset, or (``after_id``, keyset) the
    rows after a study — what a streamed export reads, a page at a time."""
    query = select(Study).where(Study.batch_id == batch_id).order_by(Study.id)
    query = query.where(Study.id > after_id) if after_id is not None else query.offset(offset)
    if limit is not None:
        query = query.limit(limit)
    studies = list(session.scalars(query))
    preds = latest_predictions(session, [s.id for s in studies])
    referrals = referrals_of(session, [s.id for s in studies])
    prevalence = Prevalence(session)
    return [
        study_row(s, preds.get(s.id), getattr(referrals.get(s.id), "category", None), prevalence.get(s, preds.get(s.id)),
                  referrals.get(s.id))
        for s in studies
    ]  # fmt: skip


def study_result(session: Session, study: Study) -> dict:
    """One study's result row (as in a batch's results); for a study of a followed lesion, with
    the lesion's earlier visits (in time order)."""
    prediction = latest_predictions(session, [study.id]).get(study.id)
    referral = referrals_of(session, [study.id]).get(study.id)
    category = None if referral is None else referral.category
    row = study_row(study, prediction, category, Prevalence(session).get(study, prediction), referral)
    if study.lesion_id is not None:
        history = lesion_history(session, study.lesion_id)
        position = next(i for i, visit in enumerate(history) if visit["study_id"] == study.id)
        row["earlier_visits"] = history[:position]
        row["later_visits"] = len(history) - position - 1
    return row


def follow_up_fields(prediction: Prediction | None) -> dict:
    """A visit's comparison with the lesion's previous visit (all None without a prediction)."""
    return {
        "previous_study_id": None if prediction is None else prediction.previous_study_id,
        "probability_change": None if prediction is None else prediction.probability_change,
        "change_measure": None if prediction is None else prediction.change_measure,
        "change_percentile": None if prediction is None else prediction.change_percentile,
        "changed_since_last_visit": None if prediction is None else prediction.changed,
        "newly_high_risk": None if prediction is None else prediction.newly_high_risk,
    }


def visit_row(study: Study, prediction: Prediction | None, referral) -> dict:
    """One visit of a lesion's history."""
    assessable = None if prediction is None else bool(prediction.assessable)
    return {
        "study_id": study.id,
        "external_id": study.external_id,
        "visit_at": iso_utc(study.acquired_at or study.created_at),
        "acquired_at": iso_utc(study.acquired_at),
        "received_at": iso_utc(study.created_at),
        "status": StudyStatus(study.status).value,
        "probability": round(prediction.probability, 6) if assessable else None,
        "assessable": assessable,
        "not_assessable_reason": None if prediction is None else prediction.not_assessable_reason,
        "referred": None
        if referral is None and not assessable
        else (referral is not None and referral.category in REFERRED),
        "referral_category": None if referral is None else referral.category,
        "decision": None if referral is None or referral.decision is None else referral.decision.value,
        "outcome": None,
        **follow_up_fields(prediction),
        "bundle_version": None if prediction is None else prediction.bundle_version,
        "has_heatmap": bool(prediction is not None and prediction.heatmap_sha256),
    }


def lesion_history(session: Session, lesion_id: int) -> list[dict]:
    """Every visit of a lesion in time order, with its outcome when one is recorded."""
    visits = follow_up.visits(session, lesion_id)
    ids = [s.id for s, _, _ in visits]
    outcomes = {o.study_id: o for o in session.scalars(select(Outcome).where(Outcome.study_id.in_(ids)))}
    rows = []
    for study, prediction, referral in visits:
        row = visit_row(study, prediction, referral)
        outcome = outcomes.get(study.id)
        row["outcome"] = None if outcome is None else outcome.kind.value
        rows.append(row)
    return rows


def referrals_of(session: Session, study_ids) -> dict[int, Referral]:
    """The studies' referrals, by study id."""
    return {r.study_id: r for r in session.scalars(select(Referral).where(Referral.study_id.in_(list(study_ids))))}


def decision_fields(referral: Referral | None) -> dict:
    """The specialist's decision on a referred study, as a result carries it back to the sender
    (the decision, its label, when; the note stays in DermaScan)."""
    from dermascan.infra.schema import DECISION_LABELS, Decision

    decided = referral is not None and referral.decision is not None
    return {
        "referral_id": None if referral is None else referral.id,  # the case, in the specialists' queue
        "decision": Decision(referral.decision).value if decided else None,
        "decision_label": DECISION_LABELS[Decision(referral.decision)] if decided else None,
        "decided_at": iso_utc(referral.decided_at) if decided else None,
        # the specialist's own diagnosis, in the differential's codes (or "other")
        "specialist_diagnosis": referral.specialist_diagnosis if decided else None,
        # an amended decision: how many times, and the last amendment's reason (the decision and
        # decided_at above are the amended ones)
        "decision_amendments": len(referral.amendments) if decided else 0,
        "decision_amendment_reason": referral.amendments[-1].reason if decided and referral.amendments else None,
    }


def referral_categories(session: Session, study_ids) -> dict[int, str]:
    query = select(Referral.study_id, Referral.category).where(Referral.study_id.in_(list(study_ids)))
    return {study_id: category for study_id, category in session.execute(query)}


class Prevalence:
    """(the bundle's calibration prevalence, the program's expected prevalence) for a study's
    prediction, when the program has set one; looked up once per program and bundle."""

    def __init__(self, session: Session):
        self.session = session
        self.programs: dict[int, float | None] = {}
        self.bundles: dict[str, float | None] = {}

    def get(self, study: Study, prediction: Prediction | None) -> tuple[float, float] | None:
        if prediction is None:
            return None
        if study.program_id not in self.programs:
            self.programs[study.program_id] = self.session.scalar(
                select(Program.expected_prevalence).where(Program.id == study.program_id)
            )
        version = prediction.bundle_version
        if version not in self.bundles:
            manifest = self.session.scalar(select(ModelBundle.manifest).where(ModelBundle.version == version)) or {}
            self.bundles[version] = (manifest.get("calibration") or {}).get("prevalence")
        target, source = self.programs[study.program_id], self.bundles[version]
        return (source, target) if source and target else None


def study_row(
    study: Study,
    prediction: Prediction | None,
    referral_category: str | None,
    prevalence: tuple[float, float] | None = None,
    referral: Referral | None = None,
) -> dict:
    """One study's result. A study the gate could not assess has ``assessable`` false with its
    reason, no probability and no referral decision (``referred`` null); it sits in the
    specialists' queue as ``not_assessable``."""
    meta = study.meta or {}
    assessable = None if prediction is None else bool(prediction.assessable)
    probability = round(prediction.probability, 6) if assessable else None
    return {
        "study_id": study.id,
        "external_id": study.external_id,
        "status": StudyStatus(study.status).value,
        "assessable": assessable,
        "not_assessable_reason": None if prediction is None else prediction.not_assessable_reason,
        "probability": probability,
        "probability_at_program_prevalence": round(float(at_prevalence(probability, *prevalence)), 6)
        if probability is not None and prevalence
        else None,
        "threshold": None if prediction is None else round(prediction.threshold, 6),
        "referred": (referral_category in REFERRED) if assessable else None,
        "referral_category": referral_category,
        "referral_reason": referral_policy.CATEGORY_LABELS.get(referral_category) if referral_category else None,
        "spread": None if not assessable or prediction.spread is None else round(prediction.spread, 6),
        "bundle_version": None if prediction is None else prediction.bundle_version,
        # the metadata fields the score was made without, and what that means for it
        "missing_fields": None if prediction is None else list(prediction.missing_fields or []),
        "missing_fields_note": None if prediction is None else missing_note(prediction.missing_fields),
        # the differential diagnosis, most likely first (None for a bundle without it)
        "differential": differential_rows(prediction),
        "error": study.error,
        "age_approx": meta.get("age_approx"),
        "sex": meta.get("sex"),
        "anatom_site_general": meta.get("anatom_site_general"),
        "sop_instance_uid": study.sop_instance_uid,
        "edge_result": study.edge_result,
        # lesion follow-up: the lesion as the sender named it (GET /api/v1/lesions/{that name};
        # a lesion number "#3" with ?patient_id=), DermaScan's own id of it, the visit's date, and
        # the comparison with the lesion's previous visit
        "lesion_id": study.lesion_ref,
        "dermascan_lesion_id": study.lesion_id,
        "acquired_at": iso_utc(study.acquired_at),
        **follow_up_fields(prediction),
        # the specialist's decision, once made
        **decision_fields(referral),
        "created_at": iso_utc(study.created_at),
        "finished_at": iso_utc(study.finished_at),
    }


FIELD_LABELS = {"age_approx": "age", "sex": "sex", "anatom_site_general": "anatomic site"}


def missing_note(fields) -> str | None:
    """What a result made without some metadata fields means, in one sentence (None: all given)."""
    if not fields:
        return None
    names = [FIELD_LABELS.get(f, f) for f in fields]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return (
        f"Scored without {listed}: for {'it' if len(names) == 1 else 'them'} the probability rests on the image "
        "(calibrated on held-out lesions sent without them), not on the patient's details."
    )


def _diagnosis_choices() -> list[tuple[str, str]]:
    from model.inference.diagnosis import CLASSES

    return [(code, label) for code, label, *_ in CLASSES]


# the coded diagnoses a specialist records an outcome with (the differential's seven classes)
DIAGNOSIS_CHOICES = _diagnosis_choices()


def suspected(prediction: Prediction | None) -> dict | None:
    """The most likely diagnosis of a prediction's differential (None without one)."""
    rows = differential_rows(prediction)
    return rows[0] if rows else None


def differential_rows(prediction: Prediction | None) -> list[dict] | None:
    """A prediction's differential as people read it: every class with its label, SNOMED CT code
    and probability, most likely first."""
    if prediction is None or not prediction.differential or not prediction.assessable:
        return None
    from model.inference.diagnosis import as_list

    return as_list(prediction.differential)


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        top = (row.get("differential") or [None])[0]
        flat = {
            **row, "missing_fields": ";".join(row.get("missing_fields") or []),
            "suspected_diagnosis": top and top["diagnosis"], "suspected_diagnosis_probability": top and top["probability"],
        }  # fmt: skip
        writer.writerow({k: csv_cells.safe(v) for k, v in flat.items()})
    return buffer.getvalue()


def probability_histogram(session: Session, batch_id: str, bins: int = 20) -> dict:
    """Counts of the batch's latest probabilities in ``bins`` equal bins — each bin split into the
    studies below their referral threshold and those at or above it, so a bin that straddles the
    threshold shows both — with the thresholds used, for the batch page's picture."""
    rows = session.execute(
        select(Prediction.probability, Prediction.threshold)
        .join(Study, Study.id == Prediction.study_id)
        .where(Study.batch_id == batch_id, Prediction.assessable.is_(True), Prediction.shadow.is_(False))
    ).all()
    below, above = [0] * bins, [0] * bins
    for probability, threshold in rows:
        (above if probability >= threshold else below)[min(int(probability * bins), bins - 1)] += 1
    counts = [a + b for a, b in zip(below, above, strict=True)]
    thresholds = sorted({round(t, 4) for _, t in rows})
    return {"counts": counts, "below": below, "above": above, "max": max(counts) if rows else 0, "n": len(rows),
            "thresholds": thresholds}  # fmt: skip


def program_batches(
    session: Session, program_id: int, *, label: str | None = None, created_after=None, created_before=None,
    page: int = 1, per_page: int = 50,
) -> tuple[int, list[Batch]]:  # fmt: skip
    """A program's batches, newest first, filtered by label and creation time: (total, one page)."""
    query = select(Batch).where(Batch.program_id == program_id)
    if label:  # no stored label holds a NUL (PostgreSQL refuses one as a parameter)
        query = query.where(Batch.label == label if "\x00" not in label else false())
    if created_after is not None:
        query = query.where(Batch.created_at >= created_after)
    if created_before is not None:
        query = query.where(Batch.created_at < created_before)
    total = session.scalar(select(func.count()).select_from(query.subquery()))
    rows = session.scalars(
        query.order_by(Batch.created_at.desc(), Batch.id.desc()).offset((page - 1) * per_page).limit(per_page)
    )
    return total, list(rows)


def listed_batches(
    session: Session, program_id: int | None, search: str | None = None, page: int = 1, per_page: int = 50
) -> tuple[int, list[dict]]:
    """The portal's batch list, newest first: every program's (``program_id`` None) or one's,
    searched by label (case-insensitive, a part of it) → (total, one page of summaries with the
    program's name)."""
    query = select(Batch, Program.name).join(Program, Program.id == Batch.program_id)
    if program_id is not None:
        query = query.where(Batch.program_id == program_id)
    if search and "\x00" not in search:
        query = query.where(func.lower(Batch.label).contains(search.strip().lower()[:100], autoescape=True))
    total = session.scalar(select(func.count()).select_from(query.subquery()))
    rows = session.execute(
        query.order_by(Batch.created_at.desc(), Batch.id.desc()).offset((page - 1) * per_page).limit(per_page)
    ).all()
    return total, [{**batch_summary(session, batch), "program": name} for batch, name in rows]


def studies_in_order(session: Session, study_ids) -> list[Study]:
    """These studies, by id."""
    return list(session.scalars(select(Study).where(Study.id.in_(list(study_ids))).order_by(Study.id)))
