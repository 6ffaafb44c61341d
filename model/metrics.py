"""Screening metrics: AUC, the ISIC 2024 pAUC above 80 % TPR, operating points, bootstrap CIs.

Pure numpy/scikit-learn; no Keras. ``pauc_above_tpr`` reproduces the ISIC 2024 challenge scorer:
labels and scores are flipped, scikit-learn's McClish-standardised partial AUC is taken with
``max_fpr = 1 - min_tpr`` and then un-standardised back to the range [0, 1 - min_tpr].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def _check(y_true, y_score):
    y_true = np.asarray(y_true).astype(int).ravel()
    y_score = np.asarray(y_score, dtype=float).ravel()
    if y_true.shape != y_score.shape:
        raise ValueError(f"{y_true.size} labels but {y_score.size} scores")
    if len(np.unique(y_true)) != 2:
        raise ValueError("AUC needs both positive and negative cases")
    return y_true, y_score


def auc(y_true, y_score) -> float:
    y_true, y_score = _check(y_true, y_score)
    return float(roc_auc_score(y_true, y_score))


def pauc_above_tpr(y_true, y_score, min_tpr: float = 0.80) -> float:
    """Partial AUC above ``min_tpr`` exactly as the ISIC 2024 scorer computes it (max 1 - min_tpr)."""
    y_true, y_score = _check(y_true, y_score)
    v_gt = np.abs(y_true - 1)
    v_pred = -y_score
    max_fpr = abs(1 - min_tpr)
    partial = roc_auc_score(v_gt, v_pred, max_fpr=max_fpr)
    return float(0.5 * max_fpr**2 + (max_fpr - 0.5 * max_fpr**2) / (1.0 - 0.5) * (partial - 0.5))


@dataclass
class OperatingPoint:
    threshold: float
    sensitivity: float
    specificity: float
    tp: int
    fn: int
    tn: int
    fp: int

    def to_dict(self) -> dict:
        return asdict(self)


def at_threshold(y_true, y_score, threshold: float) -> OperatingPoint:
    """Sensitivity and specificity when ``score >= threshold`` is called positive."""
    y_true = np.asarray(y_true).astype(int).ravel()
    called = np.asarray(y_score, dtype=float).ravel() >= threshold
    tp = int(np.sum(called & (y_true == 1)))
    fn = int(np.sum(~called & (y_true == 1)))
    tn = int(np.sum(~called & (y_true == 0)))
    fp = int(np.sum(called & (y_true == 0)))
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    return OperatingPoint(float(threshold), sens, spec, tp, fn, tn, fp)


def threshold_for_sensitivity(y_true, y_score, target: float = 0.95) -> float:
    """The highest threshold whose sensitivity is at least ``target`` (score >= t is positive)."""
    y_true, y_score = _check(y_true, y_score)
    positives = np.sort(y_score[y_true == 1])
    # Calling the k highest-scoring positives positive needs t <= the k-th highest score.
    k = int(np.ceil(target * positives.size))
    k = min(max(k, 1), positives.size)
    return float(positives[positives.size - k])


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """The Wilson score interval of a proportion ``k`` of ``n`` (95 % by default)."""
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * float(np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def bootstrap_ci(metric, y_true, y_score, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0):
    """Percentile bootstrap CI of ``metric(y_true, y_score)``, resampling cases (stratified)."""
    y_true, y_score = _check(y_true, y_score)
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y_true == 1), np.flatnonzero(y_true == 0)
    values = []
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        values.append(metric(y_true[idx], y_score[idx]))
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def paired_difference(
    metric, y_true, first, second, groups=None, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> dict:
    """``metric(second) - metric(first)`` on the same cases, with a percentile bootstrap interval
    that resamples whole groups (patients: their images are not independent) and draws the same
    resample for both scores, so what the two share cancels out. Also the share of resamples in
    which ``second`` is ahead."""
    y_true, first = _check(y_true, first)
    second = np.asarray(second, dtype=float).ravel()
    if second.shape != first.shape:
        raise ValueError("the two scores are not of the same cases")
    groups = np.arange(y_true.size) if groups is None else np.asarray(groups).ravel()
    if groups.shape != y_true.shape:
        raise ValueError("one group per case")
    _, inverse = np.unique(groups, return_inverse=True)
    members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(np.bincount(inverse))[:-1])
    rng = np.random.default_rng(seed)
    values = []
    while len(values) < n_boot:
        idx = np.concatenate([members[g] for g in rng.integers(0, len(members), len(members))])
        if 0 < y_true[idx].sum() < idx.size:  # both classes, or the metric is undefined
            values.append(metric(y_true[idx], second[idx]) - metric(y_true[idx], first[idx]))
    lo, hi = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return {
        "difference": float(metric(y_true, second) - metric(y_true, first)),
        "ci95": (float(lo), float(hi)),
        "share_ahead": float(np.mean(np.asarray(values) > 0)),
    }


def summary(y_true, y_score, threshold: float | None = None, n_boot: int = 500) -> dict:
    """AUC and pAUC80 with 95 % CIs, counts, and the operating point at ``threshold``."""
    y_true, y_score = _check(y_true, y_score)
    out = {
        "n": int(y_true.size),
        "positives": int(y_true.sum()),
        "negatives": int((1 - y_true).sum()),
        "auc": auc(y_true, y_score),
        "auc_ci95": bootstrap_ci(auc, y_true, y_score, n_boot),
        "pauc80": pauc_above_tpr(y_true, y_score),
        "pauc80_ci95": bootstrap_ci(pauc_above_tpr, y_true, y_score, n_boot),
    }
    if threshold is not None:
        out["operating_point"] = at_threshold(y_true, y_score, threshold).to_dict()
    return out


def roc_png(path, curves: dict, threshold_points: dict | None = None, title: str = "ROC") -> None:
    """Write ROC curves ({label: (y_true, y_score)}) to a PNG, marking operating points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5.5), dpi=110)
    for label, (y_true, y_score) in curves.items():
        fpr, tpr, _ = roc_curve(np.asarray(y_true).astype(int), np.asarray(y_score, dtype=float))
        ax.plot(fpr, tpr, lw=1.6, label=f"{label} (AUC {auc(y_true, y_score):.3f})")
    for label, point in (threshold_points or {}).items():
        ax.plot(1 - point["specificity"], point["sensitivity"], "o", ms=7, label=label)
    ax.axhspan(0.8, 1.0, color="tab:orange", alpha=0.08, label="pAUC region (TPR ≥ 0.8)")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    ax.set(xlabel="1 − specificity (FPR)", ylabel="sensitivity (TPR)", title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
