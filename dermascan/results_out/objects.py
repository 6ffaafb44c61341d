"""The DICOM objects DermaScan files back in a study's source study, by kind:

- ``ai_sr`` — the AI result (``dicom_sr.ai_result_report``), once the study is scored;
- ``heatmap`` — the heat-map overlay (Grad-CAM × HiResCAM) as a Secondary Capture, for studies that have one
  (referred for risk: heat maps are made for them only);
- ``verified_sr`` — the specialist's decision, verified by that specialist, once decided.

For a study that arrived by DICOM they are built on its header (kept, encrypted); for one from the
portal or the REST API, on a source DermaScan makes (``dicom_sr.synthetic_source``). Every
object's SOP Instance UID is derived from the study, so building again gives the same instance.
"""

from __future__ import annotations

import datetime as dt
import io

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session

from dermascan.config import Settings
from dermascan.infra.blobs import blob_store
from dermascan.infra.schema import (
    DECISION_LABELS,
    Decision,
    Lesion,
    ModelBundle,
    Program,
    Referral,
    ReferralStatus,
    Study,
    User,
)
from dermascan.results_out import dicom_sr
from dermascan.screening.reports import differential_rows, latest_predictions
from dermascan.security import keys

AI_SR, HEATMAP, VERIFIED_SR = "ai_sr", "heatmap", "verified_sr"
KINDS = (AI_SR, HEATMAP, VERIFIED_SR)


def available(prediction, referral) -> list[str]:
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


def _follow_up(settings: Settings, session: Session, study: Study, prediction, blobs) -> dict:
    """The AI report's lesion follow-up: the lesion's tracking UID (one per lesion, from its
    pseudonym), the comparison with the previous visit, and that visit's AI report."""
    if study.lesion_id is None:
        return {}
    lesion = session.get(Lesion, study.lesion_id)
    out = {
        "lesion_uid": generate_uid(entropy_srcs=[lesion.key_pseudonym, "lesion-tracking"]),
        "lesion_name": f"lesion {lesion.id}",
        "change_measure": prediction.change_measure,
        "probability_change": prediction.probability_change,
        "changed": prediction.changed,
        "newly_high_risk": prediction.newly_high_risk,
    }
    if prediction.previous_study_id is not None:
        previous = session.get(Study, prediction.previous_study_id)
        before = latest_predictions(session, [previous.id]).get(previous.id) if previous is not None else None
        if before is not None:
            out["previous_report"] = dicom_sr.ai_report_uids(
                source_header(settings, previous, blobs), before.bundle_version
            )
    return out


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
        missing_fields=tuple(prediction.missing_fields or ()),
        differential=tuple(differential_rows(prediction) or ()),
        **_follow_up(settings, session, study, prediction, blobs),
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
        organization = session.get(Program, study.program_id).name
        # an amended decision supersedes the report of the version before it (its UIDs come from
        # that version's time, so it is rebuilt exactly as it was sent)
        versions = len(referral.amendments)  # the decision in force is version n after n amendments
        previous = None
        if versions:
            before = _decision(session, referral.amendments[-1], organization)
            previous = dicom_sr.decision_report(header, ai, before, version=versions - 1)
        out[VERIFIED_SR] = dicom_sr.decision_report(
            header, ai, _decision(session, referral, organization), previous, version=versions
        )
    return out


def _decision(session: Session, version, organization: str) -> dicom_sr.SpecialistDecision:
    """A decision as its verified report carries it: the referral's in force, or an earlier
    version (``DecisionAmendment``)."""
    user = session.get(User, version.decided_by_id) if version.decided_by_id else None
    decided_at = version.decided_at if version.decided_at.tzinfo else version.decided_at.replace(tzinfo=dt.UTC)
    return dicom_sr.SpecialistDecision(
        decision=str(Decision(version.decision)),
        label=DECISION_LABELS[Decision(version.decision)],
        note=version.note,
        specialist=f"{user.username if user is not None else 'unknown'}^",  # a login: one name component
        organization=organization,
        decided_at=decided_at,
    )
