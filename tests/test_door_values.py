"""Values checked at the door (issue 42): identifiers that cannot spell each other, numbers too
large for a float, and submissions in which nothing is accepted — each through the doors it
arrives by (REST JSON, ZIP manifest, the portal, STOW-RS), on the embedded default."""

from __future__ import annotations

import base64
import io
import json

import pandas as pd
import pytest
from sqlalchemy import func, select

from dermascan.infra.db import session_factory
from dermascan.infra.schema import Batch, Lesion, Study
from dermascan.security.accounts import create_token
from dermascan.security.identity import get_or_create_program
from tests.ham_files import ham_images, ham_rows, manifest_csv, zip_bytes


@pytest.fixture
def door(embedded_settings, app_factory):
    with session_factory(embedded_settings.database_url)() as session, session.begin():
        _, token = create_token(session, get_or_create_program(session, "values").id, "values")
    return app_factory(embedded_settings).test_client(), {"Authorization": f"Bearer {token}"}


def jpegs(ham_dir, n: int) -> list[bytes]:
    return list(ham_images(ham_dir, ham_rows(ham_dir, n).isic_id).values())


def record(jpeg: bytes, external_id: str, **fields) -> dict:
    return {"external_id": external_id, "image_base64": base64.b64encode(jpeg).decode(), **fields}


def count(settings, model) -> int:
    with session_factory(settings.database_url)() as session:
        return session.scalar(select(func.count()).select_from(model))


def test_a_lesion_number_and_a_text_id_never_spell_each_other(embedded_settings, door, ham_dir):
    client, headers = door
    images = jpegs(ham_dir, 4)
    records = [
        record(images[0], "numbered", patient_id="7", lesion_id="#3"),  # patient 7's lesion number 3
        record(images[1], "text", lesion_id="7#3"),  # a sender's text id that reads the same, no patient
        record(images[2], "text-q", patient_id="Q", lesion_id="7#3"),  # patient Q names the text lesion
        record(images[3], "numbered-again", patient_id="7", lesion_id="#3"),
    ]
    reply = client.post("/api/v1/batches", json={"records": records}, headers=headers)
    assert reply.status_code == 201 and reply.json["accepted"] == 4, reply.json
    with session_factory(embedded_settings.database_url)() as session:
        lesion_of = {s.external_id: s.lesion_id for s in session.scalars(select(Study))}
        assert session.scalar(select(func.count()).select_from(Lesion)) == 2
    assert lesion_of["numbered"] == lesion_of["numbered-again"] != lesion_of["text"] == lesion_of["text-q"]


def test_nan_and_other_scripts_digits_are_no_lesion_id(embedded_settings, door, ham_dir):
    client, headers = door
    images = jpegs(ham_dir, 3)
    body = json.dumps({"records": [record(images[0], "nan", lesion_id=float("nan")),
                                   record(images[1], "arabic", patient_id="7", lesion_id="#٣"),
                                   record(images[2], "good", patient_id="7", lesion_id="#3")]})  # fmt: skip
    reply = client.post("/api/v1/batches", data=body, headers={**headers, "Content-Type": "application/json"})
    assert reply.status_code == 201 and reply.json["accepted"] == 1, reply.json
    reasons = {r["row"]: (r["field"], r["reason"]) for r in reply.json["records"] if r["status"] == "rejected"}
    assert reasons[1][0] == "lesion_id" and "nan" in reasons[1][1]
    assert reasons[2][0] == "lesion_id" and "#٣" in reasons[2][1]
    # the same in a ZIP manifest
    rows = pd.DataFrame({"isic_id": ["z-0", "z-1"], "patient_id": ["7", "7"], "lesion_id": ["#٣", "#3"]})
    files = {
        "manifest.csv": manifest_csv(rows, list(rows.columns)).encode(),
        "z-0.jpg": images[0],
        "z-1.jpg": images[1],
    }
    reply = client.post("/api/v1/batches", data={"archive": (io.BytesIO(zip_bytes(files)), "z.zip")}, headers=headers)
    assert reply.status_code == 201 and reply.json["accepted"] == 1 and reply.json["rejected"] == 1, reply.json


