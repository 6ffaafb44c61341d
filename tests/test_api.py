"""The REST API /api/v1 against a live app, real PostgreSQL and Redis, and a real worker."""

from __future__ import annotations

import base64
import io
import zipfile

import requests
from PIL import Image
from sqlalchemy import func, select

from dermascan.infra.db import session_factory
from dermascan.infra.schema import AuditEvent, Batch, Prediction, Study
from tests.ham_files import ham_images, ham_rows, ham_zip, json_records, manifest_csv, read_csv_text, zip_bytes
from tests.services import wait_for_batch


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def count(settings, model):
    with session_factory(settings.database_url)() as session:
        return session.scalar(select(func.count()).select_from(model))


def test_nightly_batch_of_2000_scored_downloadable_and_idempotent(
    pg_settings, live_server, start_worker, api_token, ham_dir
):
    settings = pg_settings.replace(bulk_chunk_size=128, predict_batch_sizes=(1, 8, 64))
    server = live_server(settings)
    _, token = api_token()
    archive, rows = ham_zip(ham_dir, 2000)
    headers = {**auth(token), "Idempotency-Key": "nightly-2026-11-25"}
    reply = requests.post(
        f"{server.url}/api/v1/batches",
        headers=headers,
        files={"archive": ("batch.zip", archive, "application/zip")},
        data={"label": "nightly"},
        timeout=600,
    )
    assert reply.status_code == 201, reply.text
    body = reply.json()
    assert body["accepted"] == 2000 and body["rejected"] == 0
    batch_id = body["batch_id"]

    start_worker(settings)

    status = wait_for_batch(server.url, auth(token), batch_id, 900, "2,000 studies scored", interval=2)
    assert status["counts"]["done"] == 2000

    # results as CSV, paginated with Link headers
    got, url = [], f"{server.url}/api/v1/batches/{batch_id}/results?format=csv&per_page=700"
    while url:
        page = requests.get(url, headers=auth(token), timeout=60)
        assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/csv")
        got += read_csv_text(page.text)
        url = page.links.get("next", {}).get("url")
        url = url and (server.url + url if url.startswith("/") else url)
    assert len(got) == 2000
    assert {r["external_id"] for r in got} == set(rows.isic_id)
    assert all(r["status"] == "done" and 0 <= float(r["probability"]) <= 1 for r in got)

    # the same upload retried with the same key creates nothing new
    before = (count(settings, Study), count(settings, Batch), count(settings, Prediction))
    again = requests.post(
        f"{server.url}/api/v1/batches",
        headers=headers,
        files={"archive": ("batch.zip", archive, "application/zip")},
        timeout=600,
    )
    assert again.status_code == 200 and again.json()["replayed"] is True
    assert again.json()["batch_id"] == batch_id and again.json()["accepted"] == 2000
    assert (count(settings, Study), count(settings, Batch), count(settings, Prediction)) == before


