"""Heat maps for referred studies: made after scoring, on the maintenance queue, stored as blobs on
their prediction rows."""

from __future__ import annotations

import io
import logging
import time

import numpy as np
from PIL import Image

from dermascan.config import Settings
from dermascan.infra.blobs import BlobError, blob_store
from dermascan.infra.db import session_factory
from dermascan.screening import results
from worker.runtime import predictor
from worker.warm import gradcam

log = logging.getLogger(__name__)


def display_image(data: bytes, longest: int = 512) -> np.ndarray:
    """The study image as RGB, at most ``longest`` pixels on its longer side (for overlays)."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        image.thumbnail((longest, longest))
        return np.asarray(image)


def make_heatmaps(settings: Settings, study_ids: list[int]) -> int:
    """Heat-map overlays for referred studies, stored as blobs on their prediction rows (each
    study's image read once)."""
    from model.inference.heatmap import overlay_png

    started = time.perf_counter()
    pred = predictor(settings)
    cam = gradcam(pred)
    blobs = blob_store(settings)
    factory = session_factory(settings.database_url)
    made = 0
    with factory() as session:
        wanted = results.needing_heatmaps(session, study_ids, pred.version)
    for prediction_id, image_sha256, meta in wanted:
        try:
            data = blobs.get(image_sha256)
        except BlobError:
            continue
        prepared = pred.pre_process([data], [meta])
        if prepared.errors:
            continue
        heat = cam.heatmap(prepared.pixels, prepared.meta)
        original = display_image(data)
        resized = Image.fromarray((heat * 255).astype(np.uint8)).resize(original.shape[1::-1], Image.BICUBIC)
        digest = blobs.put(overlay_png(original, np.asarray(resized) / 255.0))
        with factory() as session, session.begin():
            results.set_heatmap(session, prediction_id, digest)
        made += 1
    log.info("heat maps: %d made in %.3f s", made, time.perf_counter() - started)
    return made
