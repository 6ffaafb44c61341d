"""Results back to a real PACS (issue 13): Orthanc from Debian's packages. Lesion images go in
to DermaScan by C-STORE and by STOW-RS; a real worker scores them; the AI result SR, the heat
map and the specialist's verified SR arrive in Orthanc by C-STORE and by STOW-RS, in the source
study, and are read back through Orthanc's REST API. A PACS that is down gets them once it is
back (once); one that refuses is marked failed with the reason, and scoring goes on."""

from __future__ import annotations

import re

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pynetdicom import AE
from sqlalchemy import select, update

from dermascan.infra.db import session_factory
from dermascan.infra.schema import Delivery, ModelBundle, Prediction, Referral, ReferralStatus, Study, utcnow
from dermascan.ingest.dicom import DERMOSCOPIC_PHOTOGRAPHY, VL_PHOTOGRAPHIC
from dermascan.intake.dicom_scp import AllowList, make_server
from dermascan.results_out import destinations, scheduling, transports
from dermascan.results_out.dicom_sr import DECISION, PROBABILITY
from dermascan.security.accounts import create_user
from dermascan.security.identity import get_or_create_program
from tests.dicom_factory import content_items, make_instance
from tests.dicom_factory import dciodvfy_errors as validate
from tests.ham_files import ham_images, ham_rows
from tests.services import Orthanc, free_port, wait_for

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
PASSWORD = "correct horse battery staple 9"


@pytest.fixture
def orthanc(tmp_path):
    pacs = Orthanc(tmp_path / "orthanc")
    yield pacs
    pacs.stop()


@pytest.fixture
def ham_jpegs(ham_dir):
    return list(ham_images(ham_dir, ham_rows(ham_dir, 6).isic_id).values())


@pytest.fixture
def c_store_receiver():
    servers = []

    def start(settings, program="hospital-b"):
        port = free_port()
        servers.append(make_server(settings, "DERMASCAN", "127.0.0.1", port, AllowList.from_entries([], program, allow_any=True)))  # fmt: skip
        return port

    yield start
    for server in servers:
        server.shutdown()


def c_store(port: int, datasets) -> None:
    ae = AE(ae_title="MODALITY")
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate("127.0.0.1", port, ae_title="DERMASCAN")
    assert assoc.is_established
    try:
        for ds in datasets:
            assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()


def add_destination(settings, program: str, name: str, **target) -> None:
    with session_factory(settings.database_url)() as session, session.begin():
        destinations.add_destination(session, settings, get_or_create_program(session, program), name, **target)


def study_rows(settings) -> list[Study]:
    with session_factory(settings.database_url)() as session:
        return list(session.scalars(select(Study).order_by(Study.id)))


def delivery_states(settings) -> dict[tuple[int, str, str], tuple[str, int, str | None]]:
    """(study id, destination name, object) → (status, attempts, detail)."""
    with session_factory(settings.database_url)() as session:
        return {
            (d.study_id, d.destination.name, d.object): (d.status, d.attempts, d.detail)
            for d in session.scalars(select(Delivery))
        }


def expected_objects(settings) -> dict[int, set[str]]:
    """What each scored study should have sent: the SR, and the heat map when referred for risk."""
    with session_factory(settings.database_url)() as session:
        out = {}
        for study in session.scalars(select(Study)):
            referral = session.scalar(select(Referral).where(Referral.study_id == study.id))
            out[study.id] = {"ai_sr"} | (
                {"heatmap"} if referral is not None and referral.category == "high_risk" else set()
            )
        return out


def all_sent(settings, destination_of: dict[int, str], extra: dict[int, set[str]] | None = None):
    states = delivery_states(settings)
    for study_id, objects in expected_objects(settings).items():
        for obj in objects | (extra or {}).get(study_id, set()):
            if states.get((study_id, destination_of[study_id], obj), ("",))[0] != "sent":
                return None
    return states


def fhir_report(settings, study_id: int) -> dict:
    from dermascan.results_out import fhir

    with session_factory(settings.database_url)() as session:
        return fhir.study_reports(session, [session.get(Study, study_id)], settings)[0]


def dciodvfy_errors(dataset, path) -> list[str]:
    dataset.save_as(path, enforce_file_format=True)
    return validate(path)