def test_json_batch_with_row_level_errors(make_settings, pg_url, redis_url, live_server, api_token, ham_dir):
    server = live_server(make_settings(database_url=pg_url, broker_url=redis_url, max_image_pixels=50_000))
    _, token = api_token()
    records = json_records(ham_dir, 4)
    records[1]["age_approx"] = "old"
    records[2]["image_base64"] = "!!!not base64!!!"
    records[3]["colour"] = "brown"
    records.append({"external_id": "text", "image_base64": base64.b64encode(b"hello, not an image").decode()})
    jpeg = base64.b64decode(records[0]["image_base64"])
    records.append({"external_id": "cut", "image_base64": base64.b64encode(jpeg[: len(jpeg) // 2]).decode()})
    big = io.BytesIO()
    Image.new("RGB", (300, 300), (120, 80, 60)).save(big, "PNG")  # 90,000 pixels, limit 50,000
    records.append({"external_id": "big", "image_base64": base64.b64encode(big.getvalue()).decode()})
    reply = requests.post(
        f"{server.url}/api/v1/batches", headers=auth(token), json={"records": records, "label": "json"}, timeout=60
    )
    assert reply.status_code == 201, reply.text
    body = reply.json()
    assert body["accepted"] == 1 and body["rejected"] == 6
    reasons = {r["row"]: r["reason"] for r in body["records"] if r["status"] == "rejected"}
    assert "truncated" in reasons[6]
    assert "over the limit of 50,000 pixels" in reasons[7]
    assert "not a number" in reasons[2]
    assert "not valid base64" in reasons[3]
    assert "unknown field(s) colour" in reasons[4]
    assert "not an image" in reasons[5]
    study_id = next(r["study_id"] for r in body["records"] if r["status"] == "accepted")
    study = requests.get(f"{server.url}/api/v1/studies/{study_id}", headers=auth(token), timeout=30).json()
    assert study["status"] == "queued" and study["external_id"] == records[0]["external_id"]


def test_tokens_scope_programs_and_are_required(pg_settings, live_server, api_token, ham_dir):
    settings = pg_settings
    server = live_server(settings)
    _, token_a = api_token("telederm-a")
    _, token_b = api_token("telederm-b")
    archive, _ = ham_zip(ham_dir, 2)
    created = requests.post(
        f"{server.url}/api/v1/batches", headers=auth(token_a), files={"archive": ("a.zip", archive)}, timeout=60
    ).json()
    batch_id = created["batch_id"]
    study_id = created["records"][0]["study_id"]
    # missing and invalid tokens
    assert requests.get(f"{server.url}/api/v1/batches/{batch_id}", timeout=30).status_code == 401
    bad = requests.get(f"{server.url}/api/v1/batches/{batch_id}", headers=auth("dsk_wrong"), timeout=30)
    assert (
        bad.status_code == 401
        and "invalid" in bad.json()["error"]
        and bad.headers["WWW-Authenticate"].startswith("Bearer")
    )
    # another program's batch and study are not found
    for path in (f"/api/v1/batches/{batch_id}", f"/api/v1/batches/{batch_id}/results", f"/api/v1/studies/{study_id}"):
        assert requests.get(server.url + path, headers=auth(token_b), timeout=30).status_code == 404
        assert requests.get(server.url + path, headers=auth(token_a), timeout=30).status_code == 200
    with session_factory(settings.database_url)() as session:
        assert session.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.action == "token_use")) >= 5


def test_bad_uploads_get_clear_errors_and_store_nothing(
    make_settings, pg_url, redis_url, live_server, api_token, ham_dir
):
    settings = make_settings(
        database_url=pg_url,
        broker_url=redis_url,
        max_request_bytes=3_000_000,
        max_zip_uncompressed_bytes=2_000_000,
        max_zip_ratio=50,
    )
    server = live_server(settings)
    _, token = api_token()
    post = lambda **kw: requests.post(f"{server.url}/api/v1/batches", headers=auth(token), timeout=60, **kw)  # noqa: E731
    rows = ham_rows(ham_dir, 3)
    images = ham_images(ham_dir, rows.isic_id)
    good_files = {f"{i}.jpg": b for i, b in images.items()}

    cases = []
    # wrong content type
    r = requests.post(
        f"{server.url}/api/v1/batches", headers={**auth(token), "Content-Type": "text/plain"}, data="hello", timeout=30
    )
    cases.append((r, 415, "unsupported content type"))
    # not a ZIP
    cases.append((post(files={"archive": ("a.zip", b"PK not really")}), 400, "not a valid ZIP"))
    # path traversal
    cases.append(
        (
            post(
                files={
                    "archive": (
                        "a.zip",
                        zip_bytes(
                            {**good_files, "../../etc/evil.jpg": b"x", "manifest.csv": manifest_csv(rows).encode()}
                        ),
                    )
                }
            ),
            400,
            "path traversal",
        )
    )
    # ZIP bomb: highly compressible member
    bomb = zip_bytes(
        {"manifest.csv": manifest_csv(rows).encode(), "padding.jpg": b"\0" * 1_500_000}, zipfile.ZIP_DEFLATED
    )
    cases.append((post(files={"archive": ("bomb.zip", bomb)}), 400, "ZIP bomb"))
    # total uncompressed size over the limit
    big = zip_bytes(
        {"manifest.csv": manifest_csv(rows).encode(), **{f"x{i}.jpg": bytes(range(256)) * 2800 for i in range(3)}}
    )
    cases.append((post(files={"archive": ("big.zip", big)}), 413, "over the limit"))
    # request over the size limit
    cases.append((post(files={"archive": ("huge.zip", b"0" * 3_200_000)}), 413, "too large"))
    # CSV problems: no id column, unknown column
    cases.append(
        (
            post(files={"archive": ("a.zip", zip_bytes({**good_files, "m.csv": b"age_approx,sex\n50,male\n"}))}),
            400,
            "no 'isic_id' column",
        )
    )
    cases.append(
        (
            post(files={"archive": ("a.zip", zip_bytes({**good_files, "m.csv": b"isic_id,colour\nx,brown\n"}))}),
            400,
            "unknown column(s) colour",
        )
    )
    cases.append((post(files={"archive": ("a.zip", zip_bytes(good_files))}), 400, "no manifest CSV"))
    # not JSON
    r = requests.post(
        f"{server.url}/api/v1/batches",
        headers={**auth(token), "Content-Type": "application/json"},
        data="{oops",
        timeout=30,
    )
    cases.append((r, 400, "not valid JSON"))
    for response, status, text in cases:
        assert response.status_code == status, (status, text, response.status_code, response.text[:300])
        assert text in response.json()["error"], response.json()
    with session_factory(settings.database_url)() as session:
        assert session.scalar(select(func.count()).select_from(Study)) == 0
        assert session.scalar(select(func.count()).select_from(Batch)) == 0


def test_csv_row_errors_do_not_block_good_rows(pg_settings, live_server, api_token, ham_dir):
    server = live_server(pg_settings)
    _, token = api_token()
    rows = ham_rows(ham_dir, 3)
    images = ham_images(ham_dir, rows.isic_id)
    ids = list(rows.isic_id)
    manifest = (
        "isic_id,patient_id,age_approx,sex,anatom_site_general\n"
        f"{ids[0]},P1,50,female,posterior torso\n"
        f"{ids[1]},P2,fifty,female,posterior torso\n"
        f"{ids[2]},P3,40,female,elbow\n"
        "ISIC_missing,P4,40,male,torso\n"
        f"{ids[0]},P1,50,female,posterior torso\n"
        f"{ids[1]},P2,50,female,torso,extra\n"
    )
    files = {f"{i}.jpg": b for i, b in images.items()}
    reply = requests.post(
        f"{server.url}/api/v1/batches",
        headers=auth(token),
        files={"archive": ("a.zip", zip_bytes(files)), "manifest": ("m.csv", manifest)},
        timeout=60,
    )
    assert reply.status_code == 201, reply.text
    report = {r["row"]: r for r in reply.json()["records"]}
    assert report[2]["status"] == "accepted"
    assert "age_approx" in report[3]["reason"]
    assert "not a known site" in report[4]["reason"]
    assert "no image named" in report[5]["reason"]
    assert "appears twice" in report[6]["reason"]
    assert "cells but the header has 5" in report[7]["reason"]


def test_openapi_document_is_served(pg_settings, live_server):
    server = live_server(pg_settings)
    doc = requests.get(f"{server.url}/api/v1/openapi.json", timeout=30).json()
    assert doc["openapi"].startswith("3.") and "/api/v1/batches" in doc["paths"]


def test_a_whole_batch_exports_streamed_as_csv_json_and_fhir(pg_settings, app_factory, api_token, ham_dir):
    """/export: every result of the batch in one download, written a page at a time (pages of two
    here, so the stream crosses several), the same rows as the paged /results."""
    import json

    from dermascan.results_out import export

    _, token = api_token()
    client = app_factory(pg_settings).test_client()
    records = json_records(ham_dir, 5)
    batch = client.post("/api/v1/batches", headers=auth(token), json={"records": records}).json["batch_id"]
    export.PAGE, page = 2, export.PAGE  # small pages: the stream crosses several
    try:
        csv_rows = read_csv_text(client.get(f"/api/v1/batches/{batch}/export?format=csv", headers=auth(token)).text)
        body = json.loads(client.get(f"/api/v1/batches/{batch}/export?format=json", headers=auth(token)).data)
        fhir = json.loads(client.get(f"/api/v1/batches/{batch}/export?format=fhir", headers=auth(token)).data)
    finally:
        export.PAGE = page
    paged = client.get(f"/api/v1/batches/{batch}/results", headers=auth(token)).json["results"]
    assert [int(r["study_id"]) for r in csv_rows] == [r["study_id"] for r in paged]
    assert body["results"] == paged and body["batch"]["batch_id"] == batch
    assert fhir["resourceType"] == "Bundle" and len(fhir["entry"]) == 5
    assert client.get(f"/api/v1/batches/{batch}/export?format=xml", headers=auth(token)).status_code == 400


def test_the_shipped_bundle_s_differential_comes_back_through_the_rest_api(
    make_settings, pg_url, redis_url, live_server, start_worker, api_token, ham_dir
):
    """A teledermatology program's batch scored by the bundled default on its own runtime: every
    study's result (JSON and CSV) carries the seven-class differential, each class with its label,
    SNOMED CT code (the bundle's manifest) and probability, most likely first — and it is the
    network's own second output, in its own class order: over six lesions of each class the most
    likely class is the lesion's diagnosis for at least half, and melanomas get more melanoma (on
    2026-12-07: 32 of 41, and 0.48 against 0.05). The rows may be ones the network trained on: this
    checks the path, `dermascan evaluate` measures the model."""
    import json

    import pandas as pd

    from model.inference.diagnosis import CODES
    from tests.services import ROOT

    default = ROOT / "model" / "bundles" / "default"
    classes = json.loads((default / "manifest.json").read_text())["diagnosis"]["classes"]
    settings = make_settings(
        database_url=pg_url, broker_url=redis_url, model_bundle=default, tta=None, runtime="auto", bulk_chunk_size=64
    )
    server = live_server(settings)
    _, token = api_token()
    metadata = pd.read_csv(ham_dir / "metadata.csv")
    rows = metadata.groupby("diagnosis").head(6).reset_index(drop=True)
    assert sorted(set(rows.diagnosis)) == sorted(CODES) and len(rows) == 42
    files = {f"images/{i}.jpg": data for i, data in ham_images(ham_dir, rows.isic_id).items()}
    files["manifest.csv"] = manifest_csv(rows).encode()
    reply = requests.post(f"{server.url}/api/v1/batches", headers=auth(token),
                          files={"archive": ("batch.zip", zip_bytes(files), "application/zip")}, timeout=120)  # fmt: skip
    assert reply.status_code == 201, reply.text
    batch_id = reply.json()["batch_id"]
    start_worker(settings)

    assert wait_for_batch(server.url, auth(token), batch_id, 600, "42 studies scored")["counts"]["done"] == 42
    got = requests.get(f"{server.url}/api/v1/batches/{batch_id}/results", headers=auth(token), timeout=60).json()
    results = {r["external_id"]: r for r in got["results"]}
    assert set(results) == set(rows.isic_id)
    by_code = {c["code"]: c for c in classes}
    truth = dict(zip(rows.isic_id, rows.diagnosis, strict=True))
    right, melanoma_of = 0, {}
    for isic_id, result in results.items():
        if not result["assessable"]:
            assert result["differential"] is None
            continue
        differential = result["differential"]
        assert sorted(d["diagnosis"] for d in differential) == sorted(CODES)
        for d in differential:
            assert (d["label"], d["snomed"]) == (by_code[d["diagnosis"]]["label"], by_code[d["diagnosis"]]["snomed"])
        probabilities = [d["probability"] for d in differential]
        assert probabilities == sorted(probabilities, reverse=True) and abs(sum(probabilities) - 1) < 1e-3
        right += differential[0]["diagnosis"] == truth[isic_id]
        melanoma_of[isic_id] = next(d["probability"] for d in differential if d["diagnosis"] == "mel")
    assessed = len(melanoma_of)
    assert assessed >= 38, f"only {assessed} of 42 assessable"
    assert right >= assessed / 2, f"the most likely class was the diagnosis for {right} of {assessed}"
    mel = [p for i, p in melanoma_of.items() if truth[i] == "mel"]
    other = [p for i, p in melanoma_of.items() if truth[i] != "mel"]
    assert sum(mel) / len(mel) > 2 * sum(other) / len(other)

    # the CSV carries the most likely class and its probability, the same as the JSON
    table = requests.get(f"{server.url}/api/v1/batches/{batch_id}/results?format=csv", headers=auth(token), timeout=60)
    for row in read_csv_text(table.text):
        top = (results[row["external_id"]]["differential"] or [None])[0]
        assert row["suspected_diagnosis"] == (top["diagnosis"] if top else "")
        if top:
            assert abs(float(row["suspected_diagnosis_probability"]) - top["probability"]) < 1e-6
