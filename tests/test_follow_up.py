"""Lesion follow-up end to end, with the bundled default model, a real worker, PostgreSQL and
Redis: two visits of a lesion sent through the REST API (and through DICOM C-STORE) are linked;
the second shows the first in the API, in the lesion's history, in FHIR and in the DICOM SR; the
two follow-up reasons ("newly high risk", "changed since last visit") get their own tiers in the
queue and their counts on the monitoring page; a lesion id of another patient is refused (the rest
of the batch kept); a visit sent late with an earlier date takes its place in time; a study
without a lesion id is as before. The browser test: the second visit's case page shows the first,
side by side, with the heat maps toggled together."""

from __future__ import annotations

import base64
import datetime as dt

import numpy as np
import pandas as pd
import pytest
from pynetdicom import AE
from sqlalchemy import select

from dermascan.infra.db import session_factory
from dermascan.infra.schema import Lesion, Prediction, Program, Referral, Study, StudyStatus
from dermascan.ingest.dicom import DERMOSCOPIC_PHOTOGRAPHY
from dermascan.ingest.follow_up import PRIVATE_CREATOR, PRIVATE_GROUP, PRIVATE_LESION_ELEMENT
from tests.dicom_factory import make_instance
from tests.ham_files import ham_images
from tests.services import ROOT, free_port, wait_for

DEFAULT = ROOT / "model" / "bundles" / "default"


@pytest.fixture(scope="module")
def picked(ham_dir):
    """HAM10000 images chosen with the bundled model itself (the worker gives the same answers):
    two low-probability lesions far apart (the second "changes" into the first), a low and a
    high one (newly high risk), and a lesion imaged twice (a real unchanged pair)."""
    from model.inference import bundle as bundle_lib
    from model.inference.change import from_bundle
    from model.inference.predictor import Predictor

    rows = pd.read_csv(ham_dir / "metadata.csv")
    twice = rows[rows.lesion_id.duplicated(keep=False)].groupby("lesion_id").head(2).head(2)
    pool = pd.concat([rows[rows.target == 0].head(40), rows[rows.target == 1].head(24), twice]).drop_duplicates(
        "isic_id"
    )
    images = ham_images(ham_dir, pool.isic_id)
    loaded = bundle_lib.load(DEFAULT)
    predictor = Predictor(bundle=loaded, batch_sizes=(1, 8), tta=bool(loaded.manifest["inference"]["tta"]))
    records = pool[["age_approx", "sex", "anatom_site_general"]].to_dict("records")
    scores = dict(zip(pool.isic_id, predictor.score([images[i] for i in pool.isic_id], records), strict=True))
    change, threshold = from_bundle(DEFAULT, loaded.manifest), loaded.threshold
    single = [i for i in scores if i not in set(twice.isic_id)]
    low = [i for i in single if scores[i].assessable and scores[i].probability < threshold / 2]
    high = [i for i in single if scores[i].assessable and scores[i].probability > 2 * threshold]
    far = max(((a, b) for a in low[:30] for b in low[:30] if a != b),
              key=lambda p: change.measure(scores[p[0]].embedding, scores[p[1]].embedding))  # fmt: skip
    assert change.measure(scores[far[0]].embedding, scores[far[1]].embedding) > 1.1 * change.threshold
    same = list(twice.isic_id[:2])
    by_id = rows.set_index("isic_id")
    return {
        "changed": far, "newly": (low[-1], high[0]), "same": same, "spare": low[-2],
        "images": images, "meta": by_id, "change_threshold": change.threshold,
    }  # fmt: skip


@pytest.fixture
def followed(make_settings, pg_url, redis_url, start_worker):
    # the default runtime: ONNX Runtime on the package shipped inside the bundle
    settings = make_settings(database_url=pg_url, broker_url=redis_url, model_bundle=DEFAULT, tta=None, runtime="auto")
    start_worker(settings)
    return settings


