"""What a program sees of its own patients: its local validation (studies with recorded outcomes),
the threshold an admin sets from it (used for that program's referrals, results and monitoring),
and in monitoring the model's suspected diagnoses against what specialists and histopathology found."""

from __future__ import annotations

import re

import numpy as np
import pytest
from selenium.webdriver.common.by import By
from sklearn.metrics import roc_auc_score
from sqlalchemy import select

from dermascan.governance import bundles, local_validation, monitoring, operating_point
from dermascan.infra.db import session_factory
from dermascan.infra.schema import (
    AuditEvent,
    Prediction,
    Program,
    ProgramThreshold,
    Referral,
    Study,
    StudyStatus,
    User,
    utcnow,
)
from dermascan.referrals import outcomes
from dermascan.screening import results
from dermascan.screening.reports import study_result
from dermascan.security.accounts import create_user
from dermascan.security.identity import get_or_create_program

PASSWORD = "correct-horse-battery"


def csrf(html: str) -> str:
    return re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', html).group(1)


def scored_studies(session, program, bundle, probabilities) -> list[int]:
    """Studies of ``program`` scored with ``probabilities`` through the real result writer."""
    studies = [
        Study(program_id=program.id, source="test", meta={"anatom_site_general": "torso"}, image_sha256="0" * 64,
              image_format="jpeg", status=StudyStatus.PROCESSING)
        for _ in probabilities
    ]  # fmt: skip
    session.add_all(studies)
    session.flush()
    scored = [results.ScoredStudy(s.id, float(p)) for s, p in zip(studies, probabilities, strict=True)]
    results.record(session, bundle.version, bundle.threshold, scored)
    return [s.id for s in studies]


def local_set(settings, tiny_bundle, n_malignant=60, n_benign=80, name="pigmented-clinic"):
    """A program whose studies carry outcomes: malignant ones score higher on the whole."""
    rng = np.random.default_rng(3)
    p_mal = np.clip(rng.beta(5, 2, n_malignant), 0.01, 0.99)
    p_ben = np.clip(rng.beta(2, 4, n_benign), 0.01, 0.99)
    with session_factory(settings.database_url)() as session, session.begin():
        program = get_or_create_program(session, name)
        bundle = bundles.register(session, tiny_bundle)
        ids = scored_studies(session, program, bundle, np.concatenate([p_mal, p_ben]))
        for i, study_id in enumerate(ids):
            outcomes.record(session, study_id, "malignant" if i < n_malignant else "benign", source="csv")
        # one study without histopathology is left out, and says so
        extra = scored_studies(session, program, bundle, [0.5])[0]
        outcomes.record(session, extra, "not_biopsied", source="csv")
        return program.id, np.r_[np.ones(n_malignant), np.zeros(n_benign)], np.concatenate([p_mal, p_ben])


def test_local_validation_figures_are_those_of_the_local_set():
    """Pure logic: the candidates' counts, intervals and per-1,000 figures, by hand."""
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.2, 0.1, 0.05])
    auc, ci, roc, candidates = local_validation.validate(y, p, {"bundle default": 0.5}, prevalence=0.1)
    assert auc == pytest.approx(roc_auc_score(y, p)) and ci[0] <= auc <= ci[1]
    assert roc[0] == (0.0, 0.0) and roc[-1] == (1.0, 1.0)
    default = next(c for c in candidates if c.why == "bundle default")
    assert (default.sensitivity, default.specificity, default.referred, default.missed) == (0.75, 5 / 6, 4, 1)
    assert default.sensitivity_ci95[0] < 0.75 < default.sensitivity_ci95[1]
    assert default.per_1000 == pytest.approx(1000 * (0.1 * 0.75 + 0.9 * (1 / 6)))
    # the set's own levels: the highest threshold that refers at least 0.90 / 0.95 … of its malignant lesions
    at_95 = next(c for c in candidates if c.why == "sensitivity 0.95 on this set")
    assert at_95.threshold == pytest.approx(0.3) and at_95.sensitivity == 1.0
    assert [c.threshold for c in candidates] == sorted(c.threshold for c in candidates)
    # one class only: no ROC, no AUC, the named thresholds still shown
    auc, ci, roc, candidates = local_validation.validate(np.zeros(3), np.array([0.1, 0.2, 0.3]), {"x": 0.25})
    assert auc is None and roc == [] and [c.why for c in candidates] == ["x"]


