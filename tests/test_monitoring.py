"""Monitoring the deployed model (issue 15, items 3 and 4) on real parts: studies scored by a real
worker (its image statistics stored with each prediction), outcomes and decisions recorded, and
the figures read back from the monitoring page, the Prometheus gauges and the monthly report.
The drift check fires on a shifted stream (darkened images, ages 20 years older, one site) and
stays quiet on an unshifted one."""

from __future__ import annotations

import dataclasses
import io
import re
import shutil

import pytest
import yaml
from click.testing import CliRunner
from PIL import Image, ImageEnhance
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from dermascan.cli import main
from dermascan.governance import monitoring
from dermascan.infra.db import session_factory
from dermascan.infra.schema import Prediction, Program, Referral, Study, utcnow
from dermascan.intake.submission import submit
from dermascan.referrals import outcomes
from dermascan.security.accounts import create_user
from dermascan.security.identity import get_or_create_program
from tests.helpers import ham_inputs, status_counts
from tests.services import ROOT, wait_for

PASSWORD = "correct horse battery staple 9"
N = 120  # studies per stream: PSI noise under the null is about (bins − 1) / n ≈ 0.08


def darkened_older_one_site(inputs):
    out = []
    for item in inputs:
        with Image.open(io.BytesIO(item.image)) as image:
            dark = ImageEnhance.Brightness(image.convert("RGB")).enhance(0.45)
            buffer = io.BytesIO()
            dark.save(buffer, format="JPEG", quality=92)
        meta = dict(item.metadata)
        if meta.get("age_approx") not in (None, ""):
            meta["age_approx"] = float(meta["age_approx"]) + 20
        meta["anatom_site_general"] = "lower extremity"
        out.append(dataclasses.replace(item, image=buffer.getvalue(), metadata=meta))
    return out


