"""Warming up: everything a worker's first task touches runs once before it takes work — every
batch shape and a JPEG decode (``Predictor.warm_up``), Grad-CAM (where this worker draws heat
maps), the database, the broker's producer and the follow-up path. Nothing is left to warm in a
thread beside the first tasks: building the ONNX Runtime session of Grad-CAM holds the
interpreter lock for a second or two, which stalled the first tasks' claims, decodes and writes
(measured: the first task of a bulk run took 2.8 s instead of 0.5 s, a fifth of a 1,000-study
run's wall time)."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np

from dermascan.config import Settings
from dermascan.infra import broker
from dermascan.infra.broker import STARTING
from dermascan.infra.db import session_factory
from worker.runtime import predictor, register_bundle

log = logging.getLogger(__name__)
_process_state: dict = {}  # this process's Grad-CAM of its predictor


WARM = "warm: taking work"  # logged when everything the first task touches has run once

HEATMAPS_WARM = "heat maps warm"  # logged when Grad-CAM has run once (before WARM, in a worker that draws maps)

FOLLOW_UP_WARM = "follow-up path warm"  # logged when the delivery scheduling and the producer have run (before WARM)


def warm_up(settings: Settings, heatmaps: bool = True) -> None:
    """Load the bundle, run every fixed batch shape once, Grad-CAM once (``heatmaps``: this worker
    takes the maintenance queue, where heat maps go), open the database and the broker and load
    the follow-up path; then take work."""
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
    if heatmaps:
        _warm_gradcam(pred)
    _warm_follow_up(settings)
    log.info(WARM)


def _warm_follow_up(settings: Settings) -> None:
    """What a score task does after its write: the delivery scheduling (its imports and a query)
    and the broker's producer connection. A failure here is only logged: the task meets it again
    and handles it as it does now (a broker that is down is logged there, never raised)."""
    t0 = time.perf_counter()
    try:
        from dermascan.results_out import scheduling

        scheduling.schedule(settings, [])
        with broker.celery_for(settings).producer_or_acquire() as producer:
            producer.connection.ensure_connection(max_retries=1)
    except Exception as exc:
        log.warning("warming up the follow-up path failed (%s); the first task will meet it", exc)
        return
    log.info("%s%s (%.2f s)", STARTING, FOLLOW_UP_WARM, time.perf_counter() - t0)


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
    """The process's Grad-CAM of the loaded bundle's network, built once (by the warm-up, or by the
    first heat map where the warm-up was off or failed); callers in other threads wait for it."""
    from model.inference.gradcam import for_predictor

    with _gradcam_lock:
        cam = _process_state.get("gradcam")
        if cam is None or cam[0] is not pred:
            cam = _process_state["gradcam"] = (pred, _Traced(for_predictor(pred)))
    return cam[1]


class _Traced:
    """A Grad-CAM whose calls run one at a time (two threads never run its session side by side)."""

    def __init__(self, cam):
        self._cam, self._lock = cam, threading.Lock()

    def heatmap(self, pixels, meta):
        with self._lock:
            return self._cam.heatmap(pixels, meta)