def refer_everything(settings) -> None:
    """Threshold 0 once the worker registered its bundle: every assessable study is referred
    for risk, so each gets a heat map and can be decided (an admin may move the threshold)."""
    factory = session_factory(settings.database_url)

    def registered():
        with factory() as session:
            return session.scalar(select(ModelBundle).where(ModelBundle.active.is_(True)))

    wait_for(registered, 60, message="the worker's bundle registered")
    with factory() as session, session.begin():
        session.execute(update(ModelBundle).values(threshold=0.0))


def test_results_reach_the_pacs_by_c_store_and_stow_rs_in_the_source_study(
    pg_settings, c_store_receiver, live_server, api_token, app_factory, start_worker, orthanc, ham_jpegs, tmp_path
):
    settings = pg_settings.replace(delivery_retry_s=0.5)
    start_worker(settings)
    refer_everything(settings)
    add_destination(settings, "hospital-b", "pacs-dimse", host="127.0.0.1", port=orthanc.dicom_port, ae_title="ORTHANC")
    add_destination(settings, "hospital-s", "pacs-stow", url=f"{orthanc.url}/dicom-web")

    # in by C-STORE (hospital-b): a dermoscopic JPEG and an uncompressed VL photograph
    by_dimse = [
        make_instance(ham_jpegs[0], patient_id="MRN-B1", age=52, sex="male", sop_class=DERMOSCOPIC_PHOTOGRAPHY),
        make_instance(ham_jpegs[1], patient_id="MRN-B2", age=67, sex="female", sop_class=VL_PHOTOGRAPHIC, compressed=False),
    ]  # fmt: skip
    c_store(c_store_receiver(settings), by_dimse)
    # in by STOW-RS (hospital-s)
    server = live_server(settings)
    _, token = api_token("hospital-s")
    by_stow = [make_instance(ham_jpegs[2], patient_id="MRN-S1", age=45, sex="female")]
    client = DICOMwebClient(url=f"{server.url}/dicomweb", headers={"Authorization": f"Bearer {token}"})
    assert "FailedSOPSequence" not in client.store_instances(datasets=by_stow)

    wait_for(lambda: len(study_rows(settings)) == 3 and all(s.status == "done" for s in study_rows(settings)), 180,
             message="the studies scored")  # fmt: skip
    studies = {s.sop_instance_uid: s for s in study_rows(settings)}
    destination_of = {s.id: ("pacs-dimse" if s.program_id != studies[by_stow[0].SOPInstanceUID].program_id else "pacs-stow")
                      for s in studies.values()}  # fmt: skip
    wait_for(lambda: all_sent(settings, destination_of), 180, message="the results delivered")
    expected = expected_objects(settings)
    assert any("heatmap" in objects for objects in expected.values()), "no study referred for risk"

    with session_factory(settings.database_url)() as session:
        predictions = {p.study_id: p for p in session.scalars(select(Prediction))}
    for n, source in enumerate(by_dimse + by_stow):
        study = studies[source.SOPInstanceUID]
        stored = orthanc.datasets(source.StudyInstanceUID)
        by_class = {}
        for ds in stored:
            by_class.setdefault(ds.SOPClassUID, []).append(ds)
        assert len(by_class[COMPREHENSIVE_3D_SR]) == 1
        sr = by_class[COMPREHENSIVE_3D_SR][0]
        # in the source study, filed with the patient as received, in a new series
        assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.SeriesInstanceUID != source.SeriesInstanceUID
        assert (sr.PatientID, sr.AccessionNumber) == (source.PatientID, source.AccessionNumber)
        items = list(content_items(sr))
        assert source.SOPInstanceUID in [r.ReferencedSOPInstanceUID for i in items for r in i.get("ReferencedSOPSequence", [])]  # fmt: skip
        prediction = predictions[study.id]
        numbers = [float(i.MeasuredValueSequence[0].NumericValue) for i in items
                   if i.ValueType == "NUM" and i.ConceptNameCodeSequence[0].CodeValue == PROBABILITY.value]  # fmt: skip
        assert numbers == ([pytest.approx(prediction.probability, abs=1e-6)] if prediction.assessable else [])
        assert prediction.bundle_version in " ".join(str(i.get("TextValue", "")) for i in items)
        if "heatmap" in expected[study.id]:
            (sc,) = by_class[SECONDARY_CAPTURE]
            assert sc.BurnedInAnnotation == "YES" and sc.StudyInstanceUID == source.StudyInstanceUID
            assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
            assert sc.pixel_array.ndim == 3 and sc.pixel_array.std() > 0
        for k, ds in enumerate(stored):  # every object DermaScan wrote, as the PACS holds it
            assert not dciodvfy_errors(ds, tmp_path / f"out{n}-{k}.dcm"), ds.SOPClassUID

    # the API shows where each result went
    study = studies[by_stow[0].SOPInstanceUID]
    shown = requests.get(f"{server.url}/api/v1/studies/{study.id}", headers={"Authorization": f"Bearer {token}"}, timeout=30).json()  # fmt: skip
    assert {(d["destination"], d["object"], d["status"]) for d in shown["deliveries"]} == {
        ("pacs-stow", obj, "sent") for obj in expected[study.id]
    }
    assert all(d["sop_instance_uid"] for d in shown["deliveries"])

    # a specialist decides a referred case in the portal: a verified SR goes back, referring to the AI result
    referred = next(s for s in studies.values() if "heatmap" in expected[s.id] and destination_of[s.id] == "pacs-dimse")
    with session_factory(settings.database_url)() as session, session.begin():
        user = create_user(session, "dr.grey", PASSWORD, "specialist", get_or_create_program(session, "hospital-b").id)
        session.flush()
        referral_id = session.scalar(select(Referral.id).where(Referral.study_id == referred.id))
        # this very case claimed by her (claiming the top of the queue is tested in test_referrals)
        session.execute(update(Referral).where(Referral.id == referral_id).values(
            status=ReferralStatus.CLAIMED, claimed_by_id=user.id, claimed_at=utcnow()))  # fmt: skip
    portal = app_factory(settings).test_client()
    csrf = lambda html: re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', html).group(1)  # noqa: E731
    portal.post(
        "/login", data={"username": "dr.grey", "password": PASSWORD, "csrf_token": csrf(portal.get("/login").text)}
    )
    page = portal.get(f"/referrals/{referral_id}").text
    assert 'id="deliveries"' in page and "pacs-dimse" in page  # the case page shows what reached the PACS
    answer = portal.post(f"/referrals/{referral_id}/decide", data={
        "decision": "biopsy_or_excision", "note": "Atypical network.", "csrf_token": csrf(page)})  # fmt: skip
    assert answer.status_code == 302, answer.text
    wait_for(
        lambda: all_sent(settings, destination_of, {referred.id: {"verified_sr"}}),
        120,
        message="the decision delivered",
    )
    source = next(ds for ds in by_dimse if ds.SOPInstanceUID == referred.sop_instance_uid)
    reports = [ds for ds in orthanc.datasets(source.StudyInstanceUID) if ds.SOPClassUID == COMPREHENSIVE_3D_SR]
    ai = next(ds for ds in reports if ds.VerificationFlag == "UNVERIFIED")
    verified = next(ds for ds in reports if ds.VerificationFlag == "VERIFIED")
    assert str(verified.VerifyingObserverSequence[0].VerifyingObserverName) == "dr.grey^"
    evidence = [i.ReferencedSOPInstanceUID for s in verified.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence]  # fmt: skip
    assert ai.SOPInstanceUID in evidence
    items = list(content_items(verified))
    assert [i.ConceptCodeSequence[0].CodeValue for i in items if i.ValueType == "CODE"
            and i.ConceptNameCodeSequence[0].CodeValue == DECISION.value] == ["BIOPSY"]  # fmt: skip
    assert not dciodvfy_errors(verified, tmp_path / "verified.dcm")

    # she amends it, with a reason: a new verified SR supersedes the first in the PACS, FHIR shows it
    page = portal.get(f"/referrals/{referral_id}").text
    assert 'id="amend-form"' in page
    missing = portal.post(
        f"/referrals/{referral_id}/amend", data={"decision": "routine_follow_up", "csrf_token": csrf(page)}
    )
    assert missing.status_code == 400 and "say why the decision changes" in missing.text  # no reason, nothing changed
    answer = portal.post(f"/referrals/{referral_id}/amend", data={
        "decision": "routine_follow_up", "reason": "dermoscopy re-read: regular network", "csrf_token": csrf(page)})  # fmt: skip
    assert answer.status_code == 302, answer.text

    def superseded():
        found = [ds for ds in orthanc.datasets(source.StudyInstanceUID) if ds.SOPClassUID == COMPREHENSIVE_3D_SR
                 and ds.VerificationFlag == "VERIFIED" and ds.SOPInstanceUID != verified.SOPInstanceUID]  # fmt: skip
        return found[0] if found else None

    amended = wait_for(superseded, 120, message="the amended decision in the PACS")
    predecessors = [i.ReferencedSOPInstanceUID for s in amended.PredecessorDocumentsSequence
                    for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence]  # fmt: skip
    assert predecessors == [verified.SOPInstanceUID]
    assert [i.ConceptCodeSequence[0].CodeValue for i in content_items(amended) if i.ValueType == "CODE"
            and i.ConceptNameCodeSequence[0].CodeValue == DECISION.value] == ["FOLLOWUP"]  # fmt: skip
    assert not dciodvfy_errors(amended, tmp_path / "amended.dcm")
    fhir = fhir_report(settings, referred.id)
    decision = next(r for r in fhir["contained"] if r["id"] == "decision")
    assert (
        decision["status"] == "amended" and decision["valueCodeableConcept"]["coding"][0]["code"] == "routine_follow_up"
    )
    assert "regular network" in decision["note"][-1]["text"] and "Amended from Biopsy or excision" in fhir["conclusion"]