def record(picked, isic_id, lesion, patient, when, **extra):
    meta = picked["meta"].loc[isic_id]
    out = {
        "external_id": f"{isic_id}-{when}", "patient_id": patient, "lesion_id": lesion, "acquired_at": when,
        "age_approx": None if pd.isna(meta.age_approx) else float(meta.age_approx),
        "sex": None if pd.isna(meta.sex) else meta.sex,
        "anatom_site_general": None if pd.isna(meta.anatom_site_general) else meta.anatom_site_general,
        "image_base64": base64.b64encode(picked["images"][isic_id]).decode(),
    }  # fmt: skip
    out.update(extra)
    return {k: v for k, v in out.items() if v is not None}


def send(client, headers, records) -> dict:
    reply = client.post("/api/v1/batches", headers=headers, json={"records": records})
    assert reply.status_code == 201, reply.json
    return reply.json


def scored(settings, ids):
    def done():
        with session_factory(settings.database_url)() as session:
            rows = session.scalars(select(Study.status).where(Study.id.in_(ids))).all()
            return len(rows) == len(ids) and all(s in (StudyStatus.DONE, StudyStatus.FAILED) for s in rows)

    wait_for(done, 240, 0.5, "the visits scored")


def ids_of(reply) -> dict[str, int]:
    return {r["external_id"]: r["study_id"] for r in reply["records"] if r["status"] == "accepted"}


