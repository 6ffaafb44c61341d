"""The GPU worker's backend, JAX, run here on the CPU: a real worker process on Keras' JAX backend
scores studies end to end (PostgreSQL, Redis) with the same probabilities as TensorFlow, compiles
its fixed batch shapes into the persistent cache in the data directory, and a restarted worker
finds them there instead of compiling again."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sqlalchemy import select

from dermascan.infra.db import session_factory
from dermascan.infra.schema import Prediction, Study
from dermascan.intake.submission import submit
from tests.helpers import all_done, ham_inputs, program_id
from tests.services import wait_for

JAX = {"KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}


def cache_entries(settings) -> set[str]:
    cache = Path(settings.data_dir) / "jax-cache"
    return {p.name for p in cache.rglob("*") if p.is_file()} if cache.exists() else set()


def test_jax_worker_scores_like_tensorflow_and_reuses_its_compilation_cache(
    make_settings, pg_url, redis_url, start_worker, ham_dir
):
    settings = make_settings(
        database_url=pg_url, broker_url=redis_url, predict_batch_sizes=(1, 8), jax_cache_min_compile_s=0.0
    )
    first = start_worker(settings, env=JAX, wait=False).wait_ready(300, warm=True)
    assert "backend jax" in first.log()
    assert cache_entries(settings), "the warm-up left nothing in the persistent compilation cache"

    inputs = ham_inputs(ham_dir, 12)
    submit(settings, program_id(settings), inputs, source="test")
    wait_for(lambda: all_done(settings, 12), 180, message="12 studies scored by the JAX worker")
    with session_factory(settings.database_url)() as session:
        stored = dict(
            session.execute(
                select(Study.external_id, Prediction.probability).join(Prediction, Prediction.study_id == Study.id)
            ).all()
        )
        assert {s.status for s in session.scalars(select(Study))} == {"done"}

    # the same bundle on TensorFlow, in this process
    from model.inference.predictor import Predictor

    expected = Predictor(settings.model_bundle, batch_sizes=(8,), tta=False).score(
        [x.image for x in inputs], [x.metadata for x in inputs]
    )
    got = np.array([stored[x.external_id] for x in inputs])
    np.testing.assert_allclose(got, [s.probability for s in expected], atol=1e-4)

    def heat_maps_done():  # Grad-CAM of the referred studies compiles too
        with session_factory(settings.database_url)() as session:
            missing = select(Prediction.id).where(
                Prediction.probability >= Prediction.threshold, Prediction.heatmap_sha256.is_(None)
            )
            return session.execute(missing).first() is None

    wait_for(heat_maps_done, 180, message="heat maps of the referred studies")
    first.stop()
    compiled = cache_entries(settings)

    # a restarted worker compiles nothing new: every shape is found in the cache
    second = start_worker(settings, env=JAX, wait=False).wait_ready(300, warm=True)
    assert "backend jax" in second.log()
    assert cache_entries(settings) == compiled
