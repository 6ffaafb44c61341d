"""Calibrated probabilities: a monotone map from the ensemble's raw score to the probability of
malignancy, fitted on held-out data (the calibration set no member trained on), shipped in the
bundle (``manifest["calibration"]``) and applied by the predictor.

Candidates: none, temperature (one parameter on the logit), Platt (slope and offset on the
logit) and isotonic regression. :func:`choose` picks the one with the lowest cross-validated log
loss on the calibration set, then refits it on all of it.

The calibrated probability holds at the development data's prevalence (HAM10000: about 19 %
malignant, far above a screening population's). :func:`at_prevalence` re-weighs it for another
prevalence (Bayes' rule on the odds, "prior shift"); the referral decision stays on the
calibrated score and the bundle's threshold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

EPS = 1e-6
METHODS = ("none", "temperature", "platt", "isotonic")


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p / (1 - p))


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -500.0, 500.0)))


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    y = np.asarray(y, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def reliability(y: np.ndarray, p: np.ndarray, bins: int = 10) -> list[dict]:
    """Per equal-width bin: count, mean predicted probability, observed malignant share."""
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        sel = idx == b
        n = int(sel.sum())
        out.append(
            {
                "bin": [b / bins, (b + 1) / bins],
                "n": n,
                "mean_probability": float(p[sel].mean()) if n else None,
                "observed": float(y[sel].mean()) if n else None,
            }
        )
    return out


def ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: the count-weighted mean |mean probability − observed share|
    over equal-width bins."""
    rows = reliability(y, p, bins)
    n = sum(r["n"] for r in rows)
    return float(sum(r["n"] * abs(r["mean_probability"] - r["observed"]) for r in rows if r["n"]) / max(n, 1))


@dataclass
class Calibrator:
    method: str = "none"
    params: dict = field(default_factory=dict)

    def __call__(self, raw) -> np.ndarray:
        raw = np.asarray(raw, dtype=np.float64)
        if self.method == "none":
            out = raw
        elif self.method == "temperature":
            out = _sigmoid(_logit(raw) / self.params["temperature"])
        elif self.method == "platt":
            out = _sigmoid(self.params["slope"] * _logit(raw) + self.params["offset"])
        elif self.method == "isotonic":
            out = np.interp(raw, self.params["x"], self.params["y"])
        else:
            raise ValueError(f"unknown calibration method {self.method!r}")
        return np.clip(out, 0.0, 1.0)

    def to_dict(self) -> dict:
        return {"method": self.method, "params": self.params}

    @classmethod
    def from_dict(cls, data: dict | None) -> Calibrator:
        if not data:
            return cls()
        if data.get("method") not in METHODS:
            raise ValueError(f"unknown calibration method {data.get('method')!r} (one of {', '.join(METHODS)})")
        return cls(data["method"], dict(data.get("params") or {}))

    @classmethod
    def fit(cls, method: str, y: np.ndarray, raw: np.ndarray) -> Calibrator:
        y = np.asarray(y, dtype=np.float64)
        z = _logit(raw)
        if method == "none":
            return cls()
        if method in ("temperature", "platt"):
            from scipy.optimize import minimize

            # the slope (1 / temperature) is fitted on a log scale: the map stays increasing
            def loss(theta):
                b = theta[1] if method == "platt" else 0.0
                return log_loss(y, _sigmoid(np.exp(theta[0]) * z + b))

            start = [0.0] if method == "temperature" else [0.0, 0.0]
            theta = minimize(loss, start, method="Nelder-Mead", options={"xatol": 1e-7, "fatol": 1e-10}).x
            if method == "temperature":
                return cls("temperature", {"temperature": float(np.exp(-theta[0]))})
            return cls("platt", {"slope": float(np.exp(theta[0])), "offset": float(theta[1])})
        if method == "isotonic":
            from sklearn.isotonic import IsotonicRegression

            iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip", increasing=True)
            iso.fit(np.asarray(raw, dtype=np.float64), y)
            return cls("isotonic", {"x": iso.X_thresholds_.tolist(), "y": iso.y_thresholds_.tolist()})
        raise ValueError(f"unknown calibration method {method!r} (one of {', '.join(METHODS)})")


def choose(y: np.ndarray, raw: np.ndarray, folds: int = 5, seed: int = 0) -> tuple[Calibrator, dict]:
    """The method with the lowest cross-validated log loss on (y, raw), refitted on all of it;
    and the cross-validated log loss and ECE of every candidate."""
    from sklearn.model_selection import StratifiedKFold

    y, raw = np.asarray(y).astype(int), np.asarray(raw, dtype=np.float64)
    folds = max(2, min(folds, int(y.sum()), int((1 - y).sum())))
    report = {}
    for method in METHODS:
        out = np.zeros(y.size)
        for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(raw, y):
            out[test] = Calibrator.fit(method, y[train], raw[train])(raw[test])
        report[method] = {"cv_log_loss": log_loss(y, out), "cv_ece": ece(y, out)}
    best = min(METHODS, key=lambda m: report[m]["cv_log_loss"])
    return Calibrator.fit(best, y, raw), report


def at_prevalence(p, from_prevalence: float, to_prevalence: float) -> np.ndarray:
    """Probability re-weighed from the prevalence it was calibrated at to another (prior shift):
    the odds are multiplied by the ratio of the prior odds."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    if not (0 < from_prevalence < 1 and 0 < to_prevalence < 1):
        raise ValueError("prevalences must lie strictly between 0 and 1")
    ratio = (to_prevalence / (1 - to_prevalence)) / (from_prevalence / (1 - from_prevalence))
    return p * ratio / (p * ratio + (1 - p))
