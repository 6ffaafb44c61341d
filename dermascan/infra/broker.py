"""The Celery app: broker, queue names, routing and sending tasks by name.

It lives in the core so the web process and the CLI enqueue work without importing ``worker/``
(whose task bodies import Keras). Messages carry study ids, never images.

Queues, served in this order by every worker (kombu's ``priority`` cycle: the first non-empty
queue wins): ``interactive`` (single studies from people waiting), ``bulk`` (chunks of a batch),
``maintenance`` (heat maps, sweeps), ``callbacks`` (outbound work: completion callbacks and
results sent back to PACS destinations — their own queue, so a slow or unreachable endpoint
never holds a scoring worker; docker-compose serves it by a worker of its own).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterable, Sequence
from functools import lru_cache

from celery import Celery

from dermascan.config import Settings

log = logging.getLogger(__name__)

INTERACTIVE = "interactive"
BULK = "bulk"
MAINTENANCE = "maintenance"
CALLBACKS = "callbacks"
QUEUES = (INTERACTIVE, BULK, MAINTENANCE, CALLBACKS)
SCORING_QUEUES = (INTERACTIVE, BULK, MAINTENANCE)

TASK_SCORE = "dermascan.score"
TASK_HEATMAPS = "dermascan.heatmaps"
TASK_SWEEP = "dermascan.sweep"
TASK_CALLBACK = "dermascan.batch_callback"
TASK_DECISION_CALLBACK = "dermascan.decision_callback"
TASK_DELIVER = "dermascan.deliver_dicom"
# a worker's start-up lines begin with this (``dermascan demo`` shows them to the person waiting)
STARTING = "start-up: "


def make_celery(settings: Settings) -> Celery:
    app = Celery("dermascan", set_as_current=False)
    transport_options: dict = {"queue_order_strategy": "priority"}
    if settings.broker_url.startswith("filesystem"):
        folder = settings.queue_dir
        for sub in ("messages", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        transport_options = {
            "data_folder_in": str(folder / "messages"),
            "data_folder_out": str(folder / "messages"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),  # kombu's default is ./control, wherever that is
            "store_processed": False,
            # kombu polls a virtual transport's folders once a second by default: a worker that
            # finished a chunk would idle up to 1 s before it sees the next one
            "polling_interval": 0.05,
        }
    else:
        transport_options.update(
            visibility_timeout=settings.visibility_timeout_s,
            socket_timeout=10,
            socket_connect_timeout=3,
        )
    app.conf.update(
        broker_url=settings.broker_url,
        broker_transport_options=transport_options,
        # the visibility timeout must be set for the result backend too (celery/celery#7651); we
        # keep no results, state lives in the database
        result_backend=None,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=BULK,
        task_queues=None,
        task_create_missing_queues=True,
        task_routes={
            TASK_HEATMAPS: {"queue": MAINTENANCE},
            TASK_SWEEP: {"queue": MAINTENANCE},
            TASK_CALLBACK: {"queue": CALLBACKS},
            TASK_DECISION_CALLBACK: {"queue": CALLBACKS},
            TASK_DELIVER: {"queue": CALLBACKS},
        },
        # a submit must not hang while the broker is down: the studies are already committed
        # and the sweeper sends them later
        broker_connection_timeout=3,
        broker_connection_retry_on_startup=True,
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 1, "interval_start": 0.2, "interval_step": 0.2},
        worker_hijack_root_logger=False,
        # the child loads TensorFlow and the bundle (and warms up) before it reports alive
        worker_proc_alive_timeout=900,
        worker_send_task_events=False,
        beat_schedule={
            "sweep": {
                "task": TASK_SWEEP,
                "schedule": float(settings.sweep_interval_s),
                "options": {"queue": MAINTENANCE},
            }
        },
    )
    app.conf.dermascan_settings = settings
    return app


@lru_cache(maxsize=4)
def celery_for(settings: Settings) -> Celery:
    return make_celery(settings)


def chunks(ids: Sequence[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(ids), size):
        yield list(ids[start : start + size])


def send_scoring(settings: Settings, study_ids: Sequence[int], interactive: bool) -> list[int]:
    """Send score messages: one per study for interactive work (the worker batches them
    dynamically), one per chunk of ``bulk_chunk_size`` for bulk work.

    Returns the ids whose message was sent; on a broker failure the rest are left for the
    sweeper and the error is logged, never raised (the studies are already safely stored).
    """
    queue = INTERACTIVE if interactive else BULK
    groups = [[i] for i in study_ids] if interactive else list(chunks(list(study_ids), settings.bulk_chunk_size))
    done, error = _publish(settings, TASK_SCORE, [([g], {"interactive": interactive}) for g in groups], queue)
    sent = [i for group in groups[:done] for i in group]
    if error is not None:
        log.warning("broker unavailable, %d studies left for the sweeper: %s", len(study_ids) - len(sent), error)
    return sent


def _publish(settings: Settings, task: str, messages: Sequence[tuple[list, dict]], queue: str):
    """Send (args, kwargs) messages in order over one producer connection → (how many were sent,
    the error that stopped the rest or None); never raises."""
    app, sent = celery_for(settings), 0
    try:
        with app.producer_or_acquire() as producer:
            for args, kwargs in messages:
                app.send_task(task, args=args, kwargs=kwargs, queue=queue, producer=producer)
                sent += 1
    except Exception as exc:  # kombu/redis raise several kinds; all mean "not sent"
        return sent, exc
    return sent, None


def send_many(settings: Settings, task: str, args_list: Sequence[list], queue: str = MAINTENANCE) -> int:
    """One message per ``args`` of ``args_list``, over one producer connection; returns how many
    were sent (a broker failure is logged and never raised, as :func:`send`)."""
    if not args_list:
        return 0
    sent, error = _publish(settings, task, [(args, {}) for args in args_list], queue)
    if error is not None:
        log.warning("could not send %d of %d %s messages: %s", len(args_list) - sent, len(args_list), task, error)
    return sent


def send(settings: Settings, task: str, args: list, queue: str = MAINTENANCE, countdown: float | None = None) -> bool:
    try:
        celery_for(settings).send_task(task, args=args, queue=queue, countdown=countdown)
        return True
    except Exception as exc:
        log.warning("could not send %s: %s", task, exc)
        return False


# -- what the broker holds ---------------------------------------------------------------------------
def _score_ids(message: dict) -> list[int]:
    """The study ids of a score message (Celery's protocol 2, JSON body), else []."""
    if (message.get("headers") or {}).get("task") != TASK_SCORE:
        return []
    body = message.get("body") or ""
    if (message.get("properties") or {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    args = json.loads(body)[0]
    return [int(i) for i in args[0]] if args and isinstance(args[0], list) else []


def held_study_ids(settings: Settings) -> set[int] | None:
    """The ids of every study a score message in the broker names — waiting in a queue or
    delivered to a worker and not yet acknowledged — or None when the broker cannot be read
    (down, or a transport this does not know). The sweeper re-sends a queued study whose message
    is in neither: a Redis without persistence that restarted lost it."""
    try:
        if settings.broker_url.startswith("filesystem"):
            raw = [p.read_bytes() for p in (settings.queue_dir / "messages").glob("*") if p.is_file()]
            messages = [json.loads(r) for r in raw]
        elif settings.broker_url.startswith(("redis://", "rediss://")):
            messages = _redis_messages(settings)
        else:
            return None
        out: set[int] = set()
        for message in messages:
            out.update(_score_ids(message))
        return out
    except Exception as exc:  # noqa: BLE001 — any failure means "cannot tell"
        log.info("the broker's messages cannot be read (%s): the sweeper goes by age alone", exc)
        return None


def _redis_messages(settings: Settings) -> list[dict]:
    from kombu.transport.redis import PRIORITY_STEPS

    app = celery_for(settings)
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        client, sep = channel.client, channel.sep
        keys = [q for q in QUEUES] + [f"{q}{sep}{p}" for q in QUEUES for p in PRIORITY_STEPS if p]
        pipe = client.pipeline()
        for key in keys:
            pipe.lrange(key, 0, -1)
        pipe.hvals(channel.unacked_key)
        *queued, unacked = pipe.execute()
    out = [json.loads(item) for items in queued for item in items]
    out += [json.loads(item)[0] for item in unacked]
    return out
