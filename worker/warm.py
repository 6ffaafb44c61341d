"""Warming up: every batch shape once before taking work, then Grad-CAM in a thread (a heat map
task waits for it rather than tracing it twice)."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from dermascan.config import Settings
from dermascan.infra.broker import STARTING
from dermascan.infra.db import session_factory
from worker.runtime import predictor, register_bundle

log = logging.getLogger(__name__)
_process_state: dict = {}  # this process's Grad-CAM of its predictor


WARM = "warm: taking work"  # logged when every batch shape has run once (scoring is warm)

HEATMAPS_WARM = "heat maps warm"  # logged when Grad-CAM has run once (it warms after scoring)


def warm_up(settings: Settings) -> None:
    """Load the bundle, run every fixed batch shape once, then take work; Grad-CAM warms up in a
    thread meanwhile (the first heat map waits for it instead of tracing it twice)."""
    try:
        log.info("%sloading the model bundle %s…", STARTING, settings.model_bundle)
        pred = predictor(settings)
        with session_factory(settings.database_url)() as session, session.begin():
            register_bundle(settings, session)
        shapes = len(pred.batch_sizes)
        log.info("%swarming up %d batch shape(s) %s (seconds to a minute)…", STARTING, shapes, pred.batch_sizes)
        pred.warm_up(
            progress=lambda done, size, seconds: log.info(
                "%sbatch shape %d warm (%d of %d, %.0f s)", STARTING, size, done, shapes, seconds
            )
        )
    except Exception:  # the first task will raise the same error with its context
        log.exception("warm-up failed")
        return
    log.info(WARM)
    threading.Thread(target=_warm_gradcam, args=(pred,), name="gradcam-warm-up", daemon=True).start()


_gradcam_lock = threading.Lock()


def _warm_gradcam(pred) -> None:
    t0 = time.perf_counter()
    try:
        gradcam(pred).heatmap(np.zeros((1, *pred.image_shape, 3), np.uint8), np.zeros((1, pred.spec.dim), np.float32))
    except Exception:  # the first heat map task raises the same error with its context
        log.exception("Grad-CAM warm-up failed")
        return
    log.info("%s%s (Grad-CAM ready in %.1f s)", STARTING, HEATMAPS_WARM, time.perf_counter() - t0)


def gradcam(pred):
    """The process's Grad-CAM of the loaded bundle's network. While the warm-up thread traces it,
    a heat map task waits here for it."""
    from model.inference.gradcam import for_predictor

    with _gradcam_lock:
        cam = _process_state.get("gradcam")
        if cam is None or cam[0] is not pred:
            cam = _process_state["gradcam"] = (pred, _Traced(for_predictor(pred)))
    return cam[1]


class _Traced:
    """A Grad-CAM whose calls run one at a time (the warm-up thread and a task never trace it
    twice, side by side)."""

    def __init__(self, cam):
        self._cam, self._lock = cam, threading.Lock()

    def heatmap(self, pixels, meta):
        with self._lock:
            return self._cam.heatmap(pixels, meta)
