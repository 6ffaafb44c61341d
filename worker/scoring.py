"""Batched scoring in the worker: claim → read + decode (thread pool, overlapped with the model)
→ predict → write predictions, statuses and referrals in one transaction.

One study whose image cannot be read or decoded fails alone, with its reason; the rest of its
batch is scored. The predictor is loaded once per worker process, after the fork.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from dermascan.config import MissingExtra, Settings
from dermascan.governance import bundles
from dermascan.infra.blobs import BlobError, BlobUnavailable, blob_store
from dermascan.infra.broker import STARTING
from dermascan.infra.db import session_factory
from dermascan.infra.schema import ModelBundle, Prediction, Study, utcnow
from dermascan.screening import results

log = logging.getLogger(__name__)

_process_state: dict = {}


def lease_owner() -> str:
    """This worker process's name on the leases it holds: host, pid and a random part (a pid is
    reused after a restart; the lease of the process before must not look like ours)."""
    current = _process_state.get("owner")
    if current is None or current[0] != os.getpid():
        import secrets
        import socket

        name = f"{socket.gethostname()[:60]}:{os.getpid()}:{secrets.token_hex(4)}"
        current = _process_state["owner"] = (os.getpid(), name)
    return current[1]


class Heartbeat:
    """Renews this process's leases every third of the lease, from a thread of its own — the
    process's pulse, not the task's: a task busy in a long forward pass keeps its studies, a
    process that is gone (killed, frozen) loses them within one lease."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="lease-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self.thread.start()
        return self

    def _run(self) -> None:
        factory = session_factory(self.settings.database_url)
        while not self.stop.wait(max(1.0, self.settings.lease_s / 3)):
            try:
                with factory() as session, session.begin():
                    results.renew_leases(session, lease_owner(), self.settings.lease_s)
            except Exception as exc:  # the database is restarting: the next beat tries again
                log.warning("lease heartbeat failed: %s", exc)


class TransientError(Exception):
    """The database was unreachable: the task is retried (nothing was written)."""


class BundleNotActive(TransientError):
    """This worker's bundle is registered but not the deployment's active one: it takes no work
    (nothing is claimed) until an admin activates it; the message is retried later."""


def predictor(settings: Settings):
    """This process's predictor, loaded on first use. Loading touches no database: recording the
    bundle there is its own act (:func:`register_bundle`)."""
    current = _process_state.get("predictor")
    if current is None:
        current = _process_state["predictor"] = load_predictor(settings)
    return current


def load_predictor(settings: Settings):
    """The configured bundle as a Predictor, with the TTA setting it recommends unless overridden."""
    import keras

    from model.bundle import read_manifest
    from model.predictor import Predictor

    manifest = read_manifest(settings.model_bundle, verify=False)
    tta = settings.tta if settings.tta is not None else bool(manifest.get("inference", {}).get("tta", False))
    loaded = Predictor(
        settings.model_bundle,
        batch_sizes=settings.predict_batch_sizes,
        tta=tta,
        mixed_precision=settings.mixed_precision,
        onnx_package=_runtime_package(settings, manifest),
    )
    log.info(
        "loaded bundle %s (tta=%s, backend %s, runtime %s)",
        loaded.version,
        tta,
        keras.backend.backend(),
        loaded.runtime,
    )
    return loaded


def _runtime_package(settings: Settings, manifest: dict) -> Path | None:
    """The ONNX package the forward pass runs on, or None for Keras (DERMASCAN_RUNTIME)."""
    import keras

    runtime = settings.runtime
    if runtime not in ("auto", "keras", "onnxruntime"):
        raise ValueError(f"DERMASCAN_RUNTIME={runtime!r}: auto, keras or onnxruntime")
    if runtime == "keras" or (runtime == "auto" and keras.backend.backend() != "tensorflow"):
        return None
    try:
        return onnx_package(settings, manifest)
    except MissingExtra as exc:
        log.warning("%s; scoring with Keras instead", exc)
        return None


