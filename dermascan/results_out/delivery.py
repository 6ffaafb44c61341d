"""Results back to the hospital's PACS: per-program DICOM destinations (DIMSE C-STORE to an AE,
or STOW-RS to a DICOMweb URL) and the delivery of each study's objects to them.

What goes, for a study that arrived by DICOM (its header was kept, encrypted) — and, when its
program asks for it (``Program.dicom_results_for_all``), for a study from the portal or the
REST API under UIDs DermaScan makes (``dicom_sr.synthetic_source``):
- ``ai_sr`` — the AI result (``dicom_sr.ai_result_report``), once the study is scored;
- ``heatmap`` — the Grad-CAM overlay as a Secondary Capture, for studies that have one
  (referred for risk: heat maps are made for them only);
- ``verified_sr`` — the specialist's decision, verified by that specialist, once decided.

``schedule`` (called after the prediction, the heat map or the decision commits) records one
``Delivery`` row per object and destination and sends one task per destination on the outbound
queue; ``deliver`` sends what is due in one association (or one STOW-RS request) and records the
outcome. A destination that is down is retried with doubling waits; one that refuses (a rejected
association, an unknown AE title, a 4xx answer) is marked failed with the reason at once. Every
object's SOP Instance UID is derived from the study (``dicom_sr``), so a retry after a lost
answer sends the same instance and the PACS keeps one copy. Scoring never waits on any of this.
"""

from __future__ import annotations

import io
import logging
import ssl
from urllib.parse import urlsplit

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dermascan.config import Settings
from dermascan.errors import Invalid
from dermascan.infra import broker
from dermascan.infra.blobs import BlobError, BlobUnavailable, blob_store
from dermascan.infra.db import session_factory
from dermascan.infra.schema import (
    DECISION_LABELS,
    Decision,
    Delivery,
    DicomDestination,
    ModelBundle,
    Program,
    Referral,
    ReferralStatus,
    Study,
    User,
    utcnow,
)
from dermascan.results_out import dicom_sr
from dermascan.screening.reports import latest_predictions
from dermascan.security import keys

log = logging.getLogger(__name__)
AI_SR, HEATMAP, VERIFIED_SR = "ai_sr", "heatmap", "verified_sr"
OBJECTS = (AI_SR, HEATMAP, VERIFIED_SR)
PENDING, RETRYING, SENT, FAILED = "pending", "retrying", "sent", "failed"
STORE_OK = {0x0000, 0xB000, 0xB006, 0xB007}  # success and the warnings (coercion, elements discarded)


class BadDestination(Invalid):
    """A destination an administrator entered that cannot be used (kept out of the database)."""


class Refused(Exception):
    """The destination answered and will not take the objects: retrying will not help."""


class Unreachable(Exception):
    """The destination could not be reached or did not answer: try again later."""


# --- destinations -------------------------------------------------------------------------


def _ae_title(value: str) -> str:
    value = (value or "").strip()
    if not value or len(value) > 16 or not value.isascii() or "\\" in value or not value.isprintable():
        raise BadDestination("an AE title is 1 to 16 printable ASCII characters, no backslash")
    return value


def add_destination(
    session: Session,
    settings: Settings,
    program: Program,
    name: str,
    *,
    host: str | None = None,
    port: int | None = None,
    ae_title: str | None = None,
    tls: bool = False,
    url: str | None = None,
    username: str | None = None,
    secret: str | None = None,
) -> DicomDestination:
    """A DIMSE destination (host, port, AE title) or a STOW-RS one (url, optional credentials)."""
    name = (name or "").strip()
    if not name or len(name) > 64:
        raise BadDestination("a destination needs a name of at most 64 characters")
    if session.scalar(
        select(DicomDestination).where(DicomDestination.program_id == program.id, DicomDestination.name == name)
    ):
        raise BadDestination(f"program {program.name} already has a destination named {name!r}")
    if bool(url) == bool(host):
        raise BadDestination("give either a host, port and AE title (DIMSE) or a STOW-RS URL, not both")
    row = DicomDestination(program_id=program.id, name=name, enabled=True)
    if host:
        if not port or not 0 < int(port) < 65536:
            raise BadDestination("a DIMSE destination needs a port between 1 and 65535")
        row.kind, row.host, row.port, row.ae_title, row.tls = "dimse", host.strip(), int(port), _ae_title(ae_title), tls
    else:
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
            raise BadDestination("a STOW-RS destination needs an http(s) URL without credentials in it")
        row.kind, row.url, row.username = "stow", url.strip(), (username or None)
        if secret:
            row.secret_encrypted = keys.destination_cipher(settings.secret_key).encrypt(secret.encode())
    session.add(row)
    session.flush()
    return row


