"""A program's own operating point: its labelled studies (the outcomes recorded for them, through
the portal, the REST API or a CSV import) scored by the active bundle, the ROC they draw, and
sensitivity and specificity with 95 % intervals at candidate thresholds; an admin may set the
program's threshold from it (audited). A GP teledermatology program and a pigmented-lesion clinic
see different patients: the bundle's threshold stays the default for every program without one.

A local set says little with few malignant lesions: the sensitivity's interval is shown beside
every figure, and below ``ENOUGH_MALIGNANT`` malignant lesions the page says the set is too small
to choose a threshold on (with 50 malignant lesions an observed sensitivity of 0.95 has a 95 %
interval of about 0.84–0.98; with 200, about 0.91–0.97).

Studies recorded as ``not_biopsied`` have no histopathological truth and are left out; studies the
gate found not assessable have no probability and are left out too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from dermascan.governance import operating_point
from dermascan.infra.schema import (
    ModelBundle,
    Outcome,
    OutcomeKind,
    Prediction,
    Program,
    ProgramThreshold,
    Study,
    utcnow,
)
from model import metrics

ENOUGH_MALIGNANT = 50  # below this, the page says the local set is too small to choose a threshold on
TARGETS = (0.90, 0.95, 0.975, 0.99)  # candidate thresholds: the local scores' levels at these sensitivities


class LocalThresholdError(ValueError):
    """A program threshold that cannot be set: outside (0, 1), or no active bundle."""


@dataclass
class Candidate:
    threshold: float
    why: str  # "bundle default", "program's current", "sensitivity 0.95 on this set"…
    sensitivity: float
    sensitivity_ci95: list[float]
    specificity: float
    specificity_ci95: list[float]
    referred: int
    per_1000: float | None  # referrals to expect per 1,000 studies at the program's prevalence
    missed: int  # malignant lesions of the set below the threshold


@dataclass
class LocalValidation:
    program: str
    bundle: str | None
    n: int = 0
    malignant: int = 0
    left_out: dict = field(default_factory=dict)  # why labelled studies were not used: count
    auc: float | None = None
    auc_ci95: tuple[float, float] | None = None
    prevalence: float | None = None  # the share used for referrals per 1,000
    prevalence_source: str = ""
    roc: list[tuple[float, float]] = field(default_factory=list)  # (1 - specificity, sensitivity)
    candidates: list[Candidate] = field(default_factory=list)

    @property
    def enough(self) -> bool:
        return self.malignant >= ENOUGH_MALIGNANT and self.n - self.malignant >= ENOUGH_MALIGNANT

    @property
    def benign(self) -> int:
        return self.n - self.malignant


def program_threshold(session: Session, program_id: int, bundle_version: str) -> ProgramThreshold | None:
    return session.scalar(
        select(ProgramThreshold).where(
            ProgramThreshold.program_id == program_id, ProgramThreshold.bundle_version == bundle_version
        )
    )


def labelled(session: Session, program: Program, bundle: ModelBundle) -> tuple[np.ndarray, np.ndarray, dict]:
    """(probabilities, malignant 0/1, what was left out and why) of the program's studies with an
    outcome, scored by ``bundle``."""
    rows = session.execute(
        select(Outcome.kind, Prediction.probability, Prediction.assessable)
        .join(Study, Study.id == Outcome.study_id)
        .outerjoin(
            Prediction,
            (Prediction.study_id == Study.id) & (Prediction.bundle_version == bundle.version),
        )
        .where(Study.program_id == program.id)
    ).all()
    scores, truth, left_out = [], [], {}
    for kind, probability, assessable in rows:
        if kind == OutcomeKind.NOT_BIOPSIED:
            reason = "not biopsied (no histopathology)"
        elif probability is None and assessable is None:
            reason = f"not scored by {bundle.version}"
        elif not assessable or probability is None:
            reason = "not assessable"
        else:
            scores.append(float(probability))
            truth.append(1 if kind == OutcomeKind.MALIGNANT else 0)
            continue
        left_out[reason] = left_out.get(reason, 0) + 1
    return np.asarray(scores, np.float64), np.asarray(truth, np.int64), left_out


def candidate(y: np.ndarray, p: np.ndarray, threshold: float, why: str, prevalence: float | None) -> Candidate:
    at = metrics.at_threshold(y, p, threshold)
    pos, neg = at.tp + at.fn, at.tn + at.fp
    point = {"sensitivity": at.sensitivity, "specificity": at.specificity} if pos and neg else None
    return Candidate(
        threshold=float(threshold), why=why,
        sensitivity=at.sensitivity, sensitivity_ci95=metrics.wilson(at.tp, pos),
        specificity=at.specificity, specificity_ci95=metrics.wilson(at.tn, neg),
        referred=at.tp + at.fp, per_1000=operating_point.referrals_per_1000(point, prevalence), missed=at.fn,
    )  # fmt: skip


def validate(
    y: np.ndarray, p: np.ndarray, thresholds: dict[str, float], prevalence: float | None = None
) -> tuple[float | None, tuple[float, float] | None, list[tuple[float, float]], list[Candidate]]:
    """Pure: the AUC with its bootstrap interval, the ROC points and the candidates — the named
    ``thresholds`` and the set's own levels at the sensitivities of ``TARGETS`` — for labels ``y``
    and calibrated probabilities ``p``."""
    y, p = np.asarray(y, np.int64), np.asarray(p, np.float64)
    prevalence = prevalence if prevalence is not None else (float(y.mean()) if y.size else None)
    named = dict(thresholds)
    auc = ci = None
    roc: list[tuple[float, float]] = []
    if 0 < y.sum() < y.size:
        auc = metrics.auc(y, p)
        ci = tuple(metrics.bootstrap_ci(metrics.auc, y, p, n_boot=400))
        from sklearn.metrics import roc_curve

        fpr, tpr, _ = roc_curve(y, p)
        roc = [(float(a), float(b)) for a, b in zip(fpr, tpr, strict=True)]
        for target in TARGETS:
            level = metrics.threshold_for_sensitivity(y, p, target)
            named.setdefault(f"sensitivity {target:g} on this set", float(np.clip(level, 1e-6, 1 - 1e-6)))
    candidates = [candidate(y, p, t, why, prevalence) for why, t in named.items()]
    candidates.sort(key=lambda c: c.threshold)
    return auc, ci, roc, candidates


def local_validation(session: Session, program: Program, bundle: ModelBundle | None) -> LocalValidation:
    """The program's local validation against ``bundle`` (the active one)."""
    out = LocalValidation(program.name, None if bundle is None else bundle.version)
    if bundle is None:
        return out
    p, y, out.left_out = labelled(session, program, bundle)
    out.n, out.malignant = int(y.size), int(y.sum())
    if program.expected_prevalence:
        out.prevalence, out.prevalence_source = program.expected_prevalence, "the program's expected prevalence"
    elif y.size:
        out.prevalence, out.prevalence_source = float(y.mean()), "the malignant share of this set"
    named = {"bundle default": bundle.threshold}
    own = program_threshold(session, program.id, bundle.version)
    if own is not None:
        named["program's current"] = own.threshold
    out.auc, out.auc_ci95, out.roc, out.candidates = validate(y, p, named, out.prevalence)
    return out


