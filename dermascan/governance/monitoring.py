"""Watching the deployed model, per program and week (issue 15): what it did (studies, referral
rate, what specialists decided), how right it was where the truth is known (PPV against
recorded outcomes; sensitivity among verified malignant lesions), whether its inputs and scores
still look like the data it was validated on (PSI, ``model.inference.reference``), and how the shadow
bundles compare. The admin monitoring page, the Prometheus metrics and the monthly report all
read :func:`window` — one computation, three views.

Verification bias, said plainly: outcomes are recorded mostly for referred lesions (they are the
ones biopsied). PPV among referred studies with an outcome is sound; sensitivity is computed
only over malignant lesions that have an outcome, and a malignant lesion the model did not refer
is rarely biopsied, so that figure overstates the true sensitivity. It is shown with its count
and this caveat, never as the model's sensitivity.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from dermascan.governance import local_validation, operating_point
from dermascan.infra.schema import (
    Decision,
    ModelBundle,
    Outcome,
    OutcomeKind,
    Prediction,
    Program,
    Referral,
    Study,
    StudyStatus,
    utcnow,
)
from model import metrics
from model.inference import reference

DRIFT, MOVED, MIN_STUDIES = reference.DRIFT, reference.MOVED, reference.MIN_STUDIES


@dataclass
class Window:
    program: str
    program_id: int
    start: dt.datetime
    end: dt.datetime
    bundle: str | None = None
    studies: int = 0
    referred: int = 0
    high_risk: int = 0  # referred for the probability (newly high risk included)
    newly_high_risk: int = 0  # lesion follow-up: not referred at the last visit, referred now
    changed: int = 0  # lesion follow-up: changed since last visit (below the threshold)
    not_assessable: int = 0
    decided: int = 0
    decided_benign: int = 0
    with_outcome: int = 0
    referred_malignant: int = 0
    referred_benign: int = 0
    missed_malignant: int = 0  # not referred, outcome malignant (verified only)
    # studies scored without some metadata (model.inference.missing), and how many of them were referred
    # for their probability
    missing_metadata: int = 0
    missing_metadata_referred: int = 0
    missing_by_field: dict = field(default_factory=dict)  # field → studies scored without it
    expected_rate: float | None = None  # high-risk referral rate the bundle's validation predicts
    band: tuple[float, float] | None = None
    drift: dict = field(default_factory=dict)  # feature → PSI (None: too few studies)
    shadows: dict = field(default_factory=dict)  # bundle → {n, agreement, auc, active_auc}
    scores: list = field(default_factory=list)  # the deciding bundle's assessable scores
    auc: float | None = None  # the deciding bundle's, on studies with a malignant or benign outcome
    auc_outcomes: int = 0
    # the differential: the suspected (most likely) diagnosis of each assessable study, against the
    # bundle's validation mix, and against what specialists and histopathology said once recorded
    diagnosis_mix: dict = field(default_factory=dict)  # code → studies
    validation_mix: dict | None = None  # code → share on the bundle's development rows
    confusion_specialist: dict = field(default_factory=dict)  # (suspected, specialist's) → studies
    confusion_outcome: dict = field(default_factory=dict)  # (suspected, histopathology's) → studies

    @property
    def diagnosed(self) -> int:
        return sum(self.diagnosis_mix.values())

    def mix_rows(self) -> list[dict]:
        """The suspected-diagnosis mix as a table: each class, its studies and share here, and its
        share on the bundle's development rows."""
        from model.inference.diagnosis import CLASSES

        n = self.diagnosed
        return [
            {"code": code, "label": label, "n": self.diagnosis_mix.get(code, 0),
             "share": self.diagnosis_mix.get(code, 0) / n if n else None,
             "validation": (self.validation_mix or {}).get(code)}
            for code, label, *_ in CLASSES
        ]  # fmt: skip

    def confusion_rows(self, which: str) -> tuple[list[str], list[tuple[str, list[int]]]]:
        """The suspected diagnosis (rows) against the specialists' (``which`` = "specialist") or
        histopathology's ("outcome") diagnosis (columns), for the classes that occur."""
        from model.inference.diagnosis import CODES

        pairs = self.confusion_specialist if which == "specialist" else self.confusion_outcome
        columns = [c for c in (*CODES, "other") if any(b == c for _, b in pairs)]
        rows = [(a, [pairs.get((a, b), 0) for b in columns]) for a in CODES if any(x == a for x, _ in pairs)]
        return columns, rows

    @property
    def referral_rate(self) -> float | None:
        return self.referred / self.studies if self.studies else None

    @property
    def high_risk_rate(self) -> float | None:
        return self.high_risk / self.studies if self.studies else None

    @property
    def missing_metadata_share(self) -> float | None:
        return self.missing_metadata / self.studies if self.studies else None

    @property
    def missing_metadata_referral_rate(self) -> float | None:
        return self.missing_metadata_referred / self.missing_metadata if self.missing_metadata else None

    @property
    def benign_share(self) -> float | None:
        return self.decided_benign / self.decided if self.decided else None

    @property
    def ppv(self) -> float | None:
        known = self.referred_malignant + self.referred_benign
        return self.referred_malignant / known if known else None

    @property
    def verified_sensitivity(self) -> float | None:
        malignant = self.referred_malignant + self.missed_malignant
        return self.referred_malignant / malignant if malignant else None

    @property
    def alerts(self) -> list[str]:
        out = [
            f"{name} drifted (PSI {value:.2f} > {reference.DRIFT})"
            for name, value in self.drift.items()
            if value is not None and value > reference.DRIFT
        ]
        rate = self.high_risk_rate
        if self.band and rate is not None and self.studies >= reference.MIN_STUDIES and not self.band[0] <= rate <= self.band[1]:  # fmt: skip
            out.append(f"high-risk referral rate {rate:.1%} outside the expected {self.band[0]:.1%}–{self.band[1]:.1%}")
        return out


