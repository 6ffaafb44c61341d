"""governance/: bundle states and monitoring on real parts.

Activating a bundle is an admin act: a worker started with another bundle registers it but takes
no work (and changes nothing) until `dermascan bundle activate`, which is audited; a shadow bundle
scores the same studies in the same batch and decides nothing.

Monitoring: studies scored by a real worker (its image statistics stored with each prediction),
outcomes and decisions recorded, and the figures read back from the monitoring page, the
Prometheus gauges and the monthly report. The drift check fires on a shifted stream (darkened
images, ages 20 years older, one site) and stays quiet on an unshifted one."""

from __future__ import annotations

import dataclasses
import io
import json
import re
import shutil

import pytest
import yaml
from click.testing import CliRunner
from PIL import Image, ImageEnhance
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from dermascan.cli import main
from dermascan.governance import bundles, monitoring
from dermascan.infra.db import session_factory
from dermascan.infra.schema import AuditEvent, ModelBundle, Prediction, Program, Referral, Study, utcnow
from dermascan.intake.submission import submit
from dermascan.referrals import outcomes
from dermascan.security.accounts import create_user
from dermascan.security.identity import get_or_create_program
from tests.helpers import ham_inputs, program_id, status_counts
from tests.services import ROOT, wait_for


def test_a_new_worker_bundle_decides_nothing_until_an_admin_activates_it(
    make_settings, pg_url, redis_url, tiny_bundle, start_worker, ham_dir, tmp_path
):
    second = tmp_path / "second-bundle"
    shutil.copytree(tiny_bundle, second)
    manifest = json.loads((second / "manifest.json").read_text())
    manifest["version"] = "tiny-second"
    (second / "manifest.json").write_text(json.dumps(manifest))
    first_settings = make_settings(database_url=pg_url, broker_url=redis_url)
    with session_factory(pg_url)() as session, session.begin():
        first = bundles.register(session, tiny_bundle)  # the deployment's active bundle
    settings = first_settings.replace(model_bundle=second)
    submit(settings, program_id(settings), ham_inputs(ham_dir, 2), source="test")
    worker = start_worker(settings)
    wait_for(lambda: "not active" in worker.log(), 60, message="the worker's warning")
    with session_factory(pg_url)() as session:
        rows = {b.version: b.active for b in session.scalars(select(ModelBundle))}
    assert rows == {first.version: True, "tiny-second": False}
    assert status_counts(settings) == {"queued": 2}  # nothing claimed, nothing scored

    done = CliRunner().invoke(main, ["bundle", "activate", "tiny-second"], env=settings.as_env())
    assert done.exit_code == 0, done.output
    assert CliRunner().invoke(main, ["bundle", "activate", "no-such"], env=settings.as_env()).exit_code == 1
    wait_for(lambda: status_counts(settings).get("done") == 2, 180, message="scored after activation")
    with session_factory(pg_url)() as session:
        assert {p.bundle_version for p in session.scalars(select(Prediction))} == {"tiny-second"}
        event = session.scalar(
            select(AuditEvent).where(AuditEvent.action == "bundle_activated", AuditEvent.object_id == "tiny-second")
        )
        assert event.detail["previous"] == first.version
    listed = CliRunner().invoke(main, ["bundle", "list"], env=settings.as_env()).output
    assert "* tiny-second" in listed


def test_workers_starting_together_register_their_bundle_once_and_both_warm_up(pg_url, tiny_bundle):
    """Two worker processes of a new deployment register the same bundle at the same moment: the
    second waits for the first's transaction and finds its row (before, its insert failed on the
    unique key and its warm-up with it); the bundle is registered and activated once."""
    import threading
    import time

    factory = session_factory(pg_url)
    first_registered, release = threading.Event(), threading.Event()
    second: dict = {}

    def first_worker():
        with factory() as session, session.begin():
            bundles.register_for_worker(session, tiny_bundle)
            first_registered.set()
            release.wait(30)  # its transaction stays open: the other worker starts meanwhile

    def second_worker():
        try:
            with factory() as session, session.begin():
                second["version"] = bundles.register_for_worker(session, tiny_bundle).version
        except Exception as exc:  # noqa: BLE001 — the test reports what the second worker met
            second["error"] = exc

    one = threading.Thread(target=first_worker)
    one.start()
    assert first_registered.wait(30)
    two = threading.Thread(target=second_worker)
    two.start()
    time.sleep(0.5)
    assert two.is_alive(), second  # waiting for the first worker's transaction
    release.set()
    one.join(30)
    two.join(30)
    assert "error" not in second, second
    with factory() as session:
        rows = list(session.scalars(select(ModelBundle)))
        assert [(r.version, r.active) for r in rows] == [(second["version"], True)]
        activated = session.scalars(select(AuditEvent).where(AuditEvent.action == "bundle_activated")).all()
        assert len(activated) == 1


