"""The worker process's model runtime: its predictor (loaded once, after the fork, by
``model.inference.loader``), the bundle it registers, the shadow bundles it also scores with, the
backend's compilation cache."""

from __future__ import annotations

import logging
from pathlib import Path

from dermascan.config import Settings
from dermascan.governance import bundles
from dermascan.infra.schema import ModelBundle

log = logging.getLogger(__name__)


_process_state: dict = {}


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
    """The configured bundle as a Predictor on the configured runtime (DERMASCAN_RUNTIME), with the
    flips the bundle recommends unless DERMASCAN_TTA says otherwise."""
    from model.inference.loader import load_predictor as load

    return load(
        settings.model_bundle, batch_sizes=settings.predict_batch_sizes, tta=settings.tta,
        mixed_precision=settings.mixed_precision, runtime=settings.runtime, packages_dir=packages_dir(settings),
        threads=settings.inference_threads or None,
    )  # fmt: skip


def packages_dir(settings: Settings) -> Path:
    """Where ``dermascan bundle register`` puts the ONNX packages it exports."""
    return Path(settings.data_dir) / "onnx"


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
    from model.inference.predictor import Predictor

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


def configure_backend(settings: Settings) -> None:
    """JAX: a persistent compilation cache in the data directory, so a restarted worker does not
    compile its batch shapes again (NASNetMobile's first XLA compile takes about a minute)."""
    from model.inference.loader import keras_backend

    if keras_backend() == "jax":
        import jax

        cache = Path(settings.data_dir) / "jax-cache"
        cache.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", settings.jax_cache_min_compile_s)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def score_in_shadow(version: str, shadow, items, images) -> list:
    """A shadow bundle's scores of a piece the active bundle scored (its own input size); a
    failing shadow bundle is logged and never stops the active one."""
    from dermascan.screening.results import ScoredStudy

    try:
        theirs = shadow.pre_process(images, [i.meta for i in items], [i.study_id for i in items])
        scores = shadow.post_process(theirs, shadow.predict(theirs.pixels, theirs.meta))
    except Exception:
        log.exception("shadow bundle %s failed on a piece of %d studies", version, len(items))
        return []
    return [ScoredStudy.of(items[i].study_id, s) for i, s in zip(theirs.ok, scores, strict=True)]