def test_two_visits_through_the_api_are_linked_compared_and_referred_for_why(followed, picked, app_factory, api_token):
    settings = followed
    _, token = api_token()
    headers = {"Authorization": f"Bearer {token}"}
    client = app_factory(settings).test_client()
    (c1, c2), (n1, n2), (s1, s2) = picked["changed"], picked["newly"], picked["same"]
    first = send(client, headers, [
        record(picked, c1, "L-changed", "P1", "2026-01-10"),
        record(picked, n1, "L-newly", "P2", "2026-01-10"),
        record(picked, s1, "L-same", "P3", "2026-01-10T09:30:00+01:00"),
    ])  # fmt: skip
    scored(settings, list(ids_of(first).values()))
    second = send(client, headers, [
        record(picked, c2, "L-changed", "P1", "2026-06-10"),
        record(picked, n2, "L-newly", "P2", "2026-06-10"),
        record(picked, s2, "L-same", "P3", "2026-06-10"),
        record(picked, picked["spare"], "L-same", "P4", "2026-06-11"),  # another patient: refused
        record(picked, picked["spare"], None, "P5", None, external_id="no-lesion"),  # as before
    ])  # fmt: skip
    assert second["accepted"] == 4 and second["rejected"] == 1, second
    refused = next(r for r in second["records"] if r["status"] == "rejected")
    assert refused["field"] == "lesion_id" and "another patient" in refused["reason"], refused
    later = ids_of(second)
    scored(settings, list(later.values()))
    before = ids_of(first)

    def study(external_id):
        reply = client.get(f"/api/v1/studies/{later.get(external_id) or before[external_id]}", headers=headers)
        assert reply.status_code == 200
        return reply.json

    changed = study(f"{c2}-2026-06-10")
    assert changed["previous_study_id"] == before[f"{c1}-2026-01-10"]
    assert [v["study_id"] for v in changed["earlier_visits"]] == [before[f"{c1}-2026-01-10"]]
    assert changed["changed_since_last_visit"] is True and changed["change_measure"] > picked["change_threshold"]
    assert changed["referral_category"] == "changed" and changed["referred"] is True
    assert changed["referral_reason"] == "changed since last visit"
    newly = study(f"{n2}-2026-06-10")
    assert newly["newly_high_risk"] is True and newly["referral_category"] == "newly_high_risk"
    assert newly["probability_change"] > 0
    same = study(f"{s2}-2026-06-10")
    assert same["previous_study_id"] == before[f"{s1}-2026-01-10T09:30:00+01:00"]
    assert same["change_measure"] is not None and 0 <= same["change_percentile"] <= 1
    assert same["changed_since_last_visit"] == (same["change_measure"] > picked["change_threshold"])
    plain = study("no-lesion")
    assert plain["lesion_id"] is None and plain["previous_study_id"] is None and "earlier_visits" not in plain
    # the lesion comes back by the sender's name, and its whole history (in time order) is found by it
    assert same["lesion_id"] == "L-same" and isinstance(same["dermascan_lesion_id"], int)
    lesion = client.get("/api/v1/lesions/L-same", headers=headers).json
    assert [v["study_id"] for v in lesion["history"]] == [same["previous_study_id"], same["study_id"]]
    assert (lesion["lesion_id"], lesion["dermascan_lesion_id"]) == ("L-same", same["dermascan_lesion_id"])
    assert (
        client.get(f"/api/v1/lesions/{same['dermascan_lesion_id']}", headers=headers).json == lesion
    )  # its own id too
    assert client.get("/api/v1/lesions/999999", headers=headers).status_code == 404
    assert client.get("/api/v1/lesions/L-unknown", headers=headers).status_code == 404
    _, other = api_token("another-program")  # another program's name for it finds nothing
    assert client.get("/api/v1/lesions/L-same", headers={"Authorization": f"Bearer {other}"}).status_code == 404
    # FHIR: the report references the previous report of the same lesion
    fhir = client.get(f"/api/v1/studies/{same['study_id']}/fhir", headers=headers).json
    reference = next(e for e in fhir["extension"] if e["url"].endswith("workflow-supportingInfo"))["valueReference"]
    assert reference["identifier"]["value"] == str(same["previous_study_id"])
    change = next(r for r in fhir["contained"] if r["id"] == "change-since-last-visit")
    assert change["focus"][0]["identifier"]["value"] == str(same["dermascan_lesion_id"])
    from fhir.resources.R4B.diagnosticreport import DiagnosticReport

    DiagnosticReport.model_validate(fhir)
    # every format: the batch's CSV export carries the follow-up columns
    csv_text = client.get(f"/api/v1/batches/{second['batch_id']}/export?format=csv", headers=headers).text
    assert "changed_since_last_visit" in csv_text.splitlines()[0] and "changed since last visit" in csv_text
    # the queue: each reason its own tier; the monitoring counts
    from dermascan.governance import monitoring
    from dermascan.referrals import queue

    with session_factory(settings.database_url)() as session:
        tiers = dict(session.execute(select(Referral.study_id, Referral.tier)).all())
        assert tiers[newly["study_id"]] == 0 and tiers[changed["study_id"]] == 4
        stats = queue.queue_stats(session, settings.claim_timeout_s)
        assert stats["by_tier"].get(0, 0) >= 1 and stats["by_tier"].get(4, 0) >= 1
        program = session.get(Program, session.get(Study, changed["study_id"]).program_id)
        window = monitoring.rolling(session, program, 7)
        assert window.newly_high_risk >= 1 and window.changed >= 1
    # a visit sent late, with an earlier date, takes its place in time (not the newest)
    third = send(client, headers, [record(picked, picked["spare"], "L-same", "P3", "2025-12-01")])
    early = ids_of(third)[f"{picked['spare']}-2025-12-01"]
    scored(settings, [early])
    history = client.get("/api/v1/lesions/L-same", headers=headers).json["history"]
    assert [v["study_id"] for v in history] == [early, same["previous_study_id"], same["study_id"]]
    assert history[0]["previous_study_id"] is None  # the first visit in time: nothing before it
    assert study(f"{s2}-2026-06-10")["previous_study_id"] == same["previous_study_id"]  # as compared