def week_start(day: dt.datetime | dt.date) -> dt.datetime:
    day = day.date() if isinstance(day, dt.datetime) else day
    monday = day - dt.timedelta(days=day.weekday())
    return dt.datetime(monday.year, monday.month, monday.day, tzinfo=dt.UTC)


def window(session: Session, program: Program, start: dt.datetime, end: dt.datetime) -> Window:
    """The figures of one program's studies scored in [start, end), in four steps: what was read,
    what the specialists and outcomes say, how the inputs and scores drifted, how the shadow
    bundles compare."""
    out = Window(program.name, program.id, start, end)
    rows = _WindowRows.read(session, program.id, start, end)
    if not rows.studies:
        return out
    _count_referrals_and_outcomes(out, rows)
    bundle = _deciding_bundle(session, rows)
    own = None if bundle is None else local_validation.program_threshold(session, program.id, bundle.version)
    _drift(out, rows, bundle, program, None if own is None else own.threshold)
    known = [
        (i, o.kind == OutcomeKind.MALIGNANT) for i, o in rows.outcomes.items() if o.kind != OutcomeKind.NOT_BIOPSIED
    ]
    _differential(out, rows, bundle)
    out.auc = _auc([(rows.deciding[i].probability, y) for i, y in known if i in rows.deciding])
    out.auc_outcomes = sum(1 for i, _ in known if i in rows.deciding)
    for version, theirs in rows.shadow.items():
        out.shadows[version] = _compare(session, version, theirs, rows.deciding, known)
    return out


@dataclass
class _WindowRows:
    """The rows a window reads, once: its studies, their deciding and shadow predictions, their
    referrals and outcomes."""

    studies: list
    deciding: dict
    shadow: dict
    referrals: dict
    outcomes: dict

    @classmethod
    def read(cls, session: Session, program_id: int, start: dt.datetime, end: dt.datetime) -> _WindowRows:
        studies = list(
            session.scalars(
                select(Study).where(
                    Study.program_id == program_id,
                    Study.status == StudyStatus.DONE,
                    Study.finished_at >= start,
                    Study.finished_at < end,
                )
            )
        )
        ids = [s.id for s in studies]
        deciding: dict[int, Prediction] = {}
        shadow: dict[str, dict[int, Prediction]] = {}
        if ids:
            query = select(Prediction).where(Prediction.study_id.in_(ids)).order_by(Prediction.created_at)
            for p in session.scalars(query):
                if p.shadow:
                    shadow.setdefault(p.bundle_version, {})[p.study_id] = p
                else:
                    deciding[p.study_id] = p
        referrals = {r.study_id: r for r in session.scalars(select(Referral).where(Referral.study_id.in_(ids)))}
        outcomes = {o.study_id: o for o in session.scalars(select(Outcome).where(Outcome.study_id.in_(ids)))}
        return cls(studies, deciding, shadow, referrals, outcomes)


