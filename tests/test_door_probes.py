"""Probes at every door (security, third pass) against the app on PostgreSQL: outbound destinations
that could reach DermaScan's own host are refused at save and at connect time; DICOM UIDs are
validated at both DICOM doors; a ZIP's images are matched by their full path; and no request
parameter — a page number of twenty digits, a superscript digit, a month in the year 9999, a JSON
body nested thousands deep, an age of 400 digits, a NUL character — is a server error."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import warnings
import zipfile

import pydicom
import pytest
from pynetdicom import AE
from sqlalchemy import select

from dermascan.infra.db import session_factory
from dermascan.infra.schema import Delivery, DicomDestination, Program, Study, StudyStatus
from dermascan.intake.dicom_scp import AllowList, make_server
from dermascan.results_out import delivery, destinations
from dermascan.security.accounts import create_token, create_user
from dermascan.security.identity import get_or_create_program
from tests.dicom_factory import DERMOSCOPIC_PHOTOGRAPHY, make_instance, to_bytes
from tests.ham_files import ham_images, ham_rows, json_records, zip_bytes
from tests.services import free_port

PASSWORD = "correct-horse-battery-probe"
JPEG = "1.2.840.10008.1.2.4.50"


@pytest.fixture
def probe(pg_settings, app_factory):
    """A logged-in admin client, a program with an API token, and the app."""
    settings = dataclasses.replace(pg_settings, destination_allow_hosts="")
    with session_factory(settings.database_url)() as session, session.begin():
        program = get_or_create_program(session, "probe")
        _, token = create_token(session, program.id, "probe")
        create_user(session, "probe-admin", PASSWORD, "admin", program.id)
    app = app_factory(settings)
    client = app.test_client()
    page = client.get("/login").text
    token_field = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)
    assert (
        client.post(
            "/login", data={"username": "probe-admin", "password": PASSWORD, "csrf_token": token_field}
        ).status_code
        == 302
    )
    return settings, client, {"Authorization": f"Bearer {token}"}


# -- 1. outbound destinations ------------------------------------------------------------------------
INSIDE_URLS = [
    "http://127.0.0.1:8042/dicom-web", "http://[::1]/dicom-web", "http://0.0.0.0/dicom-web",
    "http://169.254.169.254/latest/meta-data", "http://[::ffff:127.0.0.1]/dicom-web", "https://localhost/dicom-web",
    "http://127.1/dicom-web", "http://2130706433/dicom-web", "http://224.0.0.1/x", "http://240.0.0.1/x",
]  # fmt: skip


def test_destinations_that_reach_the_inside_are_refused_at_save_and_at_connect_time(probe):
    settings, _, _ = probe
    factory = session_factory(settings.database_url)
    with factory() as session, session.begin():
        program = session.scalar(select(Program).where(Program.name == "probe"))
        for i, url in enumerate(INSIDE_URLS):
            with pytest.raises(destinations.BadDestination, match="DermaScan does not call"):
                destinations.add_destination(session, settings, program, f"stow-{i}", url=url)
        for i, host in enumerate(["localhost", "127.0.0.1", "::1", "169.254.169.254", "::ffff:127.0.0.1", "0.0.0.0"]):
            with pytest.raises(destinations.BadDestination, match="DermaScan does not call"):
                destinations.add_destination(
                    session, settings, program, f"dimse-{i}", host=host, port=104, ae_title="PACS"
                )
        # hospital networks are private: those stay allowed
        kept = destinations.add_destination(
            session, settings, program, "ward", host="10.20.0.5", port=104, ae_title="PACS"
        )
        assert kept.id
        # an operator's exception
        listed = dataclasses.replace(settings, destination_allow_hosts="127.0.0.1")
        assert destinations.add_destination(
            session, listed, program, "test-pacs", host="127.0.0.1", port=4242, ae_title="ORTHANC"
        )
        # a name saved before it resolved to the inside (DNS changed since) is refused when connecting
        row = DicomDestination(program_id=program.id, name="rebound", kind="dimse", host="localhost", port=free_port(),
                               ae_title="PACS", enabled=True)  # fmt: skip
        session.add(row)
        study = Study(program_id=program.id, source="test", image_sha256="0" * 64, image_format="jpeg",
                      status=StudyStatus.DONE, meta={})  # fmt: skip
        session.add(study)
        session.flush()
        session.add(Delivery(study_id=study.id, destination_id=row.id, object="ai_sr", status="pending", attempts=0))
        study_id, destination_id = study.id, row.id
    from dermascan.results_out import transports

    with pytest.raises(transports.Refused, match="loopback"):
        transports._checked_address(settings, "localhost", 104)
    session = transports._timed_session(settings)
    with pytest.raises(transports.Refused, match="loopback"):
        session.get("http://localhost:9/dicom-web/studies", timeout=2)
    assert delivery.deliver(settings, study_id, destination_id, 0) in ("failed", "retry")


def test_a_stow_destination_with_credentials_over_http_is_warned_about(probe):
    settings, client, _ = probe
    with session_factory(settings.database_url)() as session, session.begin():
        program = session.scalar(select(Program).where(Program.name == "probe"))
        row = destinations.add_destination(
            session, settings, program, "plain", url="http://pacs.hospital.example/dicom-web", username="u", secret="s"
        )
        assert any("credentials over plain http" in w for w in destinations.warnings(row))
    page = client.get("/admin/destinations").text
    assert "sends its credentials over plain http" in page


# -- 2. DICOM UIDs -----------------------------------------------------------------------------------
BAD_UIDS = ["1.2.abc.4", "1.2.<script>alert(1)</script>", "1." + "2" * 79, "1.02.3", "1..2", ".1.2", "1.2."]


def _with_uid(jpeg, field: str, value: str):
    ds = make_instance(jpeg)
    setattr(ds, field, value)
    if field == "SOPInstanceUID":
        ds.file_meta.MediaStorageSOPInstanceUID = value
    return ds


def test_stow_rs_refuses_instances_with_invalid_uids_and_keeps_the_rest(probe, ham_dir):
    settings, client, headers = probe
    jpegs = list(ham_images(ham_dir, ham_rows(ham_dir, 2).isic_id).values())
    good = make_instance(jpegs[0])
    bad = [_with_uid(jpegs[1], field, uid) for field in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
           for uid in BAD_UIDS[:3]]  # fmt: skip
    pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
    try:
        parts = [to_bytes(good), *(to_bytes(ds) for ds in bad)]
    finally:
        pydicom.config.settings.writing_validation_mode = pydicom.config.RAISE
    boundary = "probe-boundary"
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in parts
    )
    body += b"--" + boundary.encode() + b"--\r\n"
    reply = client.post(
        "/dicomweb/studies", data=body,
        headers={**headers, "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
    )  # fmt: skip
    assert reply.status_code == 202, reply.text
    answer = reply.json
    failed = answer["00081198"]["Value"]
    assert len(failed) == len(bad)
    reasons = [item["00000902"]["Value"][0] for item in failed]
    assert all("is not a valid UID" in r for r in reasons), reasons
    for item in failed:  # an invalid UID is never echoed as a UID
        uid = item.get("00081155", {}).get("Value", [None])[0]
        assert uid is None or re.fullmatch(r"[0-9.]{1,64}", uid)
    with session_factory(settings.database_url)() as session:
        assert [s.sop_instance_uid for s in session.scalars(select(Study))] == [good.SOPInstanceUID]
    assert client.post("/dicomweb/studies/1.2.abc", data=body, headers={**headers, "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}).status_code == 400  # fmt: skip


def test_c_store_refuses_instances_with_invalid_uids_with_an_error_status(probe, ham_dir):
    settings, _, _ = probe
    jpegs = list(ham_images(ham_dir, ham_rows(ham_dir, 2).isic_id).values())
    port = free_port()
    server = make_server(settings, "DERMASCAN", "127.0.0.1", port, AllowList.from_entries(["PACS"], "probe"))
    try:
        ae = AE(ae_title="PACS")
        ae.add_requested_context(DERMOSCOPIC_PHOTOGRAPHY, [JPEG])
        assoc = ae.associate("127.0.0.1", port, ae_title="DERMASCAN")
        assert assoc.is_established
        pydicom.config.settings.writing_validation_mode = pydicom.config.IGNORE
        try:
            for uid in BAD_UIDS:
                status = assoc.send_c_store(_with_uid(jpegs[1], "StudyInstanceUID", uid))
                assert status.Status not in (0x0000, 0xB000), (uid, hex(status.Status))
        finally:
            pydicom.config.settings.writing_validation_mode = pydicom.config.RAISE
        good = make_instance(jpegs[0])
        assert assoc.send_c_store(good).Status == 0x0000  # the association goes on
        assoc.release()
    finally:
        server.shutdown()
    with session_factory(settings.database_url)() as session:
        assert [s.sop_instance_uid for s in session.scalars(select(Study))] == [good.SOPInstanceUID]


# -- 3. ZIP images by full path ------------------------------------------------------------------------
def test_zip_rows_are_paired_with_images_by_their_full_path(probe, ham_dir):
    settings, _, headers = probe
    rows = ham_rows(ham_dir, 2)
    left, right = ham_images(ham_dir, rows.isic_id).values()
    manifest = "isic_id,image,age_approx,sex,anatom_site_general\n"
    by_path = manifest + "L1,left/lesion.jpg,50,male,head/neck\nR1,right/lesion.jpg,60,female,head/neck\n"
    files = {"left/lesion.jpg": left, "right/lesion.jpg": right, "manifest.csv": by_path.encode()}
    client = probe[1]
    reply = client.post("/api/v1/batches", headers=headers, data={"archive": (io.BytesIO(zip_bytes(files)), "a.zip")},
                        content_type="multipart/form-data")  # fmt: skip
    assert reply.status_code == 201, reply.text
    with session_factory(settings.database_url)() as session:
        shas = {s.external_id: s.image_sha256 for s in session.scalars(select(Study))}
    assert shas == {"L1": hashlib.sha256(left).hexdigest(), "R1": hashlib.sha256(right).hexdigest()}
    # a bare file name that is in two folders: that row is ambiguous, the other row is kept
    bare = manifest + "B1,lesion.jpg,50,male,head/neck\nB2,right/lesion.jpg,60,female,head/neck\n"
    files["manifest.csv"] = bare.encode()
    reply = client.post("/api/v1/batches", headers=headers, data={"archive": (io.BytesIO(zip_bytes(files)), "b.zip")},
                        content_type="multipart/form-data")  # fmt: skip
    report = reply.json
    rejected = [r for r in report["records"] if r["status"] == "rejected"]
    assert [r["external_id"] for r in rejected] == ["B1"] and "ambiguous" in rejected[0]["reason"]
    assert "left/lesion.jpg" in rejected[0]["reason"] and "right/lesion.jpg" in rejected[0]["reason"]
    # the same path twice in one archive: refused whole, nothing stored
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name it is asked to write
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("lesion.jpg", left)
            archive.writestr("lesion.jpg", right)
            archive.writestr("manifest.csv", (manifest + "D1,lesion.jpg,50,male,head/neck\n").encode())
    before = _count(settings)
    reply = client.post("/api/v1/batches", headers=headers, data={"archive": (io.BytesIO(buffer.getvalue()), "c.zip")},
                        content_type="multipart/form-data")  # fmt: skip
    assert reply.status_code == 400 and "two entries named" in reply.json["error"]
    assert _count(settings) == before


def _count(settings) -> int:
    with session_factory(settings.database_url)() as session:
        return len(list(session.scalars(select(Study.id))))


# -- 4. no parameter is a server error -----------------------------------------------------------------
def test_no_parameter_crashes_a_page(probe, ham_dir):
    settings, client, headers = probe
    records = json_records(ham_dir, 1)
    batch = client.post("/api/v1/batches", headers=headers, json={"records": records}).json["batch_id"]
    with session_factory(settings.database_url)() as session:
        study_id = session.scalar(select(Study.id))
        program_id = session.scalar(select(Program.id).where(Program.name == "probe"))
    huge = str(2**63 - 1)
    pages = [
        f"/batches/{batch}?page={huge}", f"/batches/{batch}?page=99999999999999999999", f"/batches/{batch}?page=²",
        f"/admin/audit?page={huge}", "/admin/audit?page=99999999999999999999", "/admin/audit?page=-5",
        f"/studies/{study_id}/image?thumb=²", f"/studies/{study_id}/image?thumb=99999999999999999999",
        "/admin/monitoring/?program=²", "/admin/monitoring/?program=99999999999999999999",
        f"/admin/monitoring/report?program={program_id}&month=9999-12", f"/admin/monitoring/report?program={program_id}&month=2026-13",
        "/referrals/?program=²", "/referrals/?program=99999999999999999999", "/referrals/?site=%00", "/referrals/?batch=%00",
        "/admin/audit?action=%00", f"/batches/{batch}%00", "/studies/99999999999999999999/image", "/studies/%C2%B2/image",
    ]  # fmt: skip
    for url in pages:
        status = client.get(url).status_code
        assert status < 500, (url, status)
    api = [
        "/api/v1/batches?page=99999999999999999999", "/api/v1/batches?page=²", "/api/v1/batches?per_page=-1",
        "/api/v1/batches?created_after=0001-01-01T00:00:00%2B14:00", "/api/v1/batches?label=%00",
        f"/api/v1/batches/{batch}/results?page=²", "/api/v1/studies/99999999999999999999", "/api/v1/batches/%00",
    ]  # fmt: skip
    for url in api:
        reply = client.get(url, headers=headers)
        assert reply.status_code < 500 and reply.is_json, (url, reply.status_code)
    deep = "[" * 5000 + "]" * 5000
    for method, url in (("post", "/api/v1/batches"), ("put", f"/api/v1/studies/{study_id}/outcome")):
        reply = getattr(client, method)(url, headers={**headers, "Content-Type": "application/json"}, data=deep)
        assert reply.status_code == 400 and "nested too deeply" in reply.json["error"], (url, reply.status_code)
        nested = json.dumps({"records": [{"a": json.loads("[" * 40 + "]" * 40)}]})
        assert getattr(client, method)(url, headers={**headers, "Content-Type": "application/json"}, data=nested).status_code == 400  # fmt: skip
    record = dict(json_records(ham_dir, 1, offset=1)[0])
    record["age_approx"] = int("9" * 400)
    reply = client.post("/api/v1/batches", headers=headers, json={"records": [record]})
    assert reply.status_code == 422 and reply.json["rejected"] == 1 and reply.json["batch_id"] is None, reply.json
    record["age_approx"], record["external_id"] = 50, "HUGE"
    body = json.dumps({"records": [record]}).replace('"HUGE"', "9" * 5000)  # an id no int() may even read
    reply = client.post("/api/v1/batches", headers={**headers, "Content-Type": "application/json"}, data=body)
    assert reply.status_code == 400 and reply.is_json, reply.status_code
    record["external_id"] = int("9" * 300)
    reply = client.post("/api/v1/batches", headers=headers, json={"records": [record]})
    assert reply.status_code == 422 and reply.json["rejected"] == 1 and reply.json["batch_id"] is None, reply.json
    record["external_id"] = "nul\x00id"
    reply = client.post("/api/v1/batches", headers=headers, json={"records": [record]})
    assert reply.status_code == 400 and "NUL" in reply.json["error"]
    for csv_text in (
        "study_id,outcome\n²,benign\n",
        f"study_id,outcome\n{'9' * 40},benign\n",
        "study_id,outcome\n-1,benign\n",
    ):
        reply = client.post("/api/v1/outcomes", headers={**headers, "Content-Type": "text/csv"}, data=csv_text)
        assert reply.status_code == 400 and reply.json["rows"][0]["error"].startswith("study_id must be"), reply.json
    # the portal's own forms: a NUL in a login and a 20-digit id in a form field
    page = client.get("/referrals/").text
    assert client.post("/referrals/claim", data={"program": "9" * 20, "csrf_token": _csrf(page)}).status_code < 500
    assert client.post("/login", data={"username": "a\x00b", "password": "x"}).status_code == 400


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', html)
    return found.group(1) if found else ""


# -- 5. the outcome CSV's own limit ----------------------------------------------------------------------
def test_the_outcome_csv_has_its_own_limit_checked_before_the_body_is_read(probe):
    settings, client, headers = probe
    limit = settings.max_outcome_csv_bytes
    body = io.BytesIO(b"study_id,outcome\n" + b"1,benign\n" * (limit // 9 + 10))
    reply = client.post("/api/v1/outcomes", headers={**headers, "Content-Type": "text/csv"}, data=body)
    assert reply.status_code == 413, reply.status_code