@pytest.fixture
def profiled_bundle(tiny_bundle, tmp_path, ham_dir):
    """The tiny bundle with the profile of the whole development set (its own training rows are
    too few to make a steady reference)."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    made = CliRunner().invoke(main, ["bundle", "profile", str(bundle), "--data", str(ham_dir)])
    assert made.exit_code == 0, made.output
    return bundle


def test_drift_fires_on_a_shifted_stream_and_the_figures_reach_page_gauges_and_report(
    make_settings, pg_url, redis_url, profiled_bundle, start_worker, app_factory, ham_dir, tmp_path
):
    settings = make_settings(database_url=pg_url, broker_url=redis_url, model_bundle=profiled_bundle,
                             monitoring_metrics_token="scrape-token-1")  # fmt: skip
    factory = session_factory(settings.database_url)
    with factory() as session, session.begin():
        steady = get_or_create_program(session, "steady").id
        shifted = get_or_create_program(session, "shifted").id
    submit(settings, steady, ham_inputs(ham_dir, N, offset=200), source="test")
    submit(settings, shifted, darkened_older_one_site(ham_inputs(ham_dir, N, offset=400)), source="test")
    start_worker(settings)
    wait_for(lambda: status_counts(settings).get("done", 0) + status_counts(settings).get("failed", 0) == 2 * N, 300,
             message="both streams scored")  # fmt: skip
    with factory() as session:
        stats = [p.image_stats for p in session.scalars(select(Prediction))]
        assert all(s and set(s) == {"brightness", "contrast", "sharpness", "min_side"} for s in stats)

    # outcomes and decisions on the steady program's referrals: PPV and the benign share
    with factory() as session, session.begin():
        user = create_user(session, "dr.audit", PASSWORD, "specialist", steady)
        session.flush()
        referred = session.scalars(select(Referral).join(Study).where(Study.program_id == steady).order_by(Referral.id)).all()  # fmt: skip
        assert len(referred) >= 4, "the tiny bundle referred too few studies to measure a PPV"
        kinds = ["malignant", "benign", "benign", "malignant"]
        for referral, kind in zip(referred[:4], kinds, strict=True):
            outcomes.record(session, referral.study, kind, None, source="test", user_id=user.id, ip=None)
        for referral in referred[:3]:
            referral.status, referral.decision, referral.decided_by_id, referral.decided_at = "decided", "benign_no_action", user.id, utcnow()  # fmt: skip
        not_referred = session.scalar(select(Study).where(Study.program_id == steady, ~Study.id.in_([r.study_id for r in referred])))  # fmt: skip
        outcomes.record(session, not_referred, "malignant", None, source="test", user_id=user.id, ip=None)

    with factory() as session:
        quiet = monitoring.rolling(session, session.get(Program, steady), 7)
        loud = monitoring.rolling(session, session.get(Program, shifted), 7)
    assert quiet.studies == N and loud.studies == N
    assert quiet.drift["score"] is not None and loud.drift["score"] is not None  # against the bundle's histogram
    drifted = {k for k, v in loud.drift.items() if v is not None and v > monitoring.DRIFT}
    assert {"brightness", "age_approx", "anatom_site_general"} <= drifted, loud.drift
    assert not [a for a in quiet.alerts if "drifted" in a], quiet.drift
    assert all(v is None or v < monitoring.DRIFT for k, v in quiet.drift.items() if k != "score"), quiet.drift
    assert quiet.ppv == pytest.approx(0.5) and quiet.benign_share == pytest.approx(1.0)
    assert quiet.verified_sensitivity == pytest.approx(2 / 3)  # 2 of the 3 verified malignant lesions referred

    # the Prometheus gauges, with the scrape token, and the alert rules that read them
    client = app_factory(settings).test_client()
    assert client.get("/admin/monitoring/metrics").status_code == 302  # no token, no session: to the login
    scraped = client.get("/admin/monitoring/metrics", headers={"Authorization": "Bearer scrape-token-1"})
    assert scraped.status_code == 200
    series = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(scraped.text)
        for s in family.samples
    }
    assert series[("dermascan_monitor_studies", (("program", "shifted"),))] == N
    assert series[("dermascan_monitor_psi", (("feature", "brightness"), ("program", "shifted")))] > monitoring.DRIFT
    assert series[("dermascan_monitor_psi", (("feature", "brightness"), ("program", "steady")))] < monitoring.DRIFT
    assert series[("dermascan_monitor_ppv", (("program", "steady"),))] == pytest.approx(0.5)
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "dermascan-alerts.yml").read_text())
    exported = {name for name, _ in series} | {f.name for f in text_string_to_metric_families(scraped.text)}
    for rule in rules["groups"][0]["rules"]:
        used = set(re.findall(r"dermascan_monitor_[a-z_]+", rule["expr"]))
        assert used and used <= exported, (rule["alert"], used - exported)

    # the admin's page and the monthly report: with data, and for a month without any
    with factory() as session, session.begin():
        create_user(session, "chief", PASSWORD, "admin", steady)
    token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', client.get("/login").text).group(1)
    client.post("/login", data={"username": "chief", "password": PASSWORD, "csrf_token": token})
    page = client.get(f"/admin/monitoring/?program={shifted}").text
    assert "brightness drifted" in page and "data:image/png;base64," in page
    month = utcnow().strftime("%Y-%m")
    report = client.get(f"/admin/monitoring/report?program={steady}&month={month}")
    assert report.status_code == 200 and f"{N} studies" in report.text and "Verification bias" in report.text
    assert "data:image/png;base64," in report.text
    empty = client.get(f"/admin/monitoring/report?program={steady}&month=2020-01")
    assert empty.status_code == 200 and "No studies this month" in empty.text
    assert client.get(f"/admin/monitoring/report?program={steady}&month=2020-13").status_code == 400
    out = tmp_path / "report.html"
    written = CliRunner().invoke(main, ["report", "monthly", "--program", "shifted", "--month", month, "--out", str(out)],
                                 env=settings.as_env())  # fmt: skip
    assert written.exit_code == 0, written.output
    assert "drifted" in out.read_text() and "Alerts:" in out.read_text()
