"""Batch status counts and result tables, shared by the CLI, the portal and the REST API."""

from __future__ import annotations

import csv
import io
import json

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dermascan.schema import Batch, Prediction, Referral, Study, StudyStatus

RESULT_COLUMNS = [
    "study_id",
    "external_id",
    "status",
    "probability",
    "threshold",
    "referred",
    "spread",
    "bundle_version",
    "error",
    "age_approx",
    "sex",
    "anatom_site_general",
    "sop_instance_uid",
    "created_at",
    "finished_at",
]


def status_counts(session: Session, batch_id: str) -> dict:
    counts = {s.value: 0 for s in StudyStatus}
    for status, n in session.execute(
        select(Study.status, func.count()).where(Study.batch_id == batch_id).group_by(Study.status)
    ):
        counts[StudyStatus(status).value] = n
    counts["total"] = sum(counts[s.value] for s in StudyStatus)
    counts["referred"] = session.scalar(
        select(func.count())
        .select_from(Referral)
        .join(Study, Study.id == Referral.study_id)
        .where(Study.batch_id == batch_id)
    )
    return counts


def batch_summary(session: Session, batch: Batch) -> dict:
    counts = status_counts(session, batch.id)
    finished = counts["done"] + counts["failed"]
    return {
        "batch_id": batch.id,
        "label": batch.label,
        "source": batch.source,
        "created_at": batch.created_at.isoformat() if batch.created_at else None,
        "completed_at": batch.completed_at.isoformat() if batch.completed_at else None,
        "state": "complete"
        if counts["total"] and finished == counts["total"]
        else ("empty" if not counts["total"] else "running"),
        "counts": counts,
        "rejected_records": batch.rejected,
        "progress": round(finished / counts["total"], 4) if counts["total"] else 1.0,
    }


def latest_predictions(session: Session, study_ids) -> dict[int, Prediction]:
    """The newest prediction per study."""
    out: dict[int, Prediction] = {}
    for p in session.scalars(
        select(Prediction).where(Prediction.study_id.in_(list(study_ids))).order_by(Prediction.created_at)
    ):
        out[p.study_id] = p
    return out


def result_rows(session: Session, batch_id: str, offset: int = 0, limit: int | None = None) -> list[dict]:
    query = select(Study).where(Study.batch_id == batch_id).order_by(Study.id).offset(offset)
    if limit is not None:
        query = query.limit(limit)
    studies = list(session.scalars(query))
    preds = latest_predictions(session, [s.id for s in studies])
    referred = set(session.scalars(select(Referral.study_id).where(Referral.study_id.in_([s.id for s in studies]))))
    return [study_row(s, preds.get(s.id), s.id in referred) for s in studies]


def study_row(study: Study, prediction: Prediction | None, referred: bool) -> dict:
    meta = study.meta or {}
    return {
        "study_id": study.id,
        "external_id": study.external_id,
        "status": StudyStatus(study.status).value,
        "probability": None if prediction is None else round(prediction.probability, 6),
        "threshold": None if prediction is None else round(prediction.threshold, 6),
        "referred": referred if prediction is not None else None,
        "spread": None if prediction is None or prediction.spread is None else round(prediction.spread, 6),
        "bundle_version": None if prediction is None else prediction.bundle_version,
        "error": study.error,
        "age_approx": meta.get("age_approx"),
        "sex": meta.get("sex"),
        "anatom_site_general": meta.get("anatom_site_general"),
        "sop_instance_uid": study.sop_instance_uid,
        "created_at": study.created_at.isoformat() if study.created_at else None,
        "finished_at": study.finished_at.isoformat() if study.finished_at else None,
    }


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buffer.getvalue()


def to_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=2)


def probability_histogram(session: Session, batch_id: str, bins: int = 20) -> dict:
    """Counts of the batch's latest probabilities in ``bins`` equal bins, with the threshold used,
    for the batch page's picture."""
    rows = session.execute(
        select(Prediction.probability, Prediction.threshold)
        .join(Study, Study.id == Prediction.study_id)
        .where(Study.batch_id == batch_id)
    ).all()
    counts = [0] * bins
    for probability, _ in rows:
        counts[min(int(probability * bins), bins - 1)] += 1
    thresholds = sorted({round(t, 4) for _, t in rows})
    return {"counts": counts, "max": max(counts) if rows else 0, "n": len(rows), "thresholds": thresholds}
