"""Images in object storage (issue 12, item 1): the web process and a worker with data
directories of their own, sharing only PostgreSQL, Redis and an S3 protocol server (moto's, the
real S3 HTTP API to boto3) — portal, REST, STOW-RS and C-STORE studies are scored, heat maps
made, and the portal serves the image and the map; an unreachable store refuses the upload with
503 and stores nothing; a worker that finds it down retries until it is back."""

from __future__ import annotations

import io
import re

import boto3
import pytest
from sqlalchemy import func, select

from dermascan.infra.db import session_factory
from dermascan.infra.schema import Prediction, Study
from dermascan.security.accounts import create_user
from tests.ham_files import ham_zip
from tests.helpers import status_counts
from tests.services import free_port, wait_for
from tests.test_security import PASSWORD, _login

BUCKET = "dermascan"


class MotoServer:
    """moto's S3 server in this process; its data outlives a stop and start (moto's backends are
    process-wide), like a real store coming back after an outage."""

    def __init__(self, port: int):
        self.port = port
        self.server = None

    def start(self):
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self):
        self.server.stop()


@pytest.fixture
def s3(monkeypatch):
    port = free_port()
    server = MotoServer(port)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    env["server"] = server
    yield env
    server.stop()


def test_web_and_worker_share_only_the_database_the_broker_and_the_object_store(
    make_settings, pg_url, redis_url, s3, start_worker, app_factory, api_token, ham_dir, tmp_path
):
    common = dict(
        database_url=pg_url, broker_url=redis_url, blob_url=f"s3://{BUCKET}/studies", secret_key="shared-secret"
    )
    web_settings = make_settings(data_dir=tmp_path / "web", **common)
    worker_settings = make_settings(data_dir=tmp_path / "worker", **common)
    program_id, token = api_token("object-store")
    with session_factory(pg_url)() as session, session.begin():
        create_user(session, "dr-s3", PASSWORD, "specialist", program_id)
        create_user(session, "nurse-s3", PASSWORD, "uploader", program_id)
    client = app_factory(web_settings).test_client()
    archive, _ = ham_zip(ham_dir, 6)
    reply = client.post(
        "/api/v1/batches",
        headers={"Authorization": f"Bearer {token}"},
        data={"archive": (io.BytesIO(archive), "b.zip")},
    )
    assert reply.status_code == 201, reply.json
    # DICOM too: STOW-RS to the web app, C-STORE to a receiver with a data directory of its own
    from pynetdicom import AE

    from dermascan.ingest.dicom import DERMOSCOPIC_PHOTOGRAPHY
    from dermascan.intake.dicom_scp import AllowList, make_server
    from tests.dicom_factory import make_instance, to_bytes
    from tests.ham_files import ham_images, ham_rows

    jpegs = list(ham_images(ham_dir, ham_rows(ham_dir, 9).isic_id).values())[6:]
    # the portal's single upload (a person waiting)
    portal = app_factory(web_settings).test_client()
    assert _login(portal, "nurse-s3", PASSWORD).status_code == 302
    form_token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', portal.get("/upload").text).group(1)
    single = portal.post(
        "/upload/single", headers={"Accept": "application/json"},
        data={"csrf_token": form_token, "image": (io.BytesIO(jpegs[2]), "lesion.jpg"), "age_approx": "50",
              "sex": "male", "anatom_site_general": "head/neck"},
    )  # fmt: skip
    assert single.status_code == 201, single.text
    body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + to_bytes(make_instance(jpegs[0])) + b"\r\n--b--\r\n"
    stowed = client.post(
        "/dicomweb/studies", data=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": 'multipart/related; type="application/dicom"; boundary=b'},
    )  # fmt: skip
    assert stowed.status_code == 200, stowed.text
    port = free_port()
    receiver_settings = make_settings(data_dir=tmp_path / "receiver", **common)
    server = make_server(
        receiver_settings, "DERMASCAN", "127.0.0.1", port, AllowList.from_entries(["PACS=object-store"], "x")
    )
    try:
        ae = AE(ae_title="PACS")
        ae.add_requested_context(DERMOSCOPIC_PHOTOGRAPHY, ["1.2.840.10008.1.2.4.50"])
        assoc = ae.associate("127.0.0.1", port, ae_title="DERMASCAN")
        assert assoc.send_c_store(make_instance(jpegs[1])).Status == 0x0000
        assoc.release()
    finally:
        server.shutdown()
    start_worker(worker_settings, env={k: v for k, v in s3.items() if k != "server"})
    wait_for(lambda: status_counts(web_settings).get("done") == 9, 180, message="scored from the object store")

    def heatmaps():
        with session_factory(pg_url)() as session:
            return session.scalar(
                select(func.count()).select_from(Prediction).where(Prediction.heatmap_sha256.is_not(None))
            )

    with session_factory(pg_url)() as session:
        referred = [p.study_id for p in session.scalars(select(Prediction)) if p.probability >= p.threshold]
        studies = list(session.scalars(select(Study)))
        images = {s.image_sha256 for s in studies}
        headers = {s.dicom_header_sha256 for s in studies if s.dicom_header_sha256}  # the DICOM ones, encrypted
    assert referred, "the tiny bundle refers about half the studies"
    wait_for(lambda: heatmaps() == len(referred), 180, message="heat maps in the object store")
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="studies/")["Contents"]}
    assert len(headers) == 2 and {f"studies/{d[:2]}/{d}" for d in images | headers} <= keys
    assert len(keys) == len(images) + len(headers) + len(referred)
    assert not any((tmp_path / d / "blobs").exists() for d in ("web", "worker", "receiver"))
    assert _login(client, "dr-s3", PASSWORD).status_code == 302
    assert client.get(f"/studies/{referred[0]}/image").status_code == 200
    heatmap = client.get(f"/studies/{referred[0]}/heatmap")
    assert heatmap.status_code == 200 and heatmap.mimetype == "image/png"