def test_two_visits_through_c_store_are_linked_with_the_lesion_in_the_sr(followed, picked):
    """DICOM: the lesion in DermaScan's private element (an alphanumeric id) or as the patient's
    Lesion Number (0018,3105); the second visit's SR tracks the lesion with the first's tracking
    UID and references the first visit's report."""
    from dermascan.intake.dicom_scp import AllowList, make_server
    from dermascan.results_out import objects

    settings = followed
    port = free_port()
    server = make_server(settings, "DERMASCAN", "127.0.0.1", port, AllowList.from_entries([], "clinic", True), None)
    try:
        s1, s2 = picked["same"]
        made = []
        for isic_id, day, number in ((s1, "20260110", None), (s2, "20260610", None), (s1, "20260110", 3), (s2, "20260612", 3)):  # fmt: skip
            ds = make_instance(picked["images"][isic_id], patient_id="DICOM-PAT-7")
            ds.AcquisitionDateTime = day + "093000"
            if number is None:
                ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True).add_new(
                    PRIVATE_LESION_ELEMENT, "LO", "IL_0007"
                )
            else:
                ds.LesionNumber = number
            made.append(ds)
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(DERMOSCOPIC_PHOTOGRAPHY, ["1.2.840.10008.1.2.4.50"])
        assoc = ae.associate("127.0.0.1", port, ae_title="DERMASCAN")
        assert assoc.is_established
        for ds in made:
            assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
    finally:
        server.shutdown()
    with session_factory(settings.database_url)() as session:
        studies = {s.sop_instance_uid: s for s in session.scalars(select(Study))}
        ids = [studies[ds.SOPInstanceUID].id for ds in made]
    scored(settings, ids)
    with session_factory(settings.database_url)() as session:
        rows = [session.get(Study, i) for i in ids]
        assert rows[0].lesion_id == rows[1].lesion_id and rows[2].lesion_id == rows[3].lesion_id
        assert rows[0].lesion_id != rows[2].lesion_id  # the private id and lesion number 3 are two lesions
        assert rows[1].acquired_at == dt.datetime(2026, 6, 10, 9, 30, tzinfo=dt.UTC)
        second = session.scalar(select(Prediction).where(Prediction.study_id == ids[1]))
        assert second.previous_study_id == ids[0]
        assert session.scalar(select(Prediction.previous_study_id).where(Prediction.study_id == ids[3])) == ids[2]
        sr = objects.build_objects(settings, session, rows[1], [objects.AI_SR])[objects.AI_SR]
        first_sr = objects.build_objects(settings, session, rows[0], [objects.AI_SR])[objects.AI_SR]
        assert session.scalar(select(Lesion.patient_pseudonym).where(Lesion.id == rows[0].lesion_id))
    referenced = sr.PertinentOtherEvidenceSequence[0]
    assert referenced.StudyInstanceUID == first_sr.StudyInstanceUID
    assert (
        referenced.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        == first_sr.SOPInstanceUID
    )

    def tracking_uids(ds):
        found = []

        def walk(items):
            for item in items:
                if item.get("ConceptNameCodeSequence") and item.ConceptNameCodeSequence[0].CodeValue == "112040":
                    found.append(item.UID)
                walk(item.get("ContentSequence", []))

        walk(ds.ContentSequence)
        return found

    assert tracking_uids(sr) and tracking_uids(sr) == tracking_uids(first_sr)


def test_the_change_measure_is_calibrated_on_unchanged_pairs_of_other_patients():
    """The shipped bundle's change measure: fitted on development patients, its false-alarm rate
    on held-out patients' unchanged same-lesion pairs at most 5 %, and two different lesions
    flagged far more often."""
    import json

    report = json.loads((DEFAULT / "manifest.json").read_text())["change"]["report"]
    assert report["report"]["pairs"] >= 200 and report["report"]["flagged_share"] <= 0.05
    assert report["report"]["different_lesions_flagged_share"] > 0.4
    assert report["fit"]["pairs"] > report["report"]["pairs"]


def test_the_change_measure_separates_the_same_lesion_from_another():
    from model.inference.change import fit

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(60, 40))
    features = np.concatenate(
        [centres + 0.1 * rng.normal(size=centres.shape), centres + 0.1 * rng.normal(size=centres.shape)]
    )
    lesions = [f"L{i}" for i in range(60)] * 2
    fit_rows = [i for i in range(120) if i % 60 < 40]
    report_rows = [i for i in range(120) if i % 60 >= 40]
    measure, report = fit(features, lesions, fit_rows, report_rows, components=8)
    assert report["report"]["pairs"] == 20 and report["report"]["flagged_share"] <= 0.1
    assert report["report"]["different_lesions_flagged_share"] > 0.9
    e = measure.embed(features)
    assert measure.measure(e[0], e[60]) < measure.threshold < measure.measure(e[0], e[1])
    assert 0 <= measure.percentile(measure.measure(e[0], e[60])) <= 1


