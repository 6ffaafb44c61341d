"""Worker entry point: ``celery -A worker.celery_app worker -Q interactive,bulk,maintenance``.

Calls the factory with the environment's settings and imports the task bodies. The model is
loaded lazily in each child process after the fork (never in the parent: TensorFlow is not
fork-safe), or eagerly by ``worker_process_init`` when warm-up is on.
"""

import os
import shutil
import threading
from pathlib import Path

from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown

from dermascan.config import MissingExtra, Settings, check_backend
from dermascan.infra.broker import make_celery

try:
    check_backend()
except MissingExtra as exc:
    raise SystemExit(str(exc)) from None
settings = Settings.from_env().with_secret()
if settings.metrics_port and "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
    # before prometheus_client is imported anywhere: children write here, the main process reads
    metrics_dir = Path(settings.data_dir) / "metrics" / f"worker-{os.getpid()}"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
app = make_celery(settings)
app.set_default()

import worker.tasks  # noqa: E402,F401  (registers the shared tasks)


@worker_init.connect
def _serve_metrics(**_):
    if settings.metrics_port:
        from worker import metrics

        metrics.serve(app, settings.metrics_port)


_sweeping = threading.Event()


@worker_ready.connect
def _start_sweeping(**_):
    """Every worker sweeps on a schedule (one sweep at a time across the deployment): recovery
    from lost messages and dead workers needs no beat service."""
    if settings.worker_sweeps:
        from dermascan.upkeep.sweeper import run_forever

        threading.Thread(target=run_forever, args=(settings, _sweeping), name="sweeper", daemon=True).start()


@worker_shutdown.connect
def _stop_sweeping(**_):
    _sweeping.set()


@worker_process_init.connect
def _load_model(**_):
    """Load the bundle and run every fixed batch shape once, before the child takes work (not in
    a worker that only delivers callbacks)."""
    from dermascan.infra import broker
    from worker import leases, runtime, warm

    served = set(os.environ.get("DERMASCAN_WORKER_QUEUES", ",".join(broker.QUEUES)).split(","))
    if not served & set(broker.SCORING_QUEUES):
        return
    leases.Heartbeat(settings).start()  # renews the leases of the studies this process scores
    runtime.configure_backend(settings)
    warm.warm_up(settings, heatmaps=broker.MAINTENANCE in served)
