"""Visit times are instants: a visit's date and time with its offset is kept in UTC on every
database (the embedded SQLite default included), so a lesion's visits are ordered by when they
happened, whichever door they came through (REST, ZIP manifest, STOW-RS, C-STORE)."""

from __future__ import annotations

import base64
import datetime as dt
import io

import pandas as pd
import pytest
from sqlalchemy import select

from dermascan.infra.db import session_factory
from dermascan.infra.schema import Study
from dermascan.screening import follow_up
from dermascan.security.accounts import create_token
from dermascan.security.identity import get_or_create_program
from tests.dicom_factory import make_instance, stow, to_bytes
from tests.ham_files import ham_images, ham_rows, manifest_csv, zip_bytes

# three visits of one lesion, sent out of order and each with its own offset (issue 42's case)
SENT = ["2026-10-26T05:00:00+00:00", "2026-10-25T23:00:00-10:00", "2026-10-26T12:00:00+14:00"]
DICOM_SENT = ["20261026050000+0000", "20261025230000-1000", "20261026120000+1400"]
INSTANTS = [dt.datetime(2026, 10, 26, 5), dt.datetime(2026, 10, 26, 9), dt.datetime(2026, 10, 25, 22)]  # UTC


def _utc(value: dt.datetime) -> dt.datetime:
    return value.astimezone(dt.UTC).replace(tzinfo=None) if value.tzinfo else value


def assert_instants(settings, external_ids: list[str]) -> None:
    """Stored as UTC instants; the lesion's visits in the order they happened: the real latest
    (09:00 UTC) follows 05:00 UTC, which follows 22:00 UTC the day before."""
    with session_factory(settings.database_url)() as session:
        studies = {s.external_id or s.sop_instance_uid: s for s in session.scalars(select(Study))}
        chosen = [studies[e] for e in external_ids]
        assert [_utc(s.acquired_at) for s in chosen] == INSTANTS
        previous = {s.id: follow_up.previous_visit(session, s) for s in chosen}
    first, second, third = chosen
    assert previous[third.id] is None  # the earliest, though sent last
    assert previous[first.id].id == third.id
    assert previous[second.id].id == first.id  # the real latest visit has its previous one


@pytest.fixture
def door(embedded_settings, app_factory):
    with session_factory(embedded_settings.database_url)() as session, session.begin():
        _, token = create_token(session, get_or_create_program(session, "instants").id, "instants")
    return app_factory(embedded_settings).test_client(), {"Authorization": f"Bearer {token}"}


def pictures(ham_dir, n=3) -> list[bytes]:
    return list(ham_images(ham_dir, ham_rows(ham_dir, n).isic_id).values())


def test_rest_records_keep_instants(embedded_settings, door, ham_dir):
    client, headers = door
    records = [
        {"external_id": f"rest-{i}", "patient_id": "P-1", "lesion_id": "left-arm", "acquired_at": when,
         "image_base64": base64.b64encode(jpeg).decode()}
        for i, (when, jpeg) in enumerate(zip(SENT, pictures(ham_dir), strict=True))
    ]  # fmt: skip
    reply = client.post("/api/v1/batches", json={"records": records}, headers=headers)
    assert reply.status_code == 201 and reply.json["accepted"] == 3, reply.json
    assert_instants(embedded_settings, ["rest-0", "rest-1", "rest-2"])


def test_a_zip_manifest_keeps_instants(embedded_settings, door, ham_dir):
    client, headers = door
    rows = pd.DataFrame({"isic_id": ["zip-0", "zip-1", "zip-2"], "patient_id": ["P-2"] * 3,
                         "lesion_id": ["back-1"] * 3, "acquired_at": SENT})  # fmt: skip
    files = {"manifest.csv": manifest_csv(rows, list(rows.columns)).encode()}
    files.update({f"zip-{i}.jpg": jpeg for i, jpeg in enumerate(pictures(ham_dir))})
    reply = client.post("/api/v1/batches", data={"archive": (io.BytesIO(zip_bytes(files)), "z.zip")}, headers=headers)
    assert reply.status_code == 201 and reply.json["accepted"] == 3, reply.json
    assert_instants(embedded_settings, ["zip-0", "zip-1", "zip-2"])


def dicom_visits(ham_dir, offsets_in: str):
    out = []
    for when, jpeg in zip(DICOM_SENT, pictures(ham_dir), strict=True):
        ds = make_instance(jpeg, patient_id="PAT-TZ")
        ds.LesionNumber = 3
        if offsets_in == "datetime":
            ds.AcquisitionDateTime = when
        else:  # the date and time of the content, with the data set's Timezone Offset From UTC
            ds.ContentDate, ds.ContentTime, ds.TimezoneOffsetFromUTC = when[:8], when[8:14], when[14:]
        out.append(ds)
    return out


@pytest.mark.slow
def test_stow_rs_keeps_instants(pg_settings, live_server, api_token, ham_dir):
    server = live_server(pg_settings)
    _, token = api_token("instants")
    parts = dicom_visits(ham_dir, "datetime")
    reply = stow(server.url, token, [to_bytes(ds) for ds in parts])
    assert reply.status_code == 200, reply.text
    assert_instants(pg_settings, [ds.SOPInstanceUID for ds in parts])


@pytest.mark.slow
def test_c_store_keeps_instants_from_the_timezone_offset(pg_settings, ham_dir):
    from pydicom.uid import JPEGBaseline8Bit
    from pynetdicom import AE

    from dermascan.ingest.dicom import DERMOSCOPIC_PHOTOGRAPHY
    from dermascan.intake.dicom_scp import AllowList, make_server
    from tests.services import free_port

    port = free_port()
    receiver = make_server(pg_settings, "DERMASCAN", "127.0.0.1", port, AllowList.from_entries([], "tz", True))
    parts = dicom_visits(ham_dir, "offset")
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(DERMOSCOPIC_PHOTOGRAPHY, [JPEGBaseline8Bit])
        assoc = ae.associate("127.0.0.1", port, ae_title="DERMASCAN")
        for ds in parts:
            assert assoc.send_c_store(ds).Status == 0x0000
        assoc.release()
    finally:
        receiver.shutdown()
    assert_instants(pg_settings, [ds.SOPInstanceUID for ds in parts])