def _count_referrals_and_outcomes(out: Window, rows: _WindowRows) -> None:
    referrals = rows.referrals
    out.studies = len(rows.studies)
    out.referred = len(referrals)
    out.high_risk = sum(1 for r in referrals.values() if r.category in ("high_risk", "newly_high_risk"))
    out.newly_high_risk = sum(1 for r in referrals.values() if r.category == "newly_high_risk")
    out.changed = sum(1 for r in referrals.values() if r.category == "changed")
    out.not_assessable = sum(1 for r in referrals.values() if r.category == "not_assessable")
    decided = [r for r in referrals.values() if r.decision is not None]
    out.decided = len(decided)
    out.decided_benign = sum(1 for r in decided if r.decision == Decision.BENIGN)
    out.with_outcome = len(rows.outcomes)
    for study_id, o in rows.outcomes.items():
        if o.kind == OutcomeKind.MALIGNANT:
            if study_id in referrals:
                out.referred_malignant += 1
            else:
                out.missed_malignant += 1
        elif o.kind == OutcomeKind.BENIGN and study_id in referrals:
            out.referred_benign += 1
    for study_id, prediction in rows.deciding.items():
        if prediction.missing_fields:
            out.missing_metadata += 1
            referral = referrals.get(study_id)
            out.missing_metadata_referred += referral is not None and referral.category in (
                "high_risk",
                "newly_high_risk",
            )
            for name in prediction.missing_fields:
                out.missing_by_field[name] = out.missing_by_field.get(name, 0) + 1


def _differential(out: Window, rows: _WindowRows, bundle: ModelBundle | None) -> None:
    from model.inference.diagnosis import CODES, index_of

    suspected = {
        i: CODES[max(range(len(p.differential)), key=p.differential.__getitem__)]
        for i, p in rows.deciding.items()
        if p.assessable and p.differential
    }
    for code in suspected.values():
        out.diagnosis_mix[code] = out.diagnosis_mix.get(code, 0) + 1
    if bundle is not None:
        out.validation_mix = (((bundle.manifest or {}).get("diagnosis") or {}).get("report") or {}).get("predicted_mix")
    for i, code in suspected.items():
        referral = rows.referrals.get(i)
        if referral is not None and referral.specialist_diagnosis:
            key = (code, referral.specialist_diagnosis)
            out.confusion_specialist[key] = out.confusion_specialist.get(key, 0) + 1
        outcome = rows.outcomes.get(i)
        if outcome is not None and outcome.diagnosis:
            found = index_of(outcome.diagnosis)
            key = (code, CODES[found] if found >= 0 else "other")
            out.confusion_outcome[key] = out.confusion_outcome.get(key, 0) + 1


def _deciding_bundle(session: Session, rows: _WindowRows) -> ModelBundle | None:
    """The bundle that decided most of the window's studies."""
    versions = Counter(p.bundle_version for p in rows.deciding.values()).most_common(1)
    return session.get(ModelBundle, versions[0][0]) if versions else None


def _drift(
    out: Window, rows: _WindowRows, bundle: ModelBundle | None, program: Program, threshold: float | None = None
) -> None:
    """Scores, metadata and image statistics against the bundle's development profile, and the
    referral rate against what its validation predicts."""
    manifest = bundle.manifest if bundle is not None else {}
    out.bundle = bundle.version if bundle is not None else None
    out.scores = [p.probability for p in rows.deciding.values() if p.assessable]
    stream: dict[str, list] = {name: [] for name in (*reference.NUMERIC, *reference.CATEGORICAL)}
    for s in rows.studies:
        meta = s.meta or {}
        stats = (rows.deciding.get(s.id).image_stats if s.id in rows.deciding else None) or {}
        for name in ("age_approx", *reference.CATEGORICAL):
            stream[name].append(meta.get(name))
        for name in reference.IMAGE_STATS:
            stream[name].append(stats.get(name))
    profile = manifest.get("reference") or {}
    out.drift = {"score": reference.score_psi((manifest.get("metrics") or {}).get("score_histogram"), out.scores)}
    out.drift.update(reference.drift(profile, stream))
    out.expected_rate, out.band = _expected_band(manifest, bundle, program, out.studies, threshold)