def test_a_pacs_that_is_down_gets_the_result_once_back_and_a_refusing_one_fails_visibly(
    pg_settings, c_store_receiver, start_worker, orthanc, ham_jpegs
):
    settings = pg_settings.replace(delivery_retry_s=0.5)
    add_destination(settings, "hospital-b", "pacs", host="127.0.0.1", port=orthanc.dicom_port, ae_title="ORTHANC")
    add_destination(
        settings, "hospital-b", "wrong-ae", host="127.0.0.1", port=orthanc.dicom_port, ae_title="NOT_ORTHANC"
    )
    orthanc.stop()
    start_worker(settings)
    source = make_instance(ham_jpegs[3], patient_id="MRN-DOWN")
    c_store(c_store_receiver(settings), [source])
    # scoring is not held up by the PACS being down
    wait_for(lambda: [s.status for s in study_rows(settings)] == ["done"], 120, message="the study scored")
    (study,) = study_rows(settings)

    def retrying():
        state = delivery_states(settings).get((study.id, "pacs", "ai_sr"))
        return state if state and state[0] == "retrying" and state[1] >= 2 else None

    status, attempts, detail = wait_for(retrying, 60, message="the delivery retried")
    assert "no association" in detail
    orthanc.start()
    wait_for(lambda: delivery_states(settings)[(study.id, "pacs", "ai_sr")][0] == "sent", 120, message="sent once back")
    # the destination that refuses (Orthanc checks the called AE title): failed, with the reason
    wait_for(lambda: delivery_states(settings)[(study.id, "wrong-ae", "ai_sr")][0] == "failed", 120, message="refused")
    assert "rejected" in delivery_states(settings)[(study.id, "wrong-ae", "ai_sr")][2]

    def instances():
        return orthanc.get("/statistics").json()["CountInstances"]

    wait_for(lambda: instances() >= 1, 30, message="Orthanc to index the SR")
    stored = instances()
    # sent again (an admin's resend after the refusal was fixed, or a retry after a lost answer):
    # the same SOP Instance UIDs, so the PACS still holds one copy
    with session_factory(settings.database_url)() as session, session.begin():
        session.execute(update(Delivery).where(Delivery.study_id == study.id).values(status="failed"))
    scheduling.resend(settings, study.id)
    wait_for(lambda: delivery_states(settings)[(study.id, "pacs", "ai_sr")][1] == 1
             and delivery_states(settings)[(study.id, "pacs", "ai_sr")][0] == "sent", 60, message="the resend")  # fmt: skip
    assert instances() == stored
    assert [ds.SOPClassUID for ds in orthanc.datasets(source.StudyInstanceUID)].count(COMPREHENSIVE_3D_SR) == 1


