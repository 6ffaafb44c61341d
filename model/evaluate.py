"""Evaluate a bundle on any folder in the ISIC-2024 layout: AUC, pAUC80, and sensitivity and
specificity at the bundle's threshold, with counts and bootstrap confidence intervals."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from model import metrics
from model.data import IsicDataset


def evaluate(
    bundle_dir, data_dir, *, tta: bool | None = None, batch: int = 256, progress=None, limit: int | None = None
) -> dict:
    from model.predictor import Predictor

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
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        pixels = dataset.load_images(predictor.image_size, chunk)
        mean, _ = predictor.predict(pixels, meta[start : start + len(chunk)])
        scores[start : start + len(chunk)] = mean
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
        }
    )
    return result


def write(result: dict, path) -> None:
    Path(path).write_text(json.dumps(result, indent=2))
