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
    from dermascan.infra.schema import Prediction, Referral

    backlog = db().scalar(
        select(func.count())
        .select_from(Referral)
        .join(Prediction, Prediction.id == Referral.prediction_id)
        .where(Referral.category.in_(("high_risk", "newly_high_risk")), Prediction.heatmap_sha256.is_(None))
    )
    return {
        "queue_depth": dict(sorted(depths.items())),
        "oldest_queued_s": None if oldest is None else max(0.0, (now - oldest).total_seconds()),
        "scored_per_minute": scored / 5.0,
        "failed_last_hour": failed,
        "heatmap_backlog": backlog,
        "latency": latency_quantiles(rows),
    }


def latency_quantiles(rows: list[dict], quantiles=(0.5, 0.95)) -> dict:
    """p50 and p95 of the end-to-end latency per priority, from the workers' histogram buckets
    (summed over workers; the upper edge of the bucket the quantile falls in)."""
    buckets: dict[str, dict[float, float]] = {}
    for row in rows:
        if row["name"] != "dermascan_end_to_end_seconds_bucket":
            continue
        labels = dict(part.split("=", 1) for part in row["labels"].split(", ") if "=" in part)
        edge = float("inf") if labels.get("le") in ("+Inf", "inf") else float(labels.get("le", "inf"))
        priority = buckets.setdefault(labels.get("priority", "all"), {})
        priority[edge] = priority.get(edge, 0.0) + row["value"]
    out = {}
    for priority, cumulative in sorted(buckets.items()):
        edges = sorted(cumulative)
        total = cumulative[edges[-1]] if edges else 0
        if not total:
            continue
        out[priority] = {
            f"p{round(q * 100)}": next(e for e in edges if cumulative[e] >= q * total) for q in quantiles
        } | {"n": int(total)}
    return out


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
