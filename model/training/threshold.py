"""A referral threshold that lands on its target for new patients, and the spread to expect.

The threshold is taken on the held-out calibration set: the score that refers a share ``level`` of
its malignant lesions. Taken at ``level = target`` with a bootstrap margin on top, the earlier
rules landed about three points of sensitivity above target on new patients, at about ten points
of specificity. Which level makes the *expected* sensitivity on new patients equal the target is
not a matter of formula alone: malignant lesions come in patient groups, and a calibration set
is one draw of them. So it is measured, by resampling the development data the way a deployment
meets it — many times, a calibration-sized set of patients is drawn (patient-grouped) from a
pool of held-out scores, the threshold is taken on it at each candidate level, and the
sensitivity that threshold reaches on the pool's other patients is recorded. The level whose
mean lands in the band (0.95–0.965 by default, aiming at its middle) is the rule.

The rule is rank-based (a quantile of the calibration set's malignant scores), so the pool may
be scored by other models of the same recipe than the one that ships: the members' out-of-fold
scores of the development data (thousands of malignant lesions from patients they never trained
on) are the pool, as they are the only large held-out data there is.

The same resampling says what a program should expect on a cohort of its own size: the shipped
threshold's sensitivity varies from one calibration draw to the next (the rule's spread) and,
on a cohort of ``m`` malignant lesions, by the binomial noise of that cohort (:func:`cohort_spread`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from model import metrics
from model.metrics import _at_level

if TYPE_CHECKING:
    from model.training.config import TrainConfig


@dataclass
class LevelOutcome:
    level: float
    mean: float  # mean sensitivity on new patients over the resamples
    sd: float
    low: float  # 5th percentile
    high: float  # 95th percentile
    draws: np.ndarray  # per resample: the sensitivity on the pool's other patients

    def as_dict(self) -> dict:
        return {"level": round(self.level, 4), "mean": round(self.mean, 4), "sd": round(self.sd, 4),
                "p05": round(self.low, 4), "p95": round(self.high, 4)}  # fmt: skip


def simulate(
    scores: np.ndarray,
    groups: np.ndarray,
    n_calibration: int,
    levels,
    repeats: int = 400,
    seed: int = 0,
) -> list[LevelOutcome]:
    """For each level: the sensitivity on new patients of the threshold taken at that level on a
    patient-grouped draw of ``n_calibration`` malignant lesions (``scores``/``groups``: the pool's
    malignant lesions and their patients)."""
    scores, groups = np.asarray(scores, float), np.asarray(groups)
    if scores.size < 2 * n_calibration:
        raise ValueError(f"a pool of {scores.size} malignant lesions is too small for draws of {n_calibration}")
    names, index = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(index == g) for g in range(names.size)]
    rng = np.random.default_rng(seed)
    levels = [float(v) for v in levels]
    results = np.zeros((len(levels), repeats))
    for r in range(repeats):
        order = rng.permutation(names.size)
        taken, count = [], 0
        for g in order:
            if count >= n_calibration:
                break
            taken.append(members[g])
            count += members[g].size
        cal = np.concatenate(taken)
        rest = np.ones(scores.size, bool)
        rest[cal] = False
        for i, level in enumerate(levels):
            threshold = _at_level(scores[cal], level)
            results[i, r] = float(np.mean(scores[rest] >= threshold))
    return [
        LevelOutcome(
            level, float(d.mean()), float(d.std()), float(np.quantile(d, 0.05)), float(np.quantile(d, 0.95)), d
        )
        for level, d in zip(levels, results, strict=True)
    ]


def choose_level(outcomes: list[LevelOutcome], band: tuple[float, float] = (0.95, 0.965)) -> LevelOutcome:
    """The level whose expected sensitivity on new patients is nearest the band's middle (among
    those inside the band when there are any)."""
    middle = sum(band) / 2
    inside = [o for o in outcomes if band[0] <= o.mean <= band[1]]
    return min(inside or outcomes, key=lambda o: abs(o.mean - middle))


def cohort_spread(outcome: LevelOutcome, sizes=(50, 200, 1000), seed: int = 0) -> list[dict]:
    """The sensitivity a program sees on a cohort of ``m`` malignant lesions: the rule's own
    spread (which threshold this calibration draw gave) plus the cohort's binomial noise —
    mean and the 5th–95th percentile range."""
    rng = np.random.default_rng(seed)
    out = []
    for m in sizes:
        seen = rng.binomial(m, np.clip(np.repeat(outcome.draws, 20), 0, 1)) / m
        out.append({"malignant_lesions": int(m), "mean": round(float(seen.mean()), 4),
                    "p05": round(float(np.quantile(seen, 0.05)), 4), "p95": round(float(np.quantile(seen, 0.95)), 4),
                    "below_0.90": round(float(np.mean(seen < 0.90)), 4)})  # fmt: skip
    return out


def threshold_at(calibrated_positives: np.ndarray, level: float) -> float:
    """The highest threshold referring ``level`` of these (calibrated) malignant scores."""
    return _at_level(np.asarray(calibrated_positives, float), level)


def referral_threshold(y: np.ndarray, oof: np.ndarray, fold: np.ndarray, cfg: TrainConfig) -> float:
    """The referral threshold from out-of-fold predictions: the highest one that reaches the
    target sensitivity in ``threshold_confidence`` of bootstrap resamples of the pooled positives
    **and** on each fold's own validation set (each a different group of patients that its model
    never saw: how much sensitivity moves from one cohort to the next)."""
    covered = ~np.isnan(oof)
    threshold = metrics.conservative_threshold(
        y[covered], oof[covered], cfg.target_sensitivity, cfg.threshold_confidence
    )
    for k in np.unique(fold[covered]):
        own = covered & (fold == k)
        if y[own].any():
            threshold = min(threshold, metrics.threshold_for_sensitivity(y[own], oof[own], cfg.target_sensitivity))
    return float(threshold)