def test_a_program_that_asks_gets_the_results_of_its_rest_api_studies_in_the_pacs_too(
    pg_settings, start_worker, orthanc, ham_dir, tmp_path
):
    """Item 5: studies without a DICOM identity get an SR only when their program asks; then
    under UIDs DermaScan makes, filed under the patient's pseudonym."""
    from click.testing import CliRunner

    from dermascan.cli import main
    from dermascan.intake.submission import submit
    from tests.helpers import ham_inputs

    settings = pg_settings.replace(delivery_retry_s=0.5)
    add_destination(settings, "telederm", "pacs", url=f"{orthanc.url}/dicom-web")
    add_destination(settings, "quiet", "pacs", url=f"{orthanc.url}/dicom-web")
    asked = CliRunner().invoke(main, ["program", "dicom-results", "telederm", "--all-studies"], env=settings.as_env())
    assert asked.exit_code == 0, asked.output
    with session_factory(settings.database_url)() as session, session.begin():
        programs = {name: get_or_create_program(session, name).id for name in ("telederm", "quiet")}
    wanted = submit(settings, programs["telederm"], ham_inputs(ham_dir, 2), source="api").accepted
    submit(settings, programs["quiet"], ham_inputs(ham_dir, 1, offset=2), source="api")  # did not ask: nothing sent
    start_worker(settings)
    wait_for(lambda: all(s.status == "done" for s in study_rows(settings)) and len(study_rows(settings)) == 3, 120,
             message="the studies scored")  # fmt: skip
    ids = {a.study_id for a in wanted}
    wait_for(lambda: all(delivery_states(settings).get((i, "pacs", "ai_sr"), ("",))[0] == "sent" for i in ids), 120,
             message="the SRs delivered")  # fmt: skip
    assert {key[0] for key in delivery_states(settings)} <= ids  # the program that did not ask: nothing
    studies = {s.id: s for s in study_rows(settings)}
    for study_id in ids:
        pseudonym = studies[study_id].patient_pseudonym
        (patient,) = orthanc.get_json_post("/tools/find", {"Level": "Study", "Query": {"PatientID": pseudonym[:64]}, "Expand": True})  # fmt: skip
        (sr,) = [ds for ds in orthanc.datasets(patient["MainDicomTags"]["StudyInstanceUID"]) if ds.SOPClassUID == COMPREHENSIVE_3D_SR]  # fmt: skip
        assert sr.PatientID == pseudonym[:64] and str(sr.PatientName) == ""
        assert not dciodvfy_errors(sr, tmp_path / f"api-{study_id}.dcm")