def test_a_shadow_bundle_scores_the_same_studies_in_the_same_batch_and_decides_nothing(
    pg_settings, start_worker, ham_dir
):
    """Issue 15, item 1: the tiny bundle decides, the default bundle runs in shadow. Every study
    gets both predictions, only the active one's makes referrals and results; retiring stops the
    shadow, activation is atomic; every change audited."""
    from dermascan.infra.schema import Referral, Study
    from dermascan.screening.reports import study_result
    from model.inference.bundle import read_manifest
    from tests.services import ROOT

    settings = pg_settings
    default = read_manifest(ROOT / "model" / "bundles" / "default", verify=False)["version"]
    env = settings.as_env()
    cli = CliRunner()
    worker = start_worker(settings)
    wait_for(lambda: bundles_in(settings).get("tiny-test") == "active", 60, message="the tiny bundle active")
    for args in (["bundle", "register", str(ROOT / "model" / "bundles" / "default")], ["bundle", "shadow", default]):
        done = cli.invoke(main, args, env=env)
        assert done.exit_code == 0, done.output
    assert bundles_in(settings) == {"tiny-test": "active", default: "shadow"}
    refused = cli.invoke(main, ["bundle", "retire", "tiny-test"], env=env)
    assert refused.exit_code != 0 and "active bundle" in refused.output
    # the shadow would refer everything, the active bundle nothing it can assess: only its decision counts
    with session_factory(settings.database_url)() as session, session.begin():
        session.get(ModelBundle, default).threshold = 0.0
        session.get(ModelBundle, "tiny-test").threshold = 1.0

    first = submit(settings, program_id(settings), ham_inputs(ham_dir, 6), source="test")
    wait_for(lambda: status_counts(settings, first.batch_id).get("done") == 6, 240, message="scored")
    with session_factory(settings.database_url)() as session:
        predictions = list(session.scalars(select(Prediction)))
        by_study: dict[int, dict[str, Prediction]] = {}
        for p in predictions:
            by_study.setdefault(p.study_id, {})[p.bundle_version] = p
        assert len(by_study) == 6 and all(set(v) == {"tiny-test", default} for v in by_study.values())
        assert all(v[default].shadow and not v["tiny-test"].shadow for v in by_study.values())
        for referral in session.scalars(select(Referral)):
            assert referral.category == "not_assessable"  # never the shadow's high-risk call
            assert session.get(Prediction, referral.prediction_id).bundle_version == "tiny-test"
        for study in session.scalars(select(Study)):
            result = study_result(session, study)
            assert result["bundle_version"] == "tiny-test"  # results say which bundle decided
            if result["assessable"]:
                assert result["probability"] == round(by_study[study.id]["tiny-test"].probability, 6)
    assert "loaded shadow bundle " + default in worker.log()

    done = cli.invoke(main, ["bundle", "retire", default], env=env)
    assert done.exit_code == 0 and bundles_in(settings)[default] == "retired"
    second = submit(settings, program_id(settings), ham_inputs(ham_dir, 2, offset=6), source="test")
    wait_for(lambda: status_counts(settings, second.batch_id).get("done") == 2, 120, message="scored after retiring")
    with session_factory(settings.database_url)() as session:
        versions = session.scalars(
            select(Prediction.bundle_version)
            .join(Study, Study.id == Prediction.study_id)
            .where(Study.batch_id == second.batch_id)
        ).all()
    assert sorted(versions) == ["tiny-test", "tiny-test"]

    done = cli.invoke(main, ["bundle", "activate", default], env=env)
    assert done.exit_code == 0 and bundles_in(settings) == {"tiny-test": "registered", default: "active"}
    with session_factory(settings.database_url)() as session:
        actions = [
            (e.action, e.object_id)
            for e in session.scalars(
                select(AuditEvent).where(AuditEvent.object_type == "bundle").order_by(AuditEvent.id)
            )
        ]
    assert actions[-3:] == [("bundle_shadowed", default), ("bundle_retired", default), ("bundle_activated", default)]


def bundles_in(settings) -> dict[str, str]:
    with session_factory(settings.database_url)() as session:
        return {b.version: b.state for b in session.scalars(select(ModelBundle))}


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