def set_program_threshold(
    session: Session, program: Program, bundle: ModelBundle | None, value: float | None, actor=None
) -> ProgramThreshold | None:
    """Set (or, with None, clear) the program's threshold under the active bundle, in the
    caller's transaction, audited with what the local validation shows there. It applies to the
    program's studies scored from now on."""
    from dermascan.security.audit import SYSTEM

    actor = actor or SYSTEM
    if bundle is None:
        raise LocalThresholdError("no active bundle: a program threshold belongs to a bundle")
    row = program_threshold(session, program.id, bundle.version)
    old = None if row is None else row.threshold
    basis = None
    if value is None:
        if row is not None:
            session.delete(row)
        row = None
    else:
        value = float(value)
        if not np.isfinite(value) or not 0 < value < 1:
            raise LocalThresholdError(f"a referral threshold lies strictly between 0 and 1, not {value}")
        p, y, _ = labelled(session, program, bundle)
        at = candidate(y, p, value, "set", None)
        basis = {
            "n": int(y.size), "malignant": int(y.sum()),
            "sensitivity": None if not y.sum() else at.sensitivity, "sensitivity_ci95": at.sensitivity_ci95,
            "specificity": None if y.sum() == y.size else at.specificity, "specificity_ci95": at.specificity_ci95,
        }  # fmt: skip
        if row is None:
            row = ProgramThreshold(program_id=program.id, bundle_version=bundle.version)
            session.add(row)
        row.threshold, row.basis, row.set_at, row.set_by_id = value, basis, utcnow(), actor.user_id
    actor.record(session, "program_threshold_set", object_type="program", object_id=program.id,
                 detail={"program": program.name, "bundle": bundle.version, "from": old, "to": value,
                         "default": bundle.threshold, "local_validation": basis})  # fmt: skip
    return row
