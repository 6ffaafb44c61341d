"""Evaluate a bundle on any folder in the ISIC-2024 layout: AUC, pAUC80, and sensitivity and
specificity at the bundle's threshold, with counts and bootstrap confidence intervals; the
calibration (ECE, reliability per bin); the not-assessable gate (how many images it flags,
why, and the metrics on the assessable ones); and, for a bundle with the differential, its
balanced accuracy, per-class recall and melanoma AUC on the rows that name a diagnosis."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from model import metrics
from model.inference import calibration, diagnosis
from model.inference.data import IsicDataset


def _field_of_view(pixels: np.ndarray) -> np.ndarray:
    """Black outside a centred disc touching the image's sides (a contact dermatoscope's field)."""
    h, w = pixels.shape[1:3]
    rows, cols = np.linspace(-1, 1, h)[:, None], np.linspace(-1, 1, w)[None, :]
    disc = (np.sqrt(rows**2 + cols**2) <= 1.0).astype(np.float32)
    return pixels * disc[None, :, :, None]


# Another camera, fixed and repeatable (the same change on every image), for measuring what the
# training's camera augmentation buys: each maps uint8 pixels (n, h, w, 3) to float values
SHIFTS = {
    "none": ("as taken", lambda p: p.astype(np.float32)),
    "white-balance": ("white balance: red ×0.9, blue ×1.1", lambda p: p * np.array([0.9, 1.0, 1.1], np.float32)),
    "darker": ("exposure −20 %", lambda p: p * np.float32(0.8)),
    "brighter": ("exposure +20 %", lambda p: p * np.float32(1.2)),
    "field-of-view": ("a circular field of view, black outside", _field_of_view),
}


def shifted(pixels: np.ndarray, shift: str) -> np.ndarray:
    if shift not in SHIFTS:
        raise ValueError(f"unknown shift {shift!r}: one of {', '.join(SHIFTS)}")
    return np.clip(np.rint(SHIFTS[shift][1](pixels)), 0, 255).astype(np.uint8)


def evaluate(
    bundle_dir, data_dir, *, tta: bool | None = None, batch: int = 256, progress=None, limit: int | None = None,
    shift: str = "none", rows: np.ndarray | None = None, predictor=None,
) -> dict:  # fmt: skip
    """``shift``: a fixed change of camera (:data:`SHIFTS`) applied to every image before it is
    scored; ``rows``: only these rows of the folder (e.g. a training run's calibration set);
    ``predictor``: the bundle's Predictor when the caller already has it (one load for many shifts)."""
    from model.inference.predictor import Predictor

    t0 = time.time()
    predictor = predictor or Predictor(bundle_dir)
    if tta is None:
        tta = bool(predictor.bundle.manifest.get("inference", {}).get("tta", False))
    predictor.tta = tta
    dataset = IsicDataset.open(data_dir, limit=limit)
    y = dataset.targets()
    ids = dataset.ids
    meta = predictor.spec.transform(dataset.metadata)
    truth = diagnosis.labels(dataset.metadata)  # the differential's classes (-1: no diagnosis)
    if rows is not None:
        y, ids, meta, truth = y[rows], [ids[i] for i in rows], meta[rows], truth[rows]
    scores = np.zeros(len(ids), dtype=np.float32)
    classes = None  # the differential as served, for a bundle that has one
    reasons: list = []
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        sizes = np.zeros((len(chunk), 2), np.float32)
        filled = predictor.fill(shifted(dataset.load_images(predictor.image_size, chunk, sizes=sizes), shift))
        predicted = predictor.predict(predictor.correct(filled), meta[start : start + len(chunk)])
        scores[start : start + len(chunk)] = predicted.probability
        if predicted.classes is not None:
            if classes is None:
                classes = np.zeros((len(ids), predicted.classes.shape[1]), np.float32)
            classes[start : start + len(chunk)] = predictor.differential(predicted.classes)
        reasons += predictor.gate.reasons(filled, sizes, predicted.features)[0]  # measured as they came
        if progress:
            progress(len(chunk))
    threshold = predictor.threshold
    result = metrics.summary(y, scores, threshold, n_boot=1000)
    result.update(
        {
            "bundle": predictor.version,
            "threshold": threshold,
            "tta": tta,
            "shift": shift,
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
    if classes is not None:
        # ISIC 2018's figures on the rows that name a diagnosis (none: the folder has no diagnosis column)
        result["diagnosis"] = diagnosis.figures(truth, classes) if (truth >= 0).any() else {"n": 0}
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
