"""Portal uploads through the real app (Flask test client, CSRF on, real PostgreSQL)."""

from __future__ import annotations

import io
import re

from sqlalchemy import select

from dermascan.infra.db import session_factory
from dermascan.infra.schema import Priority, Study, StudyStatus
from dermascan.security.accounts import create_user
from dermascan.security.identity import get_or_create_program
from tests.ham_files import ham_images, ham_rows, ham_zip

PASSWORD = "correct-horse-battery"


def csrf(html: str) -> str:
    return re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', html).group(1)


def uploader_client(settings, app_factory):
    with session_factory(settings.database_url)() as session, session.begin():
        create_user(session, "nurse", PASSWORD, "uploader", get_or_create_program(session, "ward-3").id)
    client = app_factory(settings).test_client()
    client.post(
        "/login", data={"username": "nurse", "password": PASSWORD, "csrf_token": csrf(client.get("/login").text)}
    )
    return client


def test_single_study_upload_is_interactive_with_its_metadata(pg_settings, app_factory, ham_dir):
    client = uploader_client(pg_settings, app_factory)
    token = csrf(client.get("/upload").text)
    image = next(iter(ham_images(ham_dir, ham_rows(ham_dir, 1).isic_id).values()))
    reply = client.post(
        "/upload/single",
        data={"csrf_token": token, "image": (io.BytesIO(image), "lesion.jpg"), "age_approx": "62", "sex": "female",
              "anatom_site_general": "upper extremity", "patient_id": "MRN-77", "external_id": "ward3-001",
              "lesion_id": "left-forearm-2", "acquired_at": "2026-11-30"},
        headers={"Accept": "application/json"},
    )  # fmt: skip
    assert reply.status_code == 201, reply.text
    assert reply.json["accepted"] == 1
    with session_factory(pg_settings.database_url)() as session:
        study = session.scalar(select(Study))
        assert study.priority == Priority.INTERACTIVE and study.status == StudyStatus.QUEUED
        assert study.meta["age_approx"] == 62.0 and study.meta["sex"] == "female"
        assert study.meta["anatom_site_general"] == "upper extremity" and study.external_id == "ward3-001"
        assert study.patient_pseudonym and "MRN" not in study.patient_pseudonym
        assert study.lesion_id is not None and study.acquired_at.date().isoformat() == "2026-11-30"
    # the same lesion for another patient: refused with the reason, nothing stored
    refused = client.post(
        "/upload/single",
        data={"csrf_token": token, "image": (io.BytesIO(image), "lesion.jpg"), "patient_id": "MRN-78",
              "lesion_id": "left-forearm-2"},
        headers={"Accept": "application/json"},
    )  # fmt: skip
    assert refused.status_code == 422 and "another patient" in refused.json["records"][0]["reason"]
    # an HTML form post gets the report page
    page = client.post("/upload/single", data={"csrf_token": token, "image": (io.BytesIO(b"not an image"), "x.jpg")})
    assert page.status_code == 422 and "not an image" in page.text


def test_bulk_upload_report_and_errors(pg_settings, app_factory, ham_dir):
    client = uploader_client(pg_settings, app_factory)
    token = csrf(client.get("/upload").text)
    archive, rows = ham_zip(ham_dir, 5)
    reply = client.post("/upload/bulk", data={"csrf_token": token, "archive": (io.BytesIO(archive), "day.zip"), "label": "Tuesday"},
                        headers={"X-Requested-With": "XMLHttpRequest"})  # fmt: skip
    assert reply.status_code == 201 and reply.json["accepted"] == 5
    batch_page = client.get(reply.json["batch_url"])
    assert batch_page.status_code == 200 and "Tuesday" in batch_page.text and rows.isic_id.iloc[0] in batch_page.text
    broken = client.post("/upload/bulk", data={"csrf_token": token, "archive": (io.BytesIO(b"PK?"), "bad.zip")},
                         headers={"X-Requested-With": "XMLHttpRequest"})  # fmt: skip
    assert broken.status_code == 400 and "not a valid ZIP" in broken.json["error"]
    template = client.get("/upload/template.csv")
    assert (
        template.text.splitlines()[0] == "isic_id,patient_id,age_approx,sex,anatom_site_general,lesion_id,acquired_at"
    )
    exported = client.get(reply.json["batch_url"] + "/results.csv")
    assert exported.status_code == 200 and len(exported.text.strip().splitlines()) == 6
