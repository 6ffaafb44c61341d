"""Fitting a bundle's camera clamp (:mod:`model.inference.camera`) on its own development images.

``dermascan camera-fit BUNDLE --data DIR --version NEW``: the development rows of the bundle's split
(the calibration set chooses nothing) are decoded and resized as the network gets them (a circular
field's surround filled where the bundle asks), their exposure and colour cast measured, and the
P-th..(100−P)-th percentiles written into the manifest as ``preprocessing.camera`` under a new
version (what the network is given changes, so its scores may). The weights are not touched; the
ONNX package is exported again afterwards (``dermascan export``), so the edge scorer reads the same
ranges. ``dermascan evaluate --shift all`` measures what it does.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import numpy as np

from model.errors import ModelError

log = logging.getLogger(__name__)


def percentiles(text: str):
    """``"20"`` → 20.0; ``"20:0"`` → [20.0, 0.0] (below, above). ModelError for anything else."""
    try:
        values = [float(v) for v in text.split(":")]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise ModelError(f"{text!r}: one percentile (20) or two, below and above (20:0)")
    return values[0] if len(values) == 1 else values


def fit_bundle(bundle_dir, data_dir, version: str, exposure_percentile, colour_percentile: float) -> dict:
    """Write ``preprocessing.camera`` into ``bundle_dir``'s manifest under ``version``; returns the block.
    ``exposure_percentile``: one percentile or a pair (below, above; 0 leaves a side open). A
    percentile of 0 leaves that measure alone; all 0 removes the clamp."""
    from model.inference import camera, field
    from model.inference.bundle import read_manifest, write_manifest
    from model.inference.data import IsicDataset
    from model.training.config import read_config, split_rows

    bundle_dir = Path(bundle_dir)
    for name, value in (("exposure", exposure_percentile), ("colour", colour_percentile)):
        if not np.all((np.asarray(value) >= 0) & (np.asarray(value) < 50)):
            raise ModelError(f"--{name}-percentile {value}: expected 0 (leave it alone) to under 50")
    manifest = read_manifest(bundle_dir, verify=True)
    if version == manifest["version"]:
        raise ModelError(f"{version}: what the network is given changes, so the bundle needs a new version")
    cfg = read_config(bundle_dir)
    dataset = IsicDataset.open(data_dir, limit=cfg.limit)
    split = split_rows(dataset.targets(), dataset.groups(), cfg)
    rows = np.flatnonzero(split >= 0)
    if rows.size == 0:
        raise ModelError(f"{bundle_dir}: its split has no development rows in {data_dir}")
    fill = field.for_manifest(manifest)
    pixels = fill(dataset.load_images(manifest["image_size"], ids=[dataset.ids[i] for i in rows]))
    log.info("camera-fit: %d development images decoded", len(pixels))
    preprocessing = dict(manifest.get("preprocessing") or {})
    if np.any(exposure_percentile) or colour_percentile:
        block = camera.fit(pixels, exposure_percentile, colour_percentile)
        moved = camera.CameraClamp(block).gains(pixels)
        block["development_images_moved"] = round(float(np.mean(np.any(np.abs(moved - 1) > 1e-6, axis=1))), 4)
        preprocessing["camera"] = block
    else:
        block = {}
        preprocessing.pop("camera", None)
    manifest.update(
        {
            "preprocessing": preprocessing,
            "version": version,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "training": {
                **(manifest.get("training") or {}),
                "camera": {"from_version": manifest["version"], "command": "dermascan camera-fit"},
            },
        }
    )
    write_manifest(bundle_dir, manifest)
    log.info("camera-fit: %s written (%s)", version, json.dumps(block)[:300])
    return block
