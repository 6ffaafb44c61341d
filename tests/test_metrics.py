"""Prometheus metrics exposed by a real worker, and shown on the admin page."""

from __future__ import annotations

import re

import requests
from prometheus_client.parser import text_string_to_metric_families

from dermascan.infra.db import session_factory
from dermascan.intake.submission import submit
from dermascan.security.accounts import create_user
from dermascan.security.identity import get_or_create_program
from tests.helpers import all_done, ham_inputs, program_id
from tests.services import free_port, wait_for


def samples(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_worker_metrics_and_admin_page(pg_settings, start_worker, ham_dir, app_factory):
    port = free_port()
    settings = pg_settings.replace(metrics_port=port, worker_metrics_urls=f"http://127.0.0.1:{port}/metrics")
    start_worker(settings)
    submit(settings, program_id(settings), ham_inputs(ham_dir, 10), source="test")
    wait_for(lambda: all_done(settings, 10), 120, message="studies scored")

    def scraped():
        values = samples(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)
        return values if values.get(("dermascan_studies_scored_total", (("outcome", "done"),))) == 10 else None

    values = wait_for(scraped, 30, message="metrics updated")
    assert values[("dermascan_batch_size_count", ())] >= 2  # chunks of 8
    for stage in ("read", "decode", "infer", "write"):
        assert values[("dermascan_stage_seconds_count", (("stage", stage),))] >= 2
    assert values[("dermascan_end_to_end_seconds_count", (("priority", "bulk"),))] == 10
    assert ("dermascan_queue_depth", (("queue", "bulk"),)) in values

    with session_factory(settings.database_url)() as session, session.begin():
        create_user(session, "ops", "correct-horse-battery", "admin", get_or_create_program(session, "ops").id)
    client = app_factory(settings).test_client()
    page = client.get("/login")
    token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page.text).group(1)
    client.post("/login", data={"username": "ops", "password": "correct-horse-battery", "csrf_token": token})
    html = client.get("/admin/metrics").text
    assert "dermascan_studies_scored_total" in html and "outcome=done" in html
    # the headline before the raw table: queue depths, oldest queued, scored per minute, failures
    assert 'id="depth-bulk">0<' in html and 'id="depth-interactive">0<' in html
    assert 'id="oldest-queued">–<' in html
    assert 'id="scored-per-minute">2.0<' in html  # 10 studies in the last 5 minutes
    assert 'id="failed-last-hour">0<' in html
