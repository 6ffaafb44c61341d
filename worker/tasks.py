"""Celery tasks: thin. They unpack ids, call the scoring commands and enqueue follow-ups."""

from __future__ import annotations

import logging
import time

from celery import current_app, shared_task

from dermascan.config import Settings
from dermascan.infra import broker

log = logging.getLogger(__name__)


def _settings() -> Settings:
    return current_app.conf.dermascan_settings


@shared_task(name=broker.TASK_SCORE, bind=True, acks_late=True, max_retries=5, default_retry_delay=10)
def score(self, study_ids: list[int], interactive: bool = False) -> dict:
    from worker import runtime, scoring

    settings = _settings()
    try:
        outcome = scoring.ScoreStudies(settings, study_ids, interactive=interactive).run()
    except runtime.BundleNotActive as exc:
        raise self.retry(exc=exc, countdown=60) from exc
    except runtime.TransientError as exc:
        raise self.retry(exc=exc) from exc
    started = time.perf_counter()
    # one message for the task's referred studies: heat maps run when no scoring is waiting
    # (maintenance queue), one at a time (see ``heatmaps``)
    if outcome.referred_ids:
        broker.send_many(settings, broker.TASK_HEATMAPS, [[outcome.referred_ids]])
    broker.send_many(settings, broker.TASK_CALLBACK, [[b, 0] for b in outcome.finished_batches], queue=broker.CALLBACKS)
    # results back to the PACS: now, or (referred for risk) once the heat map is made
    waiting = set(outcome.referred_ids)
    _schedule_delivery(settings, [i for i in outcome.scored_ids if i not in waiting])
    if outcome.scored_ids:
        log.info("follow-up messages (heat maps, callbacks, deliveries) sent in %.4f s", time.perf_counter() - started)
    return outcome.summary()


def _schedule_delivery(settings, study_ids: list[int]) -> None:
    from dermascan.results_out import scheduling

    if study_ids:
        try:
            scheduling.schedule(settings, study_ids)
        except Exception:  # the results are committed; a failure here must not retry the scoring
            log.exception("could not schedule the delivery of %d studies", len(study_ids))


@shared_task(name=broker.TASK_HEATMAPS, acks_late=True)
def heatmaps(study_ids: list[int]) -> int:
    """The first study's heat map; the others go back to the queue in one message of their own,
    so that scoring waiting in a queue of higher priority is taken before the next map (an
    interactive study waits for one Grad-CAM at most) and a score task sends one message, not
    one per referred study."""
    from worker.heatmaps import make_heatmaps

    settings = _settings()
    first, rest = study_ids[:1], study_ids[1:]
    try:
        return make_heatmaps(settings, first)
    finally:
        _schedule_delivery(settings, first)
        if rest:
            broker.send_many(settings, broker.TASK_HEATMAPS, [[rest]])


@shared_task(name=broker.TASK_DELIVER, acks_late=True)
def deliver_dicom(study_id: int, destination_id: int, attempt: int = 0) -> str:
    from dermascan.results_out import delivery

    settings = _settings()
    status = delivery.deliver(settings, study_id, destination_id, attempt)
    if status == "retry":
        broker.send(
            settings,
            broker.TASK_DELIVER,
            [study_id, destination_id, attempt + 1],
            queue=broker.CALLBACKS,
            countdown=delivery.retry_delay(settings, attempt),
        )
    return status


@shared_task(name=broker.TASK_SWEEP)
def sweep() -> dict | None:
    from dermascan.upkeep.sweeper import guarded_sweep

    return guarded_sweep(_settings())


def _callback(task: str, deliver: str, key, attempt: int) -> str:
    """Send one callback (``callbacks.<deliver>``); on a failure worth retrying, send the task
    again after the backoff with the next attempt number."""
    from dermascan.results_out import callbacks

    settings = _settings()
    status = getattr(callbacks, deliver)(settings, key, attempt)
    if status == "retry":
        broker.send(
            settings,
            task,
            [key, attempt + 1],
            queue=broker.CALLBACKS,
            countdown=callbacks.retry_delay(settings, attempt),
        )
    return status


@shared_task(name=broker.TASK_CALLBACK, acks_late=True)
def batch_callback(batch_id: str, attempt: int = 0) -> str:
    """Tell the sender that its batch is complete."""
    return _callback(broker.TASK_CALLBACK, "deliver", batch_id, attempt)


@shared_task(name=broker.TASK_DECISION_CALLBACK, acks_late=True)
def decision_callback(referral_id: int, attempt: int = 0) -> str:
    """Tell the sender that a specialist decided one of its studies."""
    return _callback(broker.TASK_DECISION_CALLBACK, "deliver_decision", referral_id, attempt)
