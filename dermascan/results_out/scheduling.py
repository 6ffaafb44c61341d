"""Scheduling deliveries: after a prediction, a heat map or a decision commits, ``schedule`` records
one ``Delivery`` row per object and destination and sends one task per study and destination on
the outbound queue (scoring never waits on a PACS); ``resend`` sends failed ones again once an
administrator has fixed the destination."""

from __future__ import annotations

from sqlalchemy import select

from dermascan.config import Settings
from dermascan.infra import broker
from dermascan.infra.db import session_factory
from dermascan.infra.schema import Delivery, DicomDestination, Program, Referral, Study
from dermascan.results_out.delivery import FAILED, PENDING
from dermascan.results_out.destinations import listed
from dermascan.results_out.objects import KINDS, VERIFIED_SR, available
from dermascan.screening.reports import latest_predictions


def schedule(settings: Settings, study_ids, objects: tuple[str, ...] = KINDS, again: bool = False) -> int:
    """Record the deliveries due for these studies (of ``objects``, those that exist) and send
    a task per study and destination. Studies without a DICOM identity, or whose program has no
    enabled destination, have nothing to deliver. ``again``: an amended decision — its verified
    report is sent anew even where the earlier one arrived (it supersedes that one). Returns the
    number of tasks sent."""
    due: set[tuple[int, int]] = set()
    factory = session_factory(settings.database_url)
    with factory() as session, session.begin():
        studies = session.scalars(
            select(Study)
            .join(Program, Program.id == Study.program_id)
            .where(
                Study.id.in_(list(study_ids)),
                Study.dicom_header_sha256.is_not(None) | Program.dicom_results_for_all.is_(True),
            )
        ).all()
        targets: dict[int, list[DicomDestination]] = {}
        for program_id in {s.program_id for s in studies}:
            targets[program_id] = [d for d in listed(session, program_id) if d.enabled]
        studies = [s for s in studies if targets[s.program_id]]
        if not studies:
            return 0
        ids = [s.id for s in studies]
        # one query each for the whole batch (this runs after every scored batch)
        predictions = latest_predictions(session, ids)
        referrals = {r.study_id: r for r in session.scalars(select(Referral).where(Referral.study_id.in_(ids)))}
        existing_rows: dict[int, list[Delivery]] = {}
        for row in session.scalars(select(Delivery).where(Delivery.study_id.in_(ids))):
            existing_rows.setdefault(row.study_id, []).append(row)
        for study in studies:
            wanted = [o for o in available(predictions.get(study.id), referrals.get(study.id)) if o in objects]
            existing = {(d.destination_id, d.object): d for d in existing_rows.get(study.id, [])}
            for destination in targets[study.program_id]:
                for obj in wanted:
                    row = existing.get((destination.id, obj))
                    if row is None:
                        session.add(Delivery(study_id=study.id, destination_id=destination.id, object=obj, status=PENDING, attempts=0))  # fmt: skip
                    elif obj == VERIFIED_SR and (row.status == FAILED or again):  # a new decision: send it
                        row.status, row.attempts, row.detail = PENDING, 0, None
                    else:
                        continue
                    due.add((study.id, destination.id))
    return sum(broker.send(settings, broker.TASK_DELIVER, [s, d, 0], queue=broker.CALLBACKS) for s, d in sorted(due))


def resend(settings: Settings, study_id: int) -> int:
    """Send a study's failed deliveries again (an administrator fixed the destination)."""
    factory = session_factory(settings.database_url)
    with factory() as session, session.begin():
        rows = session.scalars(select(Delivery).where(Delivery.study_id == study_id, Delivery.status == FAILED)).all()
        for row in rows:
            row.status, row.attempts = PENDING, 0
        pairs = sorted({(row.study_id, row.destination_id) for row in rows})
    return sum(broker.send(settings, broker.TASK_DELIVER, [s, d, 0], queue=broker.CALLBACKS) for s, d in pairs)