def destinations(session: Session, program_id: int | None = None) -> list[DicomDestination]:
    query = select(DicomDestination).order_by(DicomDestination.program_id, DicomDestination.name)
    if program_id is not None:
        query = query.where(DicomDestination.program_id == program_id)
    return list(session.scalars(query))


def find_destination(session: Session, program: str, name: str) -> DicomDestination | None:
    return session.scalar(
        select(DicomDestination).join(Program).where(Program.name == program, DicomDestination.name == name)
    )


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


# --- scheduling ---------------------------------------------------------------------------


def _available(prediction, referral) -> list[str]:
    """The objects a study has to send: the AI result once scored, the heat map once made, the
    verified report once decided."""
    if prediction is None:
        return []
    objects = [AI_SR]
    if prediction.heatmap_sha256:
        objects.append(HEATMAP)
    if referral is not None and referral.status == ReferralStatus.DECIDED:
        objects.append(VERIFIED_SR)
    return objects


def schedule(settings: Settings, study_ids, objects: tuple[str, ...] = OBJECTS) -> int:
    """Record the deliveries due for these studies (of ``objects``, those that exist) and send
    a task per study and destination. Studies without a DICOM identity, or whose program has no
    enabled destination, have nothing to deliver. Returns the number of tasks sent."""
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
            targets[program_id] = [d for d in destinations(session, program_id) if d.enabled]
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
            wanted = [o for o in _available(predictions.get(study.id), referrals.get(study.id)) if o in objects]
            existing = {(d.destination_id, d.object): d for d in existing_rows.get(study.id, [])}
            for destination in targets[study.program_id]:
                for obj in wanted:
                    row = existing.get((destination.id, obj))
                    if row is None:
                        session.add(Delivery(study_id=study.id, destination_id=destination.id, object=obj, status=PENDING, attempts=0))  # fmt: skip
                    elif row.status == FAILED and obj == VERIFIED_SR:  # a new decision: try again
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


# --- the objects --------------------------------------------------------------------------


def source_header(settings: Settings, study: Study, blobs) -> Dataset:
    """The source image's DICOM header: as received, or made for a study that came otherwise."""
    if study.dicom_header_sha256:
        encrypted = blobs.get(study.dicom_header_sha256)
        return dicom_sr.complete(dcmread(io.BytesIO(keys.header_cipher(settings.secret_key).decrypt(encrypted))))
    meta = study.meta or {}
    key = f"{keys.derive(settings.secret_key, 'dicom-uid').hex()[:16]}:{study.id}:{study.image_sha256}"
    return dicom_sr.synthetic_source(
        key, study.patient_pseudonym, meta.get("sex"), meta.get("age_approx"), study.created_at
    )


