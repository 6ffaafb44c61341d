"""Retention: the images (heat maps, kept DICOM headers) of finished studies are deleted after a configured
period; results, decisions and the audit trail are kept.

A study is eligible when it finished more than ``older_than_days`` ago and nobody still needs its
image: it failed, or was scored and not referred, or its referral has been decided. An open or
claimed referral keeps its image whatever its age. Blobs are content-addressed, so a blob is
deleted only when no study that is still kept points at it (the same image uploaded twice).
The rows are marked first and committed, then the files removed: a crash in between leaves an
unreferenced file, never a row that points at nothing. Run by the sweeper when
``DERMASCAN_RETENTION_DAYS`` is set, and by ``dermascan purge --older-than DAYS``; every run
that deletes something is audited.
"""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from dermascan.infra.schema import Prediction, Referral, ReferralStatus, Study, StudyStatus, utcnow
from dermascan.security import audit

log = logging.getLogger(__name__)
PAGE = 500


def eligible(session: Session, cutoff: dt.datetime, limit: int = PAGE) -> list[int]:
    undecided = select(Referral.study_id).where(Referral.status != ReferralStatus.DECIDED)
    return list(
        session.scalars(
            select(Study.id)
            .where(
                Study.image_purged_at.is_(None),
                Study.finished_at < cutoff,
                or_(
                    Study.status == StudyStatus.FAILED,
                    and_(Study.status == StudyStatus.DONE, Study.id.not_in(undecided)),
                ),
            )
            .order_by(Study.id)
            .limit(limit)
        )
    )


def purge(factory, blobs, older_than_days: float, now: dt.datetime | None = None, by: str = "sweeper") -> dict:
    """Delete the images and heat maps of eligible studies; returns the counts."""
    if older_than_days <= 0:
        raise ValueError("the retention period must be a positive number of days")
    now = now or utcnow()
    cutoff = now - dt.timedelta(days=older_than_days)
    totals = {"studies": 0, "images_deleted": 0, "heatmaps_deleted": 0}
    while True:
        with factory() as session, session.begin():
            ids = eligible(session, cutoff)
            if not ids:
                break
            images = set(session.scalars(select(Study.image_sha256).where(Study.id.in_(ids))))
            # the DICOM header kept (encrypted) for the PACS goes with the image
            images |= set(
                session.scalars(
                    select(Study.dicom_header_sha256).where(Study.id.in_(ids), Study.dicom_header_sha256.is_not(None))
                )
            )
            heatmaps = set(
                session.scalars(
                    select(Prediction.heatmap_sha256).where(
                        Prediction.study_id.in_(ids), Prediction.heatmap_sha256.is_not(None)
                    )
                )
            )
            session.execute(update(Study).where(Study.id.in_(ids)).values(image_purged_at=now))
            kept = Study.image_purged_at.is_(None)
            still_images = set(session.scalars(select(Study.image_sha256).where(kept, Study.image_sha256.in_(images))))
            still_images |= set(
                session.scalars(select(Study.dicom_header_sha256).where(kept, Study.dicom_header_sha256.in_(images)))
            )
            still_maps = set(
                session.scalars(
                    select(Prediction.heatmap_sha256)
                    .join(Study, Study.id == Prediction.study_id)
                    .where(kept, Prediction.heatmap_sha256.in_(heatmaps))
                )
            )
            audit.record(
                session, "retention_purge", object_type="studies", object_id=f"{ids[0]}-{ids[-1]}",
                detail={"studies": len(ids), "older_than_days": older_than_days, "by": by},
            )  # fmt: skip
        # committed: now the files go (a crash here leaves a file nobody points at, never the reverse)
        totals["studies"] += len(ids)
        totals["images_deleted"] += sum(blobs.delete(d) for d in images - still_images)
        totals["heatmaps_deleted"] += sum(blobs.delete(d) for d in heatmaps - still_maps)
    if totals["studies"]:
        log.info(
            "retention: %(studies)d studies, %(images_deleted)d images, %(heatmaps_deleted)d heat maps deleted", totals
        )
    return totals
