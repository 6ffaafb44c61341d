"""STOW-RS, the DICOMweb door, with dicomweb-client against the live web app: instances scored with
their header's metadata, each bad instance reported in the failure list while the rest are kept,
oversized parts and images refused from the header. (The C-STORE door: test_c_store.py.)"""

from __future__ import annotations

import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from sqlalchemy import select

from dermascan.infra.db import session_factory
from dermascan.infra.schema import Prediction, Study
from dermascan.ingest.dicom import DERMOSCOPIC_PHOTOGRAPHY, VL_PHOTOGRAPHIC
from dermascan.security.identity import pseudonymise
from tests.dicom_factory import SECONDARY_CAPTURE, make_instance, monochrome_uncompressed, stow, to_bytes
from tests.ham_files import ham_images, ham_rows
from tests.helpers import status_counts
from tests.services import wait_for


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


def test_stow_rs_refuses_oversized_parts_and_stores_the_rest(pg_settings, live_server, api_token, ham_jpegs):
    settings = pg_settings.replace(max_dicom_bytes=2_000_000, max_image_pixels=1_000_000)
    server = live_server(settings)
    _, token = api_token("stow-limits")
    good = make_instance(ham_jpegs[0])
    parts = [
        to_bytes(good),
        to_bytes(monochrome_uncompressed(ham_jpegs[1], 1600, 1600)),
        to_bytes(monochrome_uncompressed(ham_jpegs[1], 1100, 1100)),
    ]
    reply = stow(server.url, token, parts)
    assert reply.status_code == 202, reply.text
    answer = reply.json()
    failed = answer["00081198"]["Value"]
    assert [item["00081197"]["Value"][0] for item in failed] == [0xA700, 0xA700]
    reasons = [item["00000902"]["Value"][0] for item in failed]
    assert "part 2" in reasons[0] and "limit" in reasons[0]
    assert "part 3" in reasons[1] and "pixels" in reasons[1]
    assert [s.sop_instance_uid for s in studies(pg_settings)] == [good.SOPInstanceUID]
    # a body that breaks off before its closing boundary is refused as a whole
    cut = stow(server.url, token, parts, cut=len(to_bytes(good)) + 200)
    assert cut.status_code == 400
