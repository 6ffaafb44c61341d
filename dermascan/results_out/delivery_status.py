"""Reading deliveries: per destination how many objects are pending, retrying, sent and failed; the
recent failures with their reasons; one study's deliveries as the API and the portal show them."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dermascan.infra.schema import Delivery
from dermascan.results_out.delivery import FAILED, RETRYING


def status_counts(session: Session) -> dict[int, dict[str, int]]:
    """Per destination id: how many objects are pending, retrying, sent and failed."""
    out: dict[int, dict[str, int]] = {}
    query = select(Delivery.destination_id, Delivery.status, func.count()).group_by(
        Delivery.destination_id, Delivery.status
    )
    for destination_id, status, count in session.execute(query):
        out.setdefault(destination_id, {})[status] = count
    return out


def recent_failures(session: Session, limit: int = 20) -> list[Delivery]:
    return list(
        session.scalars(
            select(Delivery)
            .where(Delivery.status.in_([FAILED, RETRYING]))
            .order_by(Delivery.updated_at.desc())
            .limit(limit)
        )
    )


def deliveries(session: Session, study_id: int) -> list[dict]:
    """A study's deliveries as the API and the portal show them."""
    rows = session.scalars(select(Delivery).where(Delivery.study_id == study_id).order_by(Delivery.id))
    return [
        {
            "destination": d.destination.name,
            "target": d.destination.target,
            "object": d.object,
            "status": d.status,
            "attempts": d.attempts,
            "detail": d.detail,
            "sop_instance_uid": d.sop_instance_uid,
            "updated_at": d.updated_at.isoformat() if d.updated_at else None,
        }
        for d in rows
    ]