def test_an_unreachable_object_store_refuses_the_upload_and_stores_nothing(
    make_settings, pg_url, redis_url, app_factory, api_token, ham_dir, monkeypatch
):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    settings = make_settings(database_url=pg_url, broker_url=redis_url, blob_url=f"s3://{BUCKET}/x")
    _, token = api_token("store-down")
    archive, _ = ham_zip(ham_dir, 2)
    reply = (
        app_factory(settings)
        .test_client()
        .post(
            "/api/v1/batches",
            headers={"Authorization": f"Bearer {token}"},
            data={"archive": (io.BytesIO(archive), "c.zip")},
        )
    )
    assert reply.status_code == 503 and "retry" in reply.json["error"] and reply.headers["Retry-After"]
    with session_factory(pg_url)() as session:
        assert session.scalar(select(func.count()).select_from(Study)) == 0


def test_a_worker_retries_while_the_object_store_is_down(
    make_settings, pg_url, redis_url, s3, start_worker, ham_dir, tmp_path
):
    """Stored while the store was up; scored by a worker that finds it down: retried, not failed
    for good, and scored once the store is back."""
    from dermascan.intake.submission import submit
    from tests.helpers import ham_inputs, program_id

    settings = make_settings(database_url=pg_url, broker_url=redis_url, blob_url=f"s3://{BUCKET}/retry")
    submit(settings, program_id(settings), ham_inputs(ham_dir, 3), source="test")
    server = s3["server"]
    server.stop()
    worker = start_worker(settings, env={k: v for k, v in s3.items() if k != "server"})
    wait_for(lambda: "cannot be reached" in worker.log(), 120, message="the worker meeting the outage")
    assert status_counts(settings).get("failed", 0) == 0
    server.start()
    wait_for(lambda: status_counts(settings).get("done") == 3, 180, message="scored after the store came back")