def test_results_go_by_dicom_tls_to_a_pacs_that_requires_our_certificate(ham_jpegs, tmp_path):
    """DIMSE over TLS (PS3.15 B.1) to a storage SCP that checks its certificate chain both ways:
    DermaScan verifies the PACS against the configured CA and shows its own certificate."""
    import ssl

    from pynetdicom import AE as ServerAE
    from pynetdicom import evt
    from pynetdicom.sop_class import ComprehensiveSRStorage  # noqa: F401 (the name is registered)

    from dermascan.config import Settings
    from dermascan.infra.schema import DicomDestination
    from dermascan.results_out.dicom_sr import AiResult, ai_result_report
    from tests.test_c_store import make_cert

    ca_cert, _, ca_key, ca_name = make_cert(tmp_path, "ca")
    pacs_cert, pacs_key, _, _ = make_cert(tmp_path, "pacs", ca_key, ca_name)
    our_cert, our_key, _, _ = make_cert(tmp_path, "dermascan", ca_key, ca_name)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(str(pacs_cert), str(pacs_key))
    server_context.load_verify_locations(str(ca_cert))
    server_context.verify_mode = ssl.CERT_REQUIRED
    received = []

    def on_store(event):
        received.append(event.dataset.SOPInstanceUID)
        return 0x0000

    pacs = ServerAE(ae_title="TLSPACS")
    pacs.add_supported_context(COMPREHENSIVE_3D_SR, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    port = free_port()
    server = pacs.start_server(("127.0.0.1", port), block=False, ssl_context=server_context,
                               evt_handlers=[(evt.EVT_C_STORE, on_store)])  # fmt: skip
    try:
        source = make_instance(ham_jpegs[0])
        del source.PixelData
        report = ai_result_report(source, AiResult(0.4, 0.06, None, "v", "ab" * 32))
        target = DicomDestination(name="tls", kind="dimse", host="127.0.0.1", port=port, ae_title="TLSPACS", tls=True)
        trusted = Settings.from_env(env={}, data_dir=tmp_path, dicom_tls_ca_file=str(ca_cert),
                                    dicom_tls_client_cert=str(our_cert), dicom_tls_client_key=str(our_key),
                                    destination_allow_hosts="127.0.0.1")  # fmt: skip
        transports.send_dimse(trusted, target, [report])
        assert received == [report.SOPInstanceUID]
        # without our certificate the PACS refuses the handshake; a PACS we cannot verify is not sent to
        for settings in (
            trusted.replace(dicom_tls_client_cert="", dicom_tls_client_key=""),
            trusted.replace(dicom_tls_ca_file=""),
        ):
            with pytest.raises(transports.Unreachable):
                transports.send_dimse(settings, target, [report])
        assert received == [report.SOPInstanceUID]
    finally:
        server.shutdown()