def _expected_band(
    manifest, bundle, program, n, threshold: float | None = None
) -> tuple[float | None, tuple[float, float] | None]:
    """The high-risk referral rate the bundle's validation predicts at the program's threshold
    (its own, else the bundle's) and expected prevalence (else the validation data's), with a
    band: half to one and a half times it, widened by three binomial standard errors for the
    window's size."""
    if bundle is None:
        return None, None
    point = operating_point.at_threshold(manifest, bundle.threshold if threshold is None else threshold)
    prevalence = program.expected_prevalence or operating_point.validation_prevalence(manifest)
    per_1000 = operating_point.referrals_per_1000(point, prevalence)
    if per_1000 is None:
        return None, None
    rate = per_1000 / 1000.0
    noise = 3 * (rate * (1 - rate) / max(n, 1)) ** 0.5
    return rate, (max(0.0, 0.5 * rate - noise), min(1.0, 1.5 * rate + noise))


def _compare(session, version, theirs, deciding, known) -> dict:
    """A shadow bundle against the deciding one on the same studies: how often they would make
    the same referral call, and each one's AUC where outcomes are known."""
    bundle = session.get(ModelBundle, version)
    both = [(deciding[i], p) for i, p in theirs.items() if i in deciding]
    agree = [
        (a.probability >= a.threshold and a.assessable) == (s.probability >= bundle.threshold and s.assessable)
        for a, s in both
    ]
    return {
        "n": len(both),
        "agreement": round(sum(agree) / len(agree), 4) if agree else None,
        "auc": _auc([(theirs[i].probability, y) for i, y in known if i in theirs]),
        "active_auc": _auc([(deciding[i].probability, y) for i, y in known if i in deciding]),
        "outcomes": len(known),
    }


def _auc(pairs) -> float | None:
    """The AUC of (score, malignant) pairs (model.metrics), None without both classes."""
    labels = [y for _, y in pairs]
    if len(set(labels)) < 2:
        return None
    return round(metrics.auc(labels, [p for p, _ in pairs]), 4)


def weeks(session: Session, program: Program, count: int = 12, now: dt.datetime | None = None) -> list[Window]:
    """The program's last ``count`` weeks (Monday to Monday), oldest first."""
    this_week = week_start(now or utcnow())
    starts = [this_week - dt.timedelta(weeks=k) for k in range(count - 1, -1, -1)]
    return [window(session, program, s, s + dt.timedelta(weeks=1)) for s in starts]


def rolling(session: Session, program: Program, days: int, now: dt.datetime | None = None) -> Window:
    """The program's last ``days`` days up to now."""
    end = now or utcnow()
    return window(session, program, end - dt.timedelta(days=days), end)


def programs(session: Session) -> list[Program]:
    return list(session.scalars(select(Program).order_by(Program.name)))


def months_with_studies(
    session: Session, program: Program, count: int = 3, now: dt.datetime | None = None
) -> list[str]:
    """Of the program's last ``count`` months (this one first), those in which it had studies
    scored: the months a monthly report has something to say about (``YYYY-MM``)."""
    from sqlalchemy import func

    today = now or utcnow()
    out = []
    for k in range(count):
        year, month = today.year - (today.month <= k), (today.month - k - 1) % 12 + 1
        start = dt.datetime(year, month, 1, tzinfo=dt.UTC)
        end = dt.datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=dt.UTC)
        scored = session.scalar(
            select(func.count()).select_from(Study).where(
                Study.program_id == program.id, Study.status == StudyStatus.DONE, Study.finished_at >= start,
                Study.finished_at < end,
            )
        )  # fmt: skip
        if scored:
            out.append(f"{year}-{month:02d}")
    return out