def onnx_package(settings: Settings, manifest: dict) -> Path:
    """The bundle's ONNX package: shipped inside the bundle (``onnx/``, exported from these very
    weights), else exported once into the data directory (about half a minute; needs the
    ``export`` extra) and reused by every worker that starts with this bundle."""
    from dermascan.config import require_extra

    require_extra("onnxruntime", "edge", "DERMASCAN_RUNTIME=onnxruntime")
    shipped = Path(settings.model_bundle) / "onnx"
    if (shipped / "manifest.json").is_file():
        package = json.loads((shipped / "manifest.json").read_text())
        if package.get("source", {}).get("weights_sha256") == manifest["weights_sha256"]:
            return shipped
    folder = Path(settings.data_dir) / "onnx" / f"{manifest['version']}-{manifest['weights_sha256'][:12]}"
    if not (folder / "manifest.json").is_file():
        require_extra("tf2onnx", "export", "DERMASCAN_RUNTIME=onnxruntime (the first export of a bundle)")
        from model.export import export

        log.info("%sexporting the bundle to ONNX once (%s)…", STARTING, folder)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        export(settings.model_bundle, "onnx", tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another worker finished the same export first: use its copy
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def register_bundle(settings: Settings, session) -> ModelBundle:
    """Record this worker's bundle in the deployment (activated only when none is active yet); a
    bundle that is not active takes no work, and the worker says so."""
    row = bundles.register_for_worker(session, settings.model_bundle)
    if not row.active:
        log.warning(
            "bundle %s is registered but not active: this worker takes no work until an admin runs "
            "`dermascan bundle activate %s`", row.version, row.version,
        )  # fmt: skip
    return row


def shadow_predictors(settings: Settings, rows) -> dict:
    """Predictors of the bundles in shadow (loaded once per process from their registered path;
    a bundle this machine does not have is skipped, with a warning, until it does)."""
    from model.predictor import Predictor

    loaded = _process_state.setdefault("shadows", {})
    out = {}
    for row in rows:
        if row.version not in loaded:
            if not Path(row.path).is_dir():
                if row.version not in _process_state.setdefault("missing", set()):
                    log.warning("shadow bundle %s is not at %s on this machine: not scored here", row.version, row.path)
                    _process_state["missing"].add(row.version)
                continue
            loaded[row.version] = Predictor(
                row.path, batch_sizes=settings.predict_batch_sizes, tta=predictor(settings).tta,
                mixed_precision=settings.mixed_precision,
            )  # fmt: skip
            log.info("loaded shadow bundle %s", row.version)
        out[row.version] = loaded[row.version]
    return out


def _score_in_shadow(version: str, shadow, items, images) -> list[results.ScoredStudy]:
    """A shadow bundle's scores of a piece the active bundle scored (its own input size); a
    failing shadow bundle is logged and never stops the active one."""
    try:
        theirs = shadow.pre_process(images, [i.meta for i in items], [i.study_id for i in items])
        scores = shadow.post_process(theirs, shadow.predict(theirs.pixels, theirs.meta))
    except Exception:
        log.exception("shadow bundle %s failed on a piece of %d studies", version, len(items))
        return []
    return _scored([items[i] for i in theirs.ok], scores)


def _scored(items, scores) -> list[results.ScoredStudy]:
    return [
        results.ScoredStudy(
            i.study_id,
            s.probability,
            s.spread,
            s.assessable,
            s.reason,
            s.distance,
            s.stats,
            s.embedding,
            s.missing_fields,
        )
        for i, s in zip(items, scores, strict=True)
    ]


def configure_backend(settings: Settings) -> None:
    """JAX: a persistent compilation cache in the data directory, so a restarted worker does not
    compile its batch shapes again (NASNetMobile's first XLA compile takes about a minute)."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        cache = Path(settings.data_dir) / "jax-cache"
        cache.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", settings.jax_cache_min_compile_s)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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
    log.info("%s%s (Grad-CAM traced in %.1f s)", STARTING, HEATMAPS_WARM, time.perf_counter() - t0)


def gradcam(pred):
    """The process's Grad-CAM of the loaded bundle's network. While the warm-up thread traces it,
    a heat map task waits here for it."""
    from model.gradcam import GradCam

    with _gradcam_lock:
        cam = _process_state.get("gradcam")
        if cam is None or cam[0] is not pred:
            cam = _process_state["gradcam"] = (pred, _Traced(GradCam(pred.network)))
    return cam[1]


class _Traced:
    """A Grad-CAM whose calls run one at a time (the warm-up thread and a task never trace it
    twice, side by side)."""

    def __init__(self, cam):
        self._cam, self._lock = cam, threading.Lock()

    def heatmap(self, pixels, meta):
        with self._lock:
            return self._cam.heatmap(pixels, meta)


@dataclass
class Outcome:
    scored: int = 0
    failed: int = 0
    skipped: int = 0
    not_assessable: int = 0
    referred_ids: list[int] = field(default_factory=list)
    scored_ids: list[int] = field(default_factory=list)
    finished_batches: list[str] = field(default_factory=list)
    timings: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "scored": self.scored,
            "failed": self.failed,
            "skipped": self.skipped,
            "referred": len(self.referred_ids),
            "not_assessable": self.not_assessable,
            "timings": self.timings,
        }


@dataclass
class _Item:
    study_id: int
    sha256: str
    meta: dict
    batch_id: str | None
    created_at: object = None
    priority: str = "bulk"


def _item(study: Study) -> _Item:
    return _Item(
        study.id,
        study.image_sha256,
        dict(study.meta or {}),
        study.batch_id,
        study.created_at,
        str(study.priority.value),
    )


class ScoreStudies:
    def __init__(self, settings: Settings, study_ids: list[int], interactive: bool = False):
        self.settings = settings
        self.study_ids = list(study_ids)
        self.interactive = interactive
        self.factory = session_factory(settings.database_url)
        self.blobs = blob_store(settings)
        self.owner = lease_owner()

    def _claim(self) -> list[_Item]:
        items: list[_Item] = []
        try:
            with self.factory() as session, session.begin():
                for s in results.claim(session, self.study_ids, self.owner, self.settings.lease_s):
                    items.append(_item(s))
            if self.interactive:
                items += self._gather(items)
        except OperationalError as exc:
            raise TransientError(str(exc)) from exc
        return items

    def _gather(self, items: list[_Item]) -> list[_Item]:
        """Dynamic batching: add queued interactive studies until the batch is full or the
        maximum wait has passed (as Triton's dynamic batcher does)."""
        extra: list[_Item] = []
        deadline = time.monotonic() + self.settings.batch_max_wait_ms / 1000.0
        seen = [i.study_id for i in items]
        while len(items) + len(extra) < self.settings.batch_max_size:
            with self.factory() as session, session.begin():
                ids = results.gather_interactive(
                    session,
                    seen,
                    self.settings.batch_max_size - len(items) - len(extra),
                    self.owner,
                    self.settings.lease_s,
                )
                if ids:
                    for s in session.scalars(select(Study).where(Study.id.in_(ids))):
                        extra.append(_item(s))
                    seen += ids
            if time.monotonic() >= deadline:
                break
            if not ids:
                time.sleep(min(0.005, max(0.0, deadline - time.monotonic())))
        return extra

    def _serve_waiting_interactive(self) -> list[Outcome]:
        """Between the pieces of a bulk chunk: score interactive studies that arrived meanwhile,
        so a person waits for at most one piece of bulk work, however large the chunk."""
        try:
            with self.factory() as session, session.begin():
                ids = results.gather_interactive(
                    session, [], self.settings.batch_max_size, self.owner, self.settings.lease_s
                )
        except OperationalError:
            return []
        if not ids:
            return []
        log.info("serving %d interactive studies between bulk pieces", len(ids))
        return [ScoreStudies(self.settings, ids).run()]

    def _prepare(self, pred, items: list[_Item]):
        """Read blobs and decode (runs in a thread while the model works on the previous piece)."""
        t0 = time.perf_counter()
        images, failed, keep = [], [], []
        # concurrently on the object store; BlobUnavailable propagates: the task is retried
        for item, data in zip(items, self.blobs.get_many([i.sha256 for i in items]), strict=True):
            if isinstance(data, BlobError):
                failed.append((item.study_id, str(data)))
            else:
                images.append(data)
                keep.append(item)
        t1 = time.perf_counter()
        prepared = pred.pre_process(images, [i.meta for i in keep], [i.study_id for i in keep])
        for index, error in prepared.errors.items():
            failed.append((keep[index].study_id, f"image cannot be decoded: {error.reason}"))
        t2 = time.perf_counter()
        ok = list(prepared.ok)
        return [keep[i] for i in ok], prepared, failed, (t1 - t0, t2 - t1), [images[i] for i in ok]

    def run(self) -> Outcome:
        """Score the claimed studies in named steps: check the bundle may decide, claim, score the
        pieces (serving waiting interactive studies between bulk pieces), write in one
        transaction, then merge what was served on the way."""
        pred = predictor(self.settings)
        shadow_preds = self._bundles_that_score(pred)
        outcome = Outcome(skipped=0)
        items = self._claim()
        outcome.skipped = len(self.study_ids) - sum(1 for i in items if i.study_id in set(self.study_ids))
        if not items:
            return outcome
        work = self._score_pieces(pred, shadow_preds, items)
        self._write(pred, items, work, outcome)
        _record_metrics(outcome, items)
        for other in work.served:
            outcome.referred_ids += other.referred_ids
            outcome.scored_ids += other.scored_ids
            outcome.finished_batches += other.finished_batches
        log.info(
            "scored %d, failed %d, referred %d (%s)",
            outcome.scored, outcome.failed, len(outcome.referred_ids), outcome.timings,
        )  # fmt: skip
        return outcome

    def _bundles_that_score(self, pred) -> dict:
        """The active-bundle check (this worker's bundle must be the deciding one: registered
        again if the database lost it) and the shadow bundles' predictors."""
        with self.factory() as session, session.begin():
            row = session.get(ModelBundle, pred.version) or register_bundle(self.settings, session)
            if not row.active:
                raise BundleNotActive(f"bundle {pred.version} is not the active bundle")
            return shadow_predictors(self.settings, bundles.shadows(session))

    def _score_pieces(self, pred, shadow_preds: dict, items: list[_Item]) -> _Work:
        """Pieces of the largest batch shape; the next piece is read and decoded in a thread while
        the model scores this one; each piece is scored by the shadow bundles too."""
        piece = max(pred.batch_sizes)
        pieces = [items[i : i + piece] for i in range(0, len(items), piece)]
        work = _Work()
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(self._prepare, pred, pieces[0])
            for n in range(len(pieces)):
                if n and not self.interactive:
                    work.served += self._serve_waiting_interactive()
                try:
                    kept, prepared, bad, (t_read, t_decode), kept_images = future.result()
                except BlobUnavailable as exc:  # the studies stay claimed; the retry claims them again
                    raise TransientError(str(exc)) from exc
                if n + 1 < len(pieces):
                    future = pool.submit(self._prepare, pred, pieces[n + 1])
                work.timing["read"] += t_read
                work.timing["decode"] += t_decode
                work.failed += bad
                t0 = time.perf_counter()
                scores = pred.post_process(prepared, pred.predict(prepared.pixels, prepared.meta))
                work.timing["infer"] += time.perf_counter() - t0
                work.scored += _scored(kept, scores)
                t0 = time.perf_counter()
                for version, shadow in shadow_preds.items():  # the same studies, deciding nothing
                    work.shadow.setdefault(version, []).extend(_score_in_shadow(version, shadow, kept, kept_images))
                work.timing["shadow"] += time.perf_counter() - t0
        return work

    def _write(self, pred, items: list[_Item], work: _Work, outcome: Outcome) -> None:
        """Predictions, statuses, referrals and shadow predictions in one transaction."""
        t0 = time.perf_counter()
        try:
            with self.factory() as session, session.begin():
                threshold = session.get(ModelBundle, pred.version).threshold
                written = results.record(
                    session, pred.version, threshold, work.scored, work.failed, self.owner, change=pred.change
                )
                for version, theirs in work.shadow.items():
                    results.record_shadow(session, version, session.get(ModelBundle, version).threshold, theirs)
                outcome.finished_batches = results.finished_batches(session, [i.batch_id for i in items])
        except OperationalError as exc:
            raise TransientError(str(exc)) from exc
        work.timing["write"] = time.perf_counter() - t0
        if written["lost_lease"]:
            log.warning(
                "%d studies were taken over by another worker while this one scored them (its lease ran out): "
                "their results are that worker's, nothing written here", len(written["lost_lease"]),
            )  # fmt: skip
        outcome.scored = len(written["scored_ids"])
        outcome.failed = written["failed"]
        outcome.referred_ids = written["high_risk"]
        outcome.scored_ids = written["scored_ids"]
        outcome.not_assessable = len(written["not_assessable"])
        outcome.timings = {k: round(v, 4) for k, v in work.timing.items()}
        outcome.timings["batch_size"] = len(items)


@dataclass
class _Work:
    """What scoring the pieces of a claim produced, before it is written."""

    scored: list = field(default_factory=list)
    shadow: dict = field(default_factory=dict)
    failed: list = field(default_factory=list)
    served: list = field(default_factory=list)  # outcomes of interactive studies served between pieces
    timing: dict = field(default_factory=lambda: dict.fromkeys(("read", "decode", "infer", "shadow", "write"), 0.0))


def _record_metrics(outcome: Outcome, items: list[_Item]) -> None:
    from worker import metrics

    now = utcnow()
    latencies: dict[str, list[float]] = {}
    for item in items:
        if item.created_at is not None:
            created = item.created_at if item.created_at.tzinfo else item.created_at.replace(tzinfo=dt.UTC)
            latencies.setdefault(item.priority, []).append((now - created).total_seconds())
    metrics.observe(outcome, latencies)


def display_image(data: bytes, longest: int = 512) -> np.ndarray:
    """The study image as RGB, at most ``longest`` pixels on its longer side (for overlays)."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        image.thumbnail((longest, longest))
        return np.asarray(image)


def make_heatmaps(settings: Settings, study_ids: list[int]) -> int:
    """Grad-CAM overlays for referred studies, stored as blobs on their prediction rows."""
    from model.gradcam import overlay_png

    pred = predictor(settings)
    cam = gradcam(pred)
    blobs = blob_store(settings)
    factory = session_factory(settings.database_url)
    made = 0
    with factory() as session:
        rows = session.execute(
            select(Study, Prediction)
            .join(Prediction, Prediction.study_id == Study.id)
            .where(
                Study.id.in_(study_ids), Prediction.bundle_version == pred.version, Prediction.heatmap_sha256.is_(None)
            )
        ).all()
    for study, prediction in rows:
        try:
            prepared = pred.pre_process([blobs.get(study.image_sha256)], [study.meta or {}])
        except BlobError:
            continue
        if prepared.errors:
            continue
        heat = cam.heatmap(prepared.pixels, prepared.meta)
        original = display_image(blobs.get(study.image_sha256))
        heat = (
            np.asarray(Image.fromarray((heat * 255).astype(np.uint8)).resize(original.shape[1::-1], Image.BICUBIC))
            / 255.0
        )
        digest = blobs.put(overlay_png(original, heat))
        with factory() as session, session.begin():
            session.execute(update(Prediction).where(Prediction.id == prediction.id).values(heatmap_sha256=digest))
        made += 1
    return made