@pytest.mark.browser
def test_the_case_page_shows_the_earlier_visit_side_by_side(
    followed, picked, live_server, browser, app_factory, api_token, artifacts
):
    """A specialist opens the second visit's case: the lesion's visits in a table, the two side by
    side at the same size, the heat maps of both toggled together (axe-core checks each page)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from dermascan.security.accounts import create_user
    from tests.test_browser import Steps

    settings = followed
    program_id, token = api_token("clinic-follow-up")
    with session_factory(settings.database_url)() as session, session.begin():
        create_user(session, "dr-follow", "long-enough-pass", "specialist", program_id)
    headers = {"Authorization": f"Bearer {token}"}
    client = app_factory(settings).test_client()
    n1, n2 = picked["newly"]
    first = ids_of(send(client, headers, [record(picked, n1, "L-9", "P-9", "2026-02-01")]))
    scored(settings, list(first.values()))
    second = ids_of(send(client, headers, [record(picked, n2, "L-9", "P-9", "2026-08-01")]))
    scored(settings, list(second.values()))
    earlier, later = next(iter(first.values())), next(iter(second.values()))

    def heatmaps():
        with session_factory(settings.database_url)() as session:
            return set(session.scalars(select(Prediction.study_id).where(Prediction.heatmap_sha256.is_not(None)))) >= {
                earlier,
                later,
            }

    wait_for(heatmaps, 180, 0.5, "heat maps of both visits (the earlier one for the comparison)")
    with session_factory(settings.database_url)() as session:
        referral = session.scalar(select(Referral).where(Referral.study_id == later))
        assert referral.category == "newly_high_risk" and referral.tier == 0
    server = live_server(settings)
    s = Steps(browser, server.url, artifacts / "browser-follow-up")
    s.login("dr-follow", "long-enough-pass")
    s.go("/referrals/")
    assert s.wait(By.ID, "waiting-tier-0").text == "1"
    s.go(f"/referrals/{referral.id}")
    history = s.wait(By.ID, "lesion-history")
    rows = history.find_elements(By.CSS_SELECTOR, "table.timeline tbody tr")
    assert [r.get_attribute("data-study") for r in rows] == [str(earlier), str(later)]
    assert "2026-02-01" in rows[0].text and "(this case)" in rows[1].text
    assert "newly high risk" in s.wait(By.ID, "referral-reason").text
    assert s.wait(By.ID, "newly-flag")
    left, right = browser.find_element(By.ID, "compare-a-image"), browser.find_element(By.ID, "compare-b-image")
    assert left.get_attribute("src").endswith(f"/studies/{earlier}/image")
    assert right.get_attribute("src").endswith(f"/studies/{later}/image")
    s.wait(By.ID, "compare-a-image")
    frames = [browser.find_element(By.ID, f"compare-{side}-frame") for side in "ab"]
    assert frames[0].size == frames[1].size  # the same size, whatever each image's own
    # the same viewer on both: zooming one zooms the other alike (relative to each one's fit)
    WebDriverWait(browser, 10).until(lambda d: all(f.get_attribute("data-scale") for f in frames))
    fitted = [float(f.get_attribute("data-scale")) for f in frames]
    browser.execute_script(
        "arguments[0].dispatchEvent(new WheelEvent('wheel', {deltaY: -100, clientX: 50, clientY: 50, bubbles: true, cancelable: true}))",
        frames[0],
    )
    zoomed = [float(f.get_attribute("data-scale")) for f in frames]
    assert zoomed[0] / fitted[0] == pytest.approx(1.2, rel=0.01) and zoomed[1] / fitted[1] == pytest.approx(
        1.2, rel=0.01
    )
    overlays = [browser.find_element(By.ID, f"compare-{side}-heatmap") for side in "ab"]
    assert not any(o.is_displayed() for o in overlays)
    s.shot("case-with-earlier-visit")
    browser.find_element(By.ID, "compare-heatmaps").click()
    assert all(o.is_displayed() for o in overlays)  # toggled together
    assert overlays[0].get_attribute("src").endswith(f"/studies/{earlier}/heatmap")
    s.shot("case-compare-heatmaps")
    browser.find_element(By.ID, "compare-heatmaps").click()
    assert not any(o.is_displayed() for o in overlays)
