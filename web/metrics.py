"""Worker metrics for the admin page: the few numbers an operator looks at first (queue depth
per queue, the oldest queued study's age, studies scored per minute, failures), then the
Prometheus text exposition of each worker (``DERMASCAN_WORKER_METRICS_URLS``) read with
prometheus-client's parser."""

from __future__ import annotations

import datetime as dt
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from web.helpers import db, settings

SHOWN = ("dermascan_",)


def headline(rows: list[dict]) -> dict:
    """Queue depths from the workers' metrics (the largest any worker reports: they read the same
    broker); the rest from the database, so it holds whatever workers are reachable."""
    from sqlalchemy import func, select

    from dermascan.infra.schema import Study, StudyStatus, utcnow

    depths: dict[str, float] = {}
    for row in rows:
        if row["name"] == "dermascan_queue_depth":
            queue = row["labels"].removeprefix("queue=")
            depths[queue] = max(depths.get(queue, 0), row["value"])
    now = utcnow()
    oldest = db().scalar(select(func.min(Study.created_at)).where(Study.status == StudyStatus.QUEUED))
    if oldest is not None and oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=dt.UTC)
    recent = now - dt.timedelta(minutes=5)
    scored = db().scalar(
        select(func.count()).select_from(Study).where(Study.status == StudyStatus.DONE, Study.finished_at >= recent)
    )
    failed = db().scalar(
        select(func.count())
        .select_from(Study)
        .where(Study.status == StudyStatus.FAILED, Study.finished_at >= now - dt.timedelta(hours=1))
    )
    return {
        "queue_depth": dict(sorted(depths.items())),
        "oldest_queued_s": None if oldest is None else max(0.0, (now - oldest).total_seconds()),
        "scored_per_minute": scored / 5.0,
        "failed_last_hour": failed,
    }


def snapshot() -> dict:
    rows, errors = [], []
    urls = [u.strip() for u in settings().worker_metrics_urls.split(",") if u.strip()]
    if not urls:
        errors.append("No worker metrics URL is configured (DERMASCAN_WORKER_METRICS_URLS).")
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=3) as response:
                text = response.read().decode()
        except OSError as exc:
            errors.append(f"{url}: {exc}")
            continue
        for family in text_string_to_metric_families(text):
            if not family.name.startswith(SHOWN):
                continue
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue
                labels = ", ".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                rows.append({"name": sample.name, "labels": labels, "value": round(sample.value, 4)})
    return {"rows": rows, "errors": errors, "headline": headline(rows), "urls": urls}
