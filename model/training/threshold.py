"""The referral threshold: one rule, in one place, for every bundle ``train`` or ``distill`` makes.

The rule: on a **ruler** — held-out scores of the shipped recipe, as many as there are — the
threshold is the calibrated score that refers the aimed share of the ruler's malignant lesions
(``target``). No margin and no level borrowed from elsewhere: on a large, representative ruler
the quantile itself is steady (with 1,400 malignant lesions its standard error is about half a
point of sensitivity).

The rule is checked the way it is used: the ruler comes in patient-disjoint parts (the folds of a
cross-fitted training; the calibration set; patient-grouped parts of a small held-out set), and
for each part the threshold is fitted on the others and applied to it. How far the sensitivity
lands from its aim, part by part, is the rule's own spread (``Rule.check``); what a program sees
on a cohort of its own size adds the cohort's binomial noise (:func:`cohort_spread`).

Before (three bundles in a row) every threshold was a quantile of one fixed calibration set of
209 malignant lesions that proved harder than new patients: it landed near 0.99 sensitivity on a
hidden holdout where it aimed at about 0.956, referring half of the benign lesions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


def level_threshold(positives: np.ndarray, level: float) -> float:
    """The highest score that refers at least ``level`` of ``positives`` (score >= threshold)."""
    positives = np.sort(np.asarray(positives, np.float64))
    if positives.size == 0:
        raise ValueError("no malignant lesion to take a threshold on")
    missed = int(np.floor((1.0 - level) * positives.size + 1e-9))
    return float(positives[min(missed, positives.size - 1)])


@dataclass
class Rule:
    target: float
    threshold: float
    ruler: dict  # what the ruler is: its size, malignant lesions, parts
    check: dict = field(default_factory=dict)  # fitted without each part, applied to it
    description: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def choose(y: np.ndarray, scores: np.ndarray, parts: np.ndarray, target: float, what: str = "") -> Rule:
    """The threshold on the ruler (``y``, calibrated ``scores``, patient-disjoint ``parts``) at
    ``target`` sensitivity, with the rule's check part by part."""
    y, scores, parts = np.asarray(y).astype(int), np.asarray(scores, np.float64), np.asarray(parts)
    threshold = level_threshold(scores[y == 1], target)
    rows = []
    for part in np.unique(parts):
        inside, outside = parts == part, parts != part
        if not (y[inside] == 1).any() or not (y[outside] == 1).any():
            continue
        t = level_threshold(scores[outside & (y == 1)], target)
        rows.append({
            "part": str(part), "malignant": int((y[inside] == 1).sum()), "benign": int((y[inside] == 0).sum()),
            "threshold": t,
            "sensitivity": float(np.mean(scores[inside & (y == 1)] >= t)),
            "specificity": float(np.mean(scores[inside & (y == 0)] < t)) if (y[inside] == 0).any() else None,
        })  # fmt: skip
    sens = np.array([r["sensitivity"] for r in rows])
    weights = np.array([r["malignant"] for r in rows], np.float64)
    check = {
        "parts": rows,
        "sensitivity_mean": float(np.average(sens, weights=weights)) if rows else None,
        "sensitivity_min": float(sens.min()) if rows else None,
        "sensitivity_max": float(sens.max()) if rows else None,
        "off_target_mean": float(np.average(sens, weights=weights) - target) if rows else None,
    }
    ruler = {"n": int(y.size), "malignant": int(y.sum()), "parts": int(np.unique(parts).size), "what": what}
    description = (
        f"the calibrated score that refers {target:.3f} of the ruler's malignant lesions ({ruler['malignant']} of "
        f"{ruler['n']} held-out images: {what}); fitted without each of its {ruler['parts']} patient-disjoint parts "
        f"and applied to it, the sensitivity lands at {check['sensitivity_mean']:.3f} on average "
        f"({check['sensitivity_min']:.3f}–{check['sensitivity_max']:.3f})"
        if rows
        else f"the calibrated score that refers {target:.3f} of the ruler's malignant lesions"
    )
    return Rule(target, threshold, ruler, check, description)


def grouped_parts(groups: np.ndarray, y: np.ndarray, k: int = 5, seed: int = 0) -> np.ndarray:
    """Patient-disjoint parts of a held-out set (stratified by target), for the rule's check when
    the ruler is one set."""
    from sklearn.model_selection import StratifiedGroupKFold

    parts = np.zeros(len(y), dtype=int)
    k = max(2, min(k, int(np.sum(y == 1)), int(np.sum(y == 0))))
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for i, (_, rows) in enumerate(splitter.split(np.zeros(len(y)), y, groups)):
        parts[rows] = i
    return parts


def cohort_spread(rule: Rule, sizes=(50, 200, 1000), draws: int = 4000, seed: int = 0) -> list[dict]:
    """What a program with ``m`` malignant lesions should expect to measure: the rule's own
    sensitivity from part to part, plus its cohort's binomial noise (5th–95th percentile, and the
    chance of measuring below 0.90)."""
    rng = np.random.default_rng(seed)
    landed = np.array([r["sensitivity"] for r in rule.check.get("parts", [])])
    landed = landed if landed.size else np.array([rule.target])
    out = []
    for m in sizes:
        true = rng.choice(landed, size=draws)
        seen = rng.binomial(m, np.clip(true, 0, 1)) / m
        out.append({
            "malignant_lesions": int(m), "mean": round(float(seen.mean()), 4),
            "p05": round(float(np.percentile(seen, 5)), 4), "p95": round(float(np.percentile(seen, 95)), 4),
            "below_0_90": round(float(np.mean(seen < 0.90)), 4),
        })  # fmt: skip
    return out
