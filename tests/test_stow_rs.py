"""DICOM ingest with real clients: dicomweb-client's STOW-RS against the live web app, and
dcmtk's storescu and pynetdicom against the C-STORE receiver."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import select, text

from dermascan.infra.db import session_factory
from dermascan.infra.schema import Prediction, Study
from dermascan.ingest.dicom import DERMOSCOPIC_PHOTOGRAPHY, VL_PHOTOGRAPHIC
from dermascan.intake.dicom_scp import AllowList, make_server
from dermascan.security.identity import pseudonymise
from tests.dicom_factory import SECONDARY_CAPTURE, make_instance, stow, to_bytes, write
from tests.ham_files import ham_images, ham_rows
from tests.helpers import status_counts
from tests.services import free_port, wait_for


@pytest.fixture
def ham_jpegs(ham_dir):
    rows = ham_rows(ham_dir, 6)
    return list(ham_images(ham_dir, rows.isic_id).values())


def studies(settings):
    with session_factory(settings.database_url)() as session:
        return list(session.scalars(select(Study).order_by(Study.id)))


# -- STOW-RS -------------------------------------------------------------------------------------
def test_stow_rs_with_dicomweb_client_is_scored_with_header_metadata(
    pg_settings, live_server, api_token, start_worker, ham_jpegs
):
    settings = pg_settings
    server = live_server(settings)
    program_id, token = api_token("hospital-a")
    client = DICOMwebClient(url=f"{server.url}/dicomweb", headers={"Authorization": f"Bearer {token}"})
    instances = [
        make_instance(
            ham_jpegs[0], age=55, sex="male", site="head/neck", patient_id="MRN-1", sop_class=DERMOSCOPIC_PHOTOGRAPHY
        ),
        make_instance(
            ham_jpegs[1],
            age=70,
            sex="female",
            site="lower extremity",
            patient_id="MRN-1",
            sop_class=VL_PHOTOGRAPHIC,
            compressed=False,
        ),
    ]
    answer = client.store_instances(datasets=instances)
    referenced = answer.ReferencedSOPSequence
    assert [item.ReferencedSOPInstanceUID for item in referenced] == [ds.SOPInstanceUID for ds in instances]
    assert "FailedSOPSequence" not in answer

    # a re-sent instance is not a second study
    client.store_instances(datasets=[instances[0]])
    assert len(studies(settings)) == 2

    start_worker(settings)
    wait_for(lambda: status_counts(settings).get("done") == 2, 120, message="DICOM studies scored")
    rows = studies(settings)
    assert [s.meta["age_approx"] for s in rows] == [55.0, 70.0]
    assert [s.meta["sex"] for s in rows] == ["male", "female"]
    assert [s.meta["anatom_site_general"] for s in rows] == ["head/neck", "lower extremity"]
    assert [s.sop_instance_uid for s in rows] == [ds.SOPInstanceUID for ds in instances]
    assert rows[0].study_instance_uid == instances[0].StudyInstanceUID
    assert rows[0].series_instance_uid == instances[0].SeriesInstanceUID
    # the patient id is stored pseudonymised, the same for both lesions of the patient
    assert (
        rows[0].patient_pseudonym == rows[1].patient_pseudonym == pseudonymise(settings.secret_key, program_id, "MRN-1")
    )
    assert "MRN-1" not in rows[0].patient_pseudonym
    # so is the AccessionNumber: the reference shown and exported is the SOP Instance UID
    for row, ds in zip(rows, instances, strict=True):
        assert row.external_id == ds.SOPInstanceUID
        assert row.accession_pseudonym == pseudonymise(
            settings.secret_key, program_id, f"accession:{ds.AccessionNumber}"
        )
    exported = requests.get(
        f"{server.url}/api/v1/batches/{rows[0].batch_id}/results?format=csv",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    ).text
    assert all(ds.AccessionNumber not in exported and ds.PatientID not in exported for ds in instances)
    assert rows[0].image_format == "jpeg" and rows[1].image_format == "png"
    with session_factory(settings.database_url)() as session:
        assert len(list(session.scalars(select(Prediction)))) == 2


def test_stow_rs_reports_each_bad_instance(pg_settings, live_server, api_token, ham_jpegs):
    settings = pg_settings
    server = live_server(settings)
    _, token = api_token("hospital-a")
    good = make_instance(ham_jpegs[2])
    no_pixels = make_instance(ham_jpegs[3], with_pixels=False)
    wrong_class = make_instance(ham_jpegs[4], sop_class=SECONDARY_CAPTURE)
    parts = [to_bytes(good), to_bytes(no_pixels), to_bytes(wrong_class), to_bytes(make_instance(ham_jpegs[5]))[:3000]]
    reply = stow(server.url, token, parts)
    assert reply.status_code == 202, reply.text  # some stored, some failed
    answer = reply.json()
    assert [i["00081155"]["Value"][0] for i in answer["00081199"]["Value"]] == [good.SOPInstanceUID]
    failed = {i.get("00081155", {}).get("Value", ["?"])[0]: i for i in answer["00081198"]["Value"]}
    assert failed[no_pixels.SOPInstanceUID]["00081197"]["Value"] == [0xA900]
    assert "no pixel data" in failed[no_pixels.SOPInstanceUID]["00000902"]["Value"][0]
    assert failed[wrong_class.SOPInstanceUID]["00081197"]["Value"] == [0x0122]
    reasons = " ".join(i["00000902"]["Value"][0] for i in answer["00081198"]["Value"])
    assert "truncated" in reasons
    assert len(studies(settings)) == 1

    # wrong content type, and no token
    plain = requests.post(
        f"{server.url}/dicomweb/studies",
        data=b"x",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"},
        timeout=30,
    )
    assert plain.status_code == 415 and "multipart/related" in plain.json()["error"]
    assert stow(server.url, "not-a-token", parts).status_code == 401


# -- C-STORE -------------------------------------------------------------------------------------
@pytest.fixture
def scp(pg_settings):
    servers = []

    def start(settings=None, allowed=None):
        port = free_port()
        allow = AllowList.from_entries(allowed or [], "hospital-b", allow_any=not allowed)
        server = make_server(settings or pg_settings, "DERMASCAN", "127.0.0.1", port, allow)
        servers.append(server)
        return port

    yield start
    for server in servers:
        server.shutdown()


def test_storescu_and_pynetdicom_store_and_get_scored(pg_settings, scp, start_worker, ham_jpegs, tmp_path):
    settings = pg_settings
    port = scp()
    # C-ECHO
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DERMASCAN")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()

    # dcmtk's storescu (a client we did not write) sends a JPEG and an uncompressed instance
    files = []
    for i, (jpeg, compressed) in enumerate([(ham_jpegs[0], True), (ham_jpegs[1], False)]):
        path = tmp_path / f"i{i}.dcm"
        write(
            make_instance(
                jpeg, age=45 + i, sex="female", site="upper extremity", patient_id="PAT-9", compressed=compressed
            ),
            path,
        )
        files.append(path)
    storescu = shutil.which("storescu", path="/usr/bin:/usr/local/bin")
    assert storescu, "dcmtk's storescu is needed (Debian package dcmtk; .ci/run installs it)"
    done = subprocess.run(
        [storescu, "-aet", "MODALITY", "-aec", "DERMASCAN", "-R", "-xy", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"TCP_NODELAY": "1"},
    )
    assert done.returncode == 0, done.stderr

    # pynetdicom as a second client, with a SOP class we do not accept
    ae = AE(ae_title="PACS")
    ae.add_requested_context(DERMOSCOPIC_PHOTOGRAPHY, ["1.2.840.10008.1.2.4.50"])
    ae.add_requested_context(SECONDARY_CAPTURE, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", port, ae_title="DERMASCAN")
    good = make_instance(ham_jpegs[2], age=80, sex="male", site="posterior torso")
    assert assoc.send_c_store(good).Status == 0x0000
    assert assoc.send_c_store(good).Status == 0x0000  # re-sent: no second study
    sc = make_instance(ham_jpegs[3], sop_class=SECONDARY_CAPTURE, compressed=False)
    assert assoc.send_c_store(sc).Status == 0x0122
    nopix = make_instance(ham_jpegs[4], with_pixels=False)
    nopix.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"
    status = assoc.send_c_store(nopix)
    assert status.Status == 0xA900
    assoc.release()

    start_worker(settings)
    wait_for(lambda: status_counts(settings).get("done") == 3, 120, message="C-STORE studies scored")
    rows = studies(settings)
    assert [(s.meta["age_approx"], s.meta["sex"], s.meta["anatom_site_general"]) for s in rows] == [
        (45.0, "female", "upper extremity"),
        (46.0, "female", "upper extremity"),
        (80.0, "male", "posterior torso"),
    ]
    assert rows[0].sop_instance_uid == dcmread(files[0]).SOPInstanceUID
    assert {s.source for s in rows} == {"dicom"}
    assert rows[0].batch_id == rows[1].batch_id != rows[2].batch_id  # one batch per association


def test_calling_ae_allow_list(pg_settings, scp):
    port = scp(allowed=["TRUSTED"])
    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DERMASCAN")
    assert assoc.is_rejected
    ae = AE(ae_title="TRUSTED")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="DERMASCAN")
    assert assoc.is_established
    assoc.release()


def test_c_store_survives_a_dropped_database_connection(pg_settings, scp, ham_jpegs):
    """The receiver skips the pool's per-checkout ping (a round trip per instance): a connection the
    database dropped (restart, failover, idle timeout) is found on use and the instance stored again."""
    port = scp()
    ae = AE(ae_title="PACS")
    ae.add_requested_context(DERMOSCOPIC_PHOTOGRAPHY, ["1.2.840.10008.1.2.4.50"])
    assoc = ae.associate("127.0.0.1", port, ae_title="DERMASCAN")
    assert assoc.send_c_store(make_instance(ham_jpegs[0])).Status == 0x0000
    with session_factory(pg_settings.database_url)() as session:
        dropped = session.scalar(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        )
    assert dropped >= 1  # the receiver's pooled connection among them
    assert assoc.send_c_store(make_instance(ham_jpegs[1])).Status == 0x0000
    assoc.release()
    assert len(studies(pg_settings)) == 2
