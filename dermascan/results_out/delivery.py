"""Delivering a study's objects to one PACS destination and recording the outcome per object.

``deliver`` (the outbound task) builds what is due (``objects``), sends it through the
destination's transport (``transports``) and records each object's status: sent; retrying with
doubling waits (``retry``) while the destination is down; failed with the reason at once when it
refuses (a rejected association, an unknown AE title, a 4xx answer) or after the last attempt.
Every object's SOP Instance UID is derived from the study, so a retry after a lost answer sends
the same instance and the PACS keeps one copy. Destinations, scheduling and status reads are
their own modules beside this one.
"""

from __future__ import annotations

import logging

from sqlalchemy import select

from dermascan.config import Settings
from dermascan.infra.blobs import BlobError, BlobUnavailable
from dermascan.infra.db import session_factory
from dermascan.infra.schema import Delivery, DicomDestination, Study, utcnow
from dermascan.results_out import retry
from dermascan.results_out.objects import KINDS, build_objects
from dermascan.results_out.transports import Refused, Unreachable, transport_for

log = logging.getLogger(__name__)
PENDING, RETRYING, SENT, FAILED = "pending", "retrying", "sent", "failed"


def retry_delay(settings: Settings, attempt: int) -> float:
    return retry.delay(settings.delivery_retry_s, attempt)


def deliver(settings: Settings, study_id: int, destination_id: int, attempt: int) -> str:
    """Send a study's due objects to one destination. Returns "sent", "retry", "failed" or "none"."""
    factory = session_factory(settings.database_url)
    with factory() as session:
        destination = session.get(DicomDestination, destination_id)
        study = session.get(Study, study_id)
        rows = session.scalars(
            select(Delivery).where(
                Delivery.study_id == study_id,
                Delivery.destination_id == destination_id,
                Delivery.status.in_([PENDING, RETRYING]),
            )
        ).all()
        if destination is None or study is None or not rows:
            return "none"
        if not destination.enabled:
            status, detail, objects = FAILED, "destination disabled", {}
        else:
            try:
                objects = build_objects(settings, session, study, {r.object for r in rows})
                status, detail = None, None
            except BlobUnavailable as exc:
                status, detail, objects = RETRYING, f"object store unavailable: {exc}", {}
            except BlobError as exc:  # the header or heat map is gone (retention): nothing to send
                status, detail, objects = FAILED, f"cannot build the objects: {exc}", {}
            except Exception as exc:  # a header the reports cannot be built from: say so, do not retry
                log.exception("delivery of study %s: the objects could not be built", study_id)
                status, detail, objects = FAILED, f"cannot build the objects: {type(exc).__name__}: {exc}", {}
        session.expunge(destination)
    if status is None:
        try:
            transport_for(settings, destination).send(destination, [objects[k] for k in KINDS if k in objects])
            status, detail = SENT, None
        except Refused as exc:
            status, detail = FAILED, str(exc)
        except (Unreachable, OSError) as exc:
            status, detail = RETRYING, str(exc)
    if status == RETRYING and attempt + 1 >= settings.delivery_retries:
        status, detail = FAILED, f"gave up after {attempt + 1} attempts: {detail}"
    with factory() as session, session.begin():
        for row in session.scalars(select(Delivery).where(Delivery.id.in_([r.id for r in rows]))):
            row.attempts = attempt + 1
            row.updated_at = utcnow()
            if row.object in objects or status != SENT:
                row.status, row.detail = status, (detail or None) and detail[:500]
                if row.object in objects:
                    row.sop_instance_uid = objects[row.object].SOPInstanceUID
            else:  # nothing to send for it (a heat map that no longer exists)
                row.status, row.detail = FAILED, "the object no longer exists"
    log_fn = log.info if status == SENT else log.warning
    log_fn("delivery of study %s to %s: %s%s", study_id, destination.target, status, f" ({detail})" if detail else "")
    return {SENT: "sent", RETRYING: "retry", FAILED: "failed"}[status]