def build_objects(settings: Settings, session: Session, study: Study, kinds) -> dict[str, Dataset]:
    """The DICOM objects of ``kinds`` for a study (BlobUnavailable propagates: retry later)."""
    blobs = blob_store(settings)
    header = source_header(settings, study, blobs)
    prediction = latest_predictions(session, [study.id])[study.id]
    bundle = session.get(ModelBundle, prediction.bundle_version)
    referral = session.scalar(select(Referral).where(Referral.study_id == study.id))
    result = dicom_sr.AiResult(
        probability=prediction.probability if prediction.assessable else None,
        threshold=prediction.threshold,
        referral_category=referral.category if referral is not None else None,
        bundle_version=prediction.bundle_version,
        bundle_sha256=(bundle.sha256 if bundle is not None and bundle.sha256 else "unknown"),
    )
    ai = dicom_sr.ai_result_report(header, result)
    out: dict[str, Dataset] = {}
    if AI_SR in kinds:
        out[AI_SR] = ai
    if HEATMAP in kinds and prediction.heatmap_sha256:
        import numpy as np
        from PIL import Image

        with Image.open(io.BytesIO(blobs.get(prediction.heatmap_sha256))) as image:
            overlay = np.asarray(image.convert("RGB"))
        out[HEATMAP] = dicom_sr.heatmap_capture(header, overlay, prediction.bundle_version)
    if VERIFIED_SR in kinds and referral is not None and referral.decided_at is not None:
        user = session.get(User, referral.decided_by_id)
        decided_at = referral.decided_at
        decision = dicom_sr.SpecialistDecision(
            decision=str(Decision(referral.decision)),
            label=DECISION_LABELS[Decision(referral.decision)],
            note=referral.note,
            specialist=f"{user.username if user is not None else 'unknown'}^",  # a login: one name component
            organization=session.get(Program, study.program_id).name,
            decided_at=decided_at,
        )
        out[VERIFIED_SR] = dicom_sr.decision_report(header, ai, decision)
    return out


# --- sending ------------------------------------------------------------------------------


def send_dimse(settings: Settings, destination: DicomDestination, datasets: list[Dataset]) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import SecondaryCaptureImageStorage  # noqa: F401 (registers the class names)

    ae = AE(ae_title=settings.dicom_calling_ae)
    # bounded waits: a destination that does not answer costs a worker seconds, not minutes
    ae.connection_timeout, ae.acse_timeout, ae.dimse_timeout, ae.network_timeout = 5, 10, 30, 30
    for sop_class in sorted({ds.SOPClassUID for ds in datasets}):
        ae.add_requested_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    tls_args = None
    if destination.tls:
        context = ssl.create_default_context(cafile=settings.dicom_tls_ca_file or None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if settings.dicom_tls_client_cert:
            context.load_cert_chain(settings.dicom_tls_client_cert, settings.dicom_tls_client_key or None)
        tls_args = (context, destination.host)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
        reason = f"{primitive.result_str}, {primitive.reason_str}" if primitive is not None else "rejected"
        if primitive is not None and primitive.result == 0x02:  # rejected-transient
            raise Unreachable(f"association rejected for now by {destination.target}: {reason}")
        raise Refused(f"association rejected by {destination.target}: {reason}")
    if not assoc.is_established:
        raise Unreachable(f"no association with {destination.target} (connection refused, lost or timed out)")
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if not status or "Status" not in status:
                raise Unreachable(f"no C-STORE answer from {destination.target}")
            if status.Status not in STORE_OK:
                raise Refused(f"C-STORE of {ds.SOPClassUID.name} refused by {destination.target}: status 0x{status.Status:04X}")  # fmt: skip
    finally:
        if assoc.is_established:
            assoc.release()


def _timed_session():
    import requests

    class TimedSession(requests.Session):
        """dicomweb-client gives no timeout: every request gets one (connect 5 s, read 60 s)."""

        def request(self, *args, **kwargs):
            kwargs.setdefault("timeout", (5, 60))
            return super().request(*args, **kwargs)

    return TimedSession()


def send_stow(settings: Settings, destination: DicomDestination, datasets: list[Dataset]) -> None:
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = _timed_session()
    if destination.secret_encrypted:
        secret = keys.destination_cipher(settings.secret_key).decrypt(destination.secret_encrypted).decode()
        if destination.username:
            session.auth = (destination.username, secret)
        else:
            session.headers["Authorization"] = f"Bearer {secret}"
    client = DICOMwebClient(url=destination.url, session=session)
    try:
        client.store_instances(datasets)
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else None
        if code is not None and 400 <= code < 500 and code not in (408, 429):
            raise Refused(f"STOW-RS to {destination.url} answered {code}") from exc
        raise Unreachable(f"STOW-RS to {destination.url} answered {code}") from exc
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise Unreachable(f"STOW-RS to {destination.url}: {type(exc).__name__}") from exc


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
        send = send_dimse if destination.kind == "dimse" else send_stow
        try:
            send(settings, destination, [objects[k] for k in OBJECTS if k in objects])
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


def retry_delay(settings: Settings, attempt: int) -> float:
    return min(600.0, settings.delivery_retry_s * 2**attempt)
