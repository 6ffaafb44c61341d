"""Evaluate a bundle on any folder in the ISIC-2024 layout: AUC, pAUC80, and sensitivity and
specificity at the bundle's threshold, with counts and bootstrap confidence intervals; the
calibration (ECE, reliability per bin); and the not-assessable gate (how many images it flags,
why, and the metrics on the assessable ones)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from model import metrics
from model.inference import calibration
from model.inference.data import IsicDataset


def evaluate(
    bundle_dir, data_dir, *, tta: bool | None = None, batch: int = 256, progress=None, limit: int | None = None
) -> dict:
    from model.inference.predictor import Predictor

    t0 = time.time()
    predictor = Predictor(bundle_dir)
    if tta is None:
        tta = bool(predictor.bundle.manifest.get("inference", {}).get("tta", False))
    predictor.tta = tta
    dataset = IsicDataset.open(data_dir, limit=limit)
    y = dataset.targets()
    ids = dataset.ids
    meta = predictor.spec.transform(dataset.metadata)
    scores = np.zeros(len(ids), dtype=np.float32)
    reasons: list = []
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        sizes = np.zeros((len(chunk), 2), np.float32)
        pixels = dataset.load_images(predictor.image_size, chunk, sizes=sizes)
        predicted = predictor.predict(pixels, meta[start : start + len(chunk)])
        scores[start : start + len(chunk)] = predicted.probability
        reasons += predictor.gate.reasons(pixels, sizes, predicted.features)[0]
        if progress:
            progress(len(chunk))
    threshold = predictor.threshold
    result = metrics.summary(y, scores, threshold, n_boot=1000)
    result.update(
        {
            "bundle": predictor.version,
            "threshold": threshold,
            "tta": tta,
            "data": str(Path(data_dir).resolve()),
            "seconds": round(time.time() - t0, 1),
            "calibration": {
                "method": predictor.calibrator.method,
                "ece": calibration.ece(y, scores),
                "log_loss": calibration.log_loss(y, scores),
                "reliability": calibration.reliability(y, scores),
            },
            "gate": gate_summary(y, scores, reasons, threshold),
        }
    )
    return result


def gate_summary(y: np.ndarray, scores: np.ndarray, reasons: list, threshold: float) -> dict:
    """How many images the gate flags (and why), and the metrics on the assessable ones."""
    flagged = np.array([r is not None for r in reasons], dtype=bool)
    by_reason: dict[str, int] = {}
    for r in reasons:
        if r is not None:
            by_reason[r] = by_reason.get(r, 0) + 1
    out = {
        "n": int(flagged.size),
        "not_assessable": int(flagged.sum()),
        "not_assessable_share": float(flagged.mean()) if flagged.size else 0.0,
        "reasons": by_reason,
        "malignant_flagged": int((flagged & (y == 1)).sum()),
    }
    keep = ~flagged
    if keep.any() and len(np.unique(y[keep])) == 2:
        out["assessable"] = {
            "auc": metrics.auc(y[keep], scores[keep]),
            "pauc80": metrics.pauc_above_tpr(y[keep], scores[keep]),
            "operating_point": metrics.at_threshold(y[keep], scores[keep], threshold).to_dict(),
        }
    return out


def write(result: dict, path) -> None:
    Path(path).write_text(json.dumps(result, indent=2))
