"""Worker entry point: ``celery -A worker.celery_app worker -Q interactive,bulk,maintenance``.

Calls the factory with the environment's settings and imports the task bodies. The model is
loaded lazily in each child process after the fork (never in the parent: TensorFlow is not
fork-safe), or eagerly by ``worker_process_init`` when warm-up is on.
"""

from celery.signals import worker_process_init

from dermascan.config import Settings
from dermascan.queue import make_celery

settings = Settings.from_env()
app = make_celery(settings)
app.set_default()

import worker.tasks  # noqa: E402,F401  (registers the shared tasks)


@worker_process_init.connect
def _load_model(**_):
    from worker import scoring

    scoring.warm_up(settings)