def test_numbers_too_large_for_a_float_are_that_rows_error(embedded_settings, door, ham_dir):
    client, headers = door
    images = jpegs(ham_dir, 5)
    made = {"probability": 0.3, "referred": True, "assessable": True, "reason": None, "threshold": 0.06,
            "bundle_version": "v", "runtime": "onnxruntime", "precision": "fp32", "made_at": "2026-12-01T09:14:00+00:00"}  # fmt: skip
    huge = int("9" * 400)
    records = [record(images[0], "fine", edge_result=made)]
    records += [record(images[i], f"huge-{name}", edge_result={**made, name: huge})
                for i, name in enumerate(("probability", "score", "threshold"), start=1)]  # fmt: skip
    records.append(record(images[4], "epoch", edge_result={**made, "made_at": "1970-01-01T00:00:00+00:00"}))
    reply = client.post("/api/v1/batches", json={"records": records}, headers=headers)
    assert reply.status_code == 201 and reply.json["accepted"] == 1 and reply.json["rejected"] == 4, reply.json
    reasons = [r["reason"] for r in reply.json["records"] if r["status"] == "rejected"]
    assert [any(f"edge_result.{n}" in r for r in reasons) for n in ("probability", "score", "threshold", "made_at")] == [True] * 4  # fmt: skip


def test_nothing_accepted_is_422_with_every_reason_and_creates_nothing(embedded_settings, door, app_factory, ham_dir):
    client, headers = door
    reply = client.post("/api/v1/batches", json={"records": []}, headers=headers)
    assert reply.status_code == 422 and reply.json["batch_id"] is None, reply.json
    bad = [record(b"not an image", "a"), {"external_id": "b", "image_base64": "!!"}]
    reply = client.post("/api/v1/batches", json={"records": bad}, headers={**headers, "Idempotency-Key": "k-1"})
    assert reply.status_code == 422 and reply.json["rejected"] == 2 and reply.json["batch_id"] is None, reply.json
    assert all(r["reason"] for r in reply.json["records"])
    again = client.post("/api/v1/batches", json={"records": bad}, headers={**headers, "Idempotency-Key": "k-1"})
    assert again.status_code == 422  # nothing stored under the key: the same answer again
    files = {"manifest.csv": b"isic_id,age_approx\nx-1,old\n", "x-1.jpg": jpegs(ham_dir, 1)[0]}
    reply = client.post("/api/v1/batches", data={"archive": (io.BytesIO(zip_bytes(files)), "z.zip")}, headers=headers)
    assert reply.status_code == 422 and reply.json["rejected"] == 1, reply.json
    assert count(embedded_settings, Batch) == 0 and count(embedded_settings, Study) == 0


def test_the_portal_and_stow_rs_create_no_batch_when_nothing_is_accepted(embedded_settings, door, app_factory, ham_dir):
    from dermascan.security.accounts import create_user
    from tests.dicom_factory import make_instance, to_bytes
    from tests.test_portal import csrf

    client, headers = door
    with session_factory(embedded_settings.database_url)() as session, session.begin():
        create_user(session, "nurse", "correct-horse-battery", "uploader", get_or_create_program(session, "values").id)
    portal = app_factory(embedded_settings).test_client()
    portal.post("/login", data={"username": "nurse", "password": "correct-horse-battery",
                                "csrf_token": csrf(portal.get("/login").text)})  # fmt: skip
    files = {"manifest.csv": b"isic_id,sex\nx-1,robot\n", "x-1.jpg": jpegs(ham_dir, 1)[0]}
    reply = portal.post(
        "/upload/bulk", data={"csrf_token": csrf(portal.get("/upload").text), "archive": (io.BytesIO(zip_bytes(files)), "z.zip")},
        headers={"Accept": "application/json"},
    )  # fmt: skip
    assert reply.status_code == 422 and reply.json["rejected"] == 1, reply.json
    ds = make_instance(jpegs(ham_dir, 1)[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # not a lesion image class
    boundary = "b0undary"
    body = (
        b"--"
        + boundary.encode()
        + b"\r\nContent-Type: application/dicom\r\n\r\n"
        + to_bytes(ds)
        + b"\r\n--"
        + boundary.encode()
        + b"--\r\n"
    )
    reply = client.post(
        "/dicomweb/studies", data=body,
        headers={**headers, "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'},
    )  # fmt: skip
    assert reply.status_code >= 400, reply.status_code
    assert count(embedded_settings, Batch) == 0 and count(embedded_settings, Study) == 0