def test_an_admin_sets_a_programs_threshold_from_its_local_validation(pg_settings, tiny_bundle, app_factory):
    settings = pg_settings
    factory = session_factory(settings.database_url)
    program_id, y, p = local_set(settings, tiny_bundle)
    with factory() as session, session.begin():
        create_user(session, "chief", PASSWORD, "admin", program_id)
        create_user(session, "uploader1", PASSWORD, "uploader", program_id)
        other = get_or_create_program(session, "gp-tele")
        other_id = other.id
        bundle = bundles.active(session)
        default = bundle.threshold
    client = app_factory(settings).test_client()
    client.post(
        "/login", data={"username": "chief", "password": PASSWORD, "csrf_token": csrf(client.get("/login").text)}
    )
    url = f"/admin/programs/{program_id}/operating-point"

    page = client.get(url)
    assert page.status_code == 200
    assert '<strong id="local-n">140</strong>' in page.text and '<strong id="local-malignant">60</strong>' in page.text
    assert "1 not biopsied (no histopathology)" in page.text and "Enough to choose a threshold on" in page.text
    assert f'<strong id="local-auc">{roc_auc_score(y, p):.3f}</strong>' in page.text
    assert f"/admin/programs/{program_id}/operating-point" in client.get("/admin/model").text  # linked

    # a threshold out of range is refused with its reason, nothing set
    refused = client.post(url, data={"threshold": "1.5", "csrf_token": csrf(page.text)})
    assert refused.status_code == 400 and "Number must be between" in refused.text
    # preview: the local set's figures at the threshold, nothing set yet
    chosen = 0.62
    preview = client.post(url, data={"threshold": str(chosen), "csrf_token": csrf(page.text)})
    sens, spec = (p[y == 1] >= chosen).mean(), (p[y == 0] < chosen).mean()
    assert preview.status_code == 200 and f"sensitivity <strong>{sens:.3f}</strong>" in preview.text
    assert f"specificity <strong>{spec:.3f}</strong>" in preview.text
    with factory() as session:
        assert session.scalar(select(ProgramThreshold)) is None
    done = client.post(url, data={"threshold": str(chosen), "confirm": "y", "csrf_token": csrf(preview.text)})
    assert done.status_code == 302
    with factory() as session:
        row = session.scalar(select(ProgramThreshold))
        assert (row.program_id, row.bundle_version, row.threshold) == (program_id, bundle.version, chosen)
        assert row.basis["n"] == 140 and row.basis["sensitivity"] == pytest.approx(sens)
        event = session.scalar(select(AuditEvent).where(AuditEvent.action == "program_threshold_set"))
        assert event.detail["to"] == chosen and event.detail["from"] is None and event.detail["default"] == default
    assert f'<strong id="threshold-in-force">{chosen:.4f}</strong>' in client.get(url).text

    # from now on: the program's studies are referred by its threshold, another program's by the bundle's
    between = (default + chosen) / 2
    with factory() as session, session.begin():
        program, bundle = session.get(Program, program_id), bundles.active(session)
        mine = scored_studies(session, program, bundle, [between])[0]
        theirs = scored_studies(session, session.get(Program, other_id), bundle, [between])[0]
    with factory() as session:
        referred = set(session.scalars(select(Referral.study_id).where(Referral.study_id.in_([mine, theirs]))))
        assert referred == {theirs}
        assert session.scalar(select(Prediction.threshold).where(Prediction.study_id == mine)) == chosen
        mine_row, theirs_row = study_result(session, session.get(Study, mine)), study_result(session, session.get(Study, theirs))  # fmt: skip
        assert (mine_row["threshold"], mine_row["referred"]) == (round(chosen, 6), False)
        assert (theirs_row["threshold"], theirs_row["referred"]) == (round(default, 6), True)
        # monitoring expects the referral rate of the program's own threshold
        window = monitoring.rolling(session, session.get(Program, program_id), 30)
        point = operating_point.at_threshold(bundle.manifest, chosen)
        prevalence = operating_point.validation_prevalence(bundle.manifest)
        assert window.expected_rate == pytest.approx(operating_point.referrals_per_1000(point, prevalence) / 1000)

    # a program with too few labelled lesions is told so
    small = client.get(f"/admin/programs/{other_id}/operating-point")
    assert small.status_code == 200 and "Too few to choose a threshold on" in small.text
    # only admins
    uploader = app_factory(settings).test_client()
    uploader.post("/login", data={"username": "uploader1", "password": PASSWORD, "csrf_token": csrf(uploader.get("/login").text)})  # fmt: skip
    assert uploader.get(url).status_code == 403
    assert client.get("/admin/programs/999999/operating-point").status_code == 404

    # cleared: the bundle's threshold applies again, audited
    page = client.get(url)
    assert client.post(url, data={"clear": "1", "csrf_token": csrf(page.text)}).status_code == 302
    with factory() as session:
        assert session.scalar(select(ProgramThreshold)) is None
        actions = [e.detail["to"] for e in session.scalars(select(AuditEvent).where(AuditEvent.action == "program_threshold_set").order_by(AuditEvent.id))]  # fmt: skip
        assert actions == [chosen, None]


