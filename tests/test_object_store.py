"""Images in object storage (issue 12, item 1): the web process and a worker with data
directories of their own, sharing only PostgreSQL, Redis and an S3 protocol server (moto's, the
real S3 HTTP API to boto3) — a REST batch is scored, heat maps made, and the portal serves the
image and the map; an unreachable store refuses the upload with 503 and stores nothing."""

from __future__ import annotations

import boto3
import pytest
from sqlalchemy import func, select

from dermascan.accounts import create_user
from dermascan.db import session_factory
from dermascan.schema import Prediction, Study
from tests.ham_files import ham_zip
from tests.helpers import status_counts
from tests.services import free_port, wait_for
from tests.test_security import PASSWORD, _login

BUCKET = "dermascan"


@pytest.fixture
def s3(monkeypatch):
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
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
    client = app_factory(web_settings).test_client()
    archive, _ = ham_zip(ham_dir, 6)
    import io

    reply = client.post(
        "/api/v1/batches",
        headers={"Authorization": f"Bearer {token}"},
        data={"archive": (io.BytesIO(archive), "b.zip")},
    )
    assert reply.status_code == 201, reply.json
    start_worker(worker_settings, env=s3)
    wait_for(lambda: status_counts(web_settings).get("done") == 6, 180, message="scored from the object store")

    def heatmaps():
        with session_factory(pg_url)() as session:
            return session.scalar(
                select(func.count()).select_from(Prediction).where(Prediction.heatmap_sha256.is_not(None))
            )

    with session_factory(pg_url)() as session:
        referred = [p.study_id for p in session.scalars(select(Prediction)) if p.probability >= p.threshold]
        images = {s.image_sha256 for s in session.scalars(select(Study))}
    assert referred, "the tiny bundle refers about half the studies"
    wait_for(lambda: heatmaps() == len(referred), 180, message="heat maps in the object store")
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="studies/")["Contents"]}
    assert {f"studies/{d[:2]}/{d}" for d in images} <= keys and len(keys) == len(images) + len(referred)
    assert not (tmp_path / "web" / "blobs").exists() and not (tmp_path / "worker" / "blobs").exists()
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
    import io

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
