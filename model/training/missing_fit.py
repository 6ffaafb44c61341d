"""Fitting a bundle's maps for missing metadata (:mod:`model.inference.missing`) on its own held-out rows.

``dermascan missing-fit BUNDLE --data DIR``: the bundle scores its held-out calibration set (the
patients none of its networks trained on, from the split in its manifest) once with every field
as sent and once per pattern of hidden fields, with the flips its manifest asks for; a Platt map
per pattern is fitted there and written into the manifest beside a report of what each pattern
does at the bundle's threshold.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from model.errors import ModelError
from model.inference import missing

log = logging.getLogger(__name__)


def held_out_scores(predictor, pixels: np.ndarray, meta: np.ndarray, fields: list[str]) -> dict:
    """Raw scores (views × n) with nothing hidden (``()``) and with each pattern of ``fields``
    hidden."""
    out = {(): predictor.predict_raw(pixels, meta)[0]}
    for pattern in missing.patterns(fields):
        out[pattern] = predictor.predict_raw(pixels, missing.hide(predictor.spec, meta, pattern))[0]
        log.info("missing metadata: scored the held-out rows without %s", " and ".join(pattern))
    return out


def fit_bundle(bundle_dir, data_dir) -> dict:
    """Fit and write ``manifest["missing_metadata"]`` of a bundle; returns the block."""
    from model.inference.data import IsicDataset
    from model.inference.predictor import Predictor
    from model.training.config import read_config, split_rows

    bundle_dir = Path(bundle_dir)
    predictor = Predictor(
        bundle_dir, tta=bool(json.loads((bundle_dir / "manifest.json").read_text()).get("inference", {}).get("tta"))
    )
    cfg = read_config(bundle_dir)
    dataset = IsicDataset.open(data_dir, limit=cfg.limit)
    y = dataset.targets()
    split = split_rows(y, dataset.groups(), cfg)
    rows = np.flatnonzero(split < 0)
    if rows.size == 0 or y[rows].sum() == 0:
        raise ModelError(f"{bundle_dir}: its split holds out no calibration set with malignant lesions to fit on")
    # as the network is given them when it serves (a circular field filled, the camera clamp)
    pixels = predictor.conform(dataset.load_images(predictor.image_size, ids=[dataset.ids[i] for i in rows]))
    meta = predictor.spec.transform(dataset.metadata.iloc[rows])
    fields = predictor.spec.columns
    scores = held_out_scores(predictor, pixels, meta, fields)
    fitted = missing.fit(y[rows], scores, fields, predictor.threshold, predictor.calibrator)
    fitted.report["fitted_on"] = "the bundle's held-out calibration set (patients no network of it trained on)"
    block = fitted.to_dict()
    path = bundle_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["missing_metadata"] = block
    path.write_text(json.dumps(manifest, indent=2))
    return block