@pytest.mark.browser
def test_the_local_validation_page_in_a_browser(pg_settings, tiny_bundle, live_server, browser, artifacts):
    from tests.test_browser import Steps

    settings = pg_settings
    program_id, _, _ = local_set(settings, tiny_bundle)
    with session_factory(settings.database_url)() as session, session.begin():
        create_user(session, "chief", PASSWORD, "admin", program_id)
    server = live_server(settings)
    s = Steps(browser, server.url, artifacts / "program-threshold")
    s.login("chief", PASSWORD)
    s.go(f"/admin/programs/{program_id}/operating-point")
    s.wait(By.ID, "local-roc")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#candidates tbody tr")) >= 5
    s.shot("local-validation")
    browser.execute_script("document.getElementById('candidates').scrollIntoView()")
    s.shot("local-validation-candidates")
    field = browser.find_element(By.NAME, "threshold")
    field.clear()
    field.send_keys("0.62")
    s.follow(browser.find_element(By.ID, "preview-program-threshold"))
    s.wait(By.ID, "previewed-row")
    browser.find_element(By.NAME, "confirm").click()
    s.follow(browser.find_element(By.ID, "save-program-threshold"))
    s.wait_text(By.ID, "threshold-in-force", "0.6200")
    s.shot("program-threshold-set")


def test_monitoring_shows_the_suspected_mix_and_its_confusion_with_what_people_found(
    pg_settings, tiny_bundle, app_factory
):
    """The differential in monitoring: the suspected-diagnosis mix against the bundle's validation
    mix, and the suspected diagnosis against the specialists' and histopathology's diagnoses."""
    from dermascan.referrals import queue

    settings = pg_settings
    factory = session_factory(settings.database_url)
    melanoma, nevus = [0.7, 0.2, 0.02, 0.02, 0.02, 0.02, 0.02], [0.1, 0.8, 0.02, 0.02, 0.02, 0.02, 0.02]
    with factory() as session, session.begin():
        program = get_or_create_program(session, "mix-clinic")
        bundle = bundles.register(session, tiny_bundle)
        studies = [
            Study(program_id=program.id, source="test", meta={}, image_sha256="0" * 64, image_format="jpeg",
                  status=StudyStatus.PROCESSING)
            for _ in range(5)
        ]  # fmt: skip
        session.add_all(studies)
        session.flush()
        differentials = [melanoma, melanoma, melanoma, nevus, nevus]
        results.record(session, bundle.version, 0.3, [
            results.ScoredStudy(s.id, 0.6 if d is melanoma else 0.1, differential=d)
            for s, d in zip(studies, differentials, strict=True)
        ])  # fmt: skip
        ids, program_id = [s.id for s in studies], program.id
        create_user(session, "derm", PASSWORD, "specialist", program_id)
        create_user(session, "chief", PASSWORD, "admin", program_id)
    with factory() as session, session.begin():
        specialist = session.scalar(select(Referral.id).where(Referral.study_id == ids[0]))
        derm = session.scalar(select(User.id).where(User.username == "derm"))
        queue.claim(session, specialist, derm, 600)
        queue.decide(session, specialist, derm, "biopsy_or_excision", None, 600, diagnosis="bcc")
        outcomes.record(session, ids[0], "malignant", "basal cell carcinoma", source="csv")
        outcomes.record(session, ids[1], "malignant", "mel", source="portal")
        outcomes.record(session, ids[3], "benign", "nv", source="portal")
    with factory() as session:
        window = monitoring.rolling(session, session.get(Program, program_id), 30)
        assert window.diagnosis_mix == {"mel": 3, "nv": 2} and window.diagnosed == 5
        assert window.confusion_specialist == {("mel", "bcc"): 1}
        assert window.confusion_outcome == {("mel", "bcc"): 1, ("mel", "mel"): 1, ("nv", "nv"): 1}
        columns, rows = window.confusion_rows("outcome")
        assert columns == ["mel", "nv", "bcc"] and rows == [("mel", [1, 0, 1]), ("nv", [0, 1, 0])]
        mix = {row["code"]: row for row in window.mix_rows()}
        assert mix["mel"]["share"] == pytest.approx(0.6) and mix["df"]["n"] == 0
        shipped = (bundle.manifest.get("diagnosis") or {}).get("report", {}).get("predicted_mix")
        assert window.validation_mix == shipped
    client = app_factory(settings).test_client()
    client.post(
        "/login", data={"username": "chief", "password": PASSWORD, "csrf_token": csrf(client.get("/login").text)}
    )
    page = client.get(f"/admin/monitoring/?program={program_id}").text
    assert 'id="diagnosis-mix"' in page and 'id="confusion-specialist"' in page and 'id="confusion-outcome"' in page
    month = utcnow().strftime("%Y-%m")
    report = client.get(f"/admin/monitoring/report?program={program_id}&month={month}").text
    assert "Suspected diagnosis" in report and 'id="confusion-outcome"' in report
