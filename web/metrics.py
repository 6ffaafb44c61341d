"""Worker metrics for the admin page: read the Prometheus text exposition of each worker
(``DERMASCAN_WORKER_METRICS_URLS``) with prometheus-client's parser."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from web.helpers import settings

SHOWN = ("dermascan_",)


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
    return {"rows": rows, "errors": errors}
