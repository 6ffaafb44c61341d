"""Prometheus metrics of the worker (prometheus-client, multiprocess mode).

The prefork children record into files under ``PROMETHEUS_MULTIPROC_DIR``; the worker's main
process serves them all on ``DERMASCAN_METRICS_PORT`` with a MultiProcessCollector, plus the queue
depths read from the broker at scrape time.
"""

from __future__ import annotations

import logging
import os

from prometheus_client import Counter, Histogram

log = logging.getLogger(__name__)

SCORED = Counter("dermascan_studies_scored", "Studies scored, by outcome", ["outcome"])
BATCH_SIZE = Histogram("dermascan_batch_size", "Studies per model batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
STAGE = Histogram(
    "dermascan_stage_seconds",
    "Time per batch in each stage",
    ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
LATENCY = Histogram(
    "dermascan_end_to_end_seconds",
    "From acceptance to stored result, per study",
    ["priority"],
    buckets=(0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30, 60, 300, 900, 3600),
)


def record(outcome, items) -> None:
    """A written piece of work: its counts, stage times and each study's end-to-end latency."""
    import datetime as dt

    from dermascan.infra.schema import utcnow

    now = utcnow()
    latencies: dict[str, list[float]] = {}
    for item in items:
        if item.created_at is not None:
            created = item.created_at if item.created_at.tzinfo else item.created_at.replace(tzinfo=dt.UTC)
            latencies.setdefault(item.priority, []).append((now - created).total_seconds())
    observe(outcome, latencies)


def observe(outcome, latencies: dict[str, list[float]]) -> None:
    SCORED.labels("done").inc(outcome.scored)
    SCORED.labels("failed").inc(outcome.failed)
    if outcome.timings.get("batch_size"):
        BATCH_SIZE.observe(outcome.timings["batch_size"])
    for stage, seconds in outcome.timings.items():
        if stage != "batch_size":
            STAGE.labels(stage).observe(seconds)
    for priority, values in latencies.items():
        for value in values:
            LATENCY.labels(priority).observe(value)


class QueueDepthCollector:
    """Queue depths from the broker, read when Prometheus scrapes."""

    def __init__(self, app):
        self.app = app

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        from dermascan.infra import broker

        family = GaugeMetricFamily("dermascan_queue_depth", "Messages waiting per queue", labels=["queue"])
        try:
            with self.app.connection_for_read() as connection:
                channel = connection.default_channel
                for name in broker.QUEUES:
                    try:
                        depth = channel.queue_declare(queue=name, passive=True).message_count
                    except Exception:
                        depth = 0
                    family.add_metric([name], depth)
        except Exception as exc:  # the broker is down: report nothing rather than fail the scrape
            log.debug("queue depth unavailable: %s", exc)
        yield family


def serve(app, port: int) -> None:
    """Serve all children's metrics from the main worker process."""
    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    registry.register(QueueDepthCollector(app))
    start_http_server(port, registry=registry)
    log.info("metrics on :%d/metrics (from %s)", port, os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
