"""A case file: everything a specialist's case page shows of one referral, read in one call — the
study, its deciding prediction and bundle, whether the reader holds the claim, the patient's other
lesions in the batch, the probability at the program's prevalence, the lesion's visits, the
outcome, and what the score was made without. The view only renders it."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from dermascan.infra.schema import ModelBundle, Outcome, Prediction, Referral, ReferralStatus, Study
from dermascan.referrals import queue
from dermascan.screening import referral_policy, reports


@dataclass
class CaseFile:
    referral: Referral
    study: Study
    prediction: Prediction
    bundle: ModelBundle | None
    holds: bool  # the reader holds a live claim on it
    others: list[Study] = field(default_factory=list)  # the patient's other lesions in the batch
    other_predictions: dict = field(default_factory=dict)
    bundle_prevalence: float | None = None
    program_prevalence: float | None = None
    program_probability: float | None = None
    outcome: Outcome | None = None
    history: list[dict] = field(default_factory=list)  # the lesion's visits, in time order
    change_threshold: float | None = None
    missing_note: str | None = None
    differential: list[dict] | None = None  # the model's differential, most likely first
    category_labels: dict = field(default_factory=lambda: dict(referral_policy.CATEGORY_LABELS))


def case_file(session: Session, referral: Referral, reader_id: int, claim_timeout_s: int) -> CaseFile:
    """The case file of ``referral`` as the user ``reader_id`` sees it."""
    study = referral.study
    prediction = session.get(Prediction, referral.prediction_id)
    bundle = session.get(ModelBundle, prediction.bundle_version)
    manifest = bundle.manifest if bundle is not None else {}
    holds = (
        referral.status == ReferralStatus.CLAIMED
        and referral.claimed_by_id == reader_id
        and queue.current_claim(session, reader_id, claim_timeout_s) is not None
    )
    others = queue.same_patient(session, study)
    other_predictions = {
        p.study_id: p
        for p in session.scalars(
            select(Prediction).where(Prediction.study_id.in_([o.id for o in others]), Prediction.shadow.is_(False))
        )
    }
    prevalence = reports.Prevalence(session).get(study, prediction)
    return CaseFile(
        referral, study, prediction, bundle, holds, others, other_predictions,
        bundle_prevalence=(manifest.get("calibration") or {}).get("prevalence"),
        program_prevalence=prevalence[1] if prevalence else None,
        program_probability=reports.study_row(study, prediction, referral.category, prevalence)[
            "probability_at_program_prevalence"
        ],
        outcome=session.scalar(select(Outcome).where(Outcome.study_id == study.id)),
        history=reports.lesion_history(session, study.lesion_id) if study.lesion_id is not None else [],
        change_threshold=(manifest.get("change") or {}).get("threshold"),
        missing_note=reports.missing_note(prediction.missing_fields),
        differential=reports.differential_rows(prediction),
    )  # fmt: skip
