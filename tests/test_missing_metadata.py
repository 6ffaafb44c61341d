"""Studies sent without age, sex and site (model.inference.missing): the score rests on the image, every door
behaves the same, every result says so, monitoring counts them, and a program may require them.

The mechanism is tested on a tiny bundle in which "unknown means benign" was planted on purpose
(tests.services.make_planted_bundle): the same bundle without its maps clears studies sent without
metadata whatever their image shows, so these tests fail if the maps are taken away."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import requests
from pydicom.uid import JPEGBaseline8Bit
from pynetdicom import AE
from sqlalchemy import select

from dermascan.infra.db import session_factory
from dermascan.infra.schema import Prediction, Referral, Study
from tests.dicom_factory import DERMOSCOPIC_PHOTOGRAPHY, make_instance, stow
from tests.ham_files import ham_images, ham_rows, manifest_csv, read_csv_text, zip_bytes
from tests.services import free_port, make_planted_bundle, planted_image, wait_for
from tests.test_portal import csrf

FIELDS = ["age_approx", "sex", "anatom_site_general"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def planted(tmp_path_factory, ham_dir):
    """(with its maps, the same network without them)."""
    root = tmp_path_factory.mktemp("planted")
    return make_planted_bundle(ham_dir, root / "fixed"), make_planted_bundle(
        ham_dir, root / "unfixed", fit_missing=False
    )


def images(ham_dir, n: int, offset: int, lesion: bool) -> tuple[list[bytes], list[dict]]:
    rows = ham_rows(ham_dir, n, offset)
    originals = ham_images(ham_dir, rows.isic_id)
    return [planted_image(originals[i], lesion) for i in rows.isic_id], rows[FIELDS].to_dict("records")


def test_the_maps_undo_a_planted_unknown_means_benign(planted, ham_dir):
    from model.inference.predictor import Predictor

    fixed, unfixed = Predictor(planted[0]), Predictor(planted[1])
    lesions, given = images(ham_dir, 40, 3000, lesion=True)
    plain, _ = images(ham_dir, 40, 3000, lesion=False)
    none = [{}] * 40

    def referred(predictor, pictures, records):
        return np.mean([s.referred for s in predictor.score(pictures, records)])

    # with their metadata both refer the lesions; without it, the planted network clears them
    assert referred(fixed, lesions, given) >= 0.85 and referred(unfixed, lesions, given) >= 0.85
    assert referred(unfixed, lesions, none) <= 0.2
    # its maps put the score back on the image: the lesions are referred, the plain skin is not
    assert referred(fixed, lesions, none) >= 0.9
    assert referred(fixed, plain, none) <= 0.1
    scores = fixed.score(lesions[:2], [{}, {"age_approx": 50, "sex": "female"}])
    assert scores[0].missing_fields == FIELDS and scores[1].missing_fields == ["anatom_site_general"]
    # one field missing: its own map
    assert referred(fixed, lesions, [{**r, "sex": None} for r in given]) >= 0.9


def dicom_without_metadata(jpeg: bytes):
    ds = make_instance(jpeg, age=None, site=None, patient_id="PAT-NOMETA")
    del ds.PatientSex
    return ds


def test_every_door_scores_studies_without_metadata_on_the_image(
    planted, make_settings, pg_url, redis_url, live_server, app_factory, start_worker, api_token, ham_dir
):
    from dermascan.intake.dicom_scp import AllowList, make_server
    from dermascan.security.accounts import create_user
    from dermascan.security.identity import get_or_create_program

    settings = make_settings(database_url=pg_url, broker_url=redis_url, model_bundle=planted[0])
    server = live_server(settings)
    _, token = api_token("telederm-a")
    headers = {"Authorization": f"Bearer {token}"}
    lesions, _ = images(ham_dir, 12, 3100, lesion=True)
    plain, _ = images(ham_dir, 2, 3200, lesion=False)
    sent: dict[str, str] = {}  # external id or SOP instance UID → door

    # REST: JSON records with no metadata at all
    records = [
        {"external_id": f"rest-{i}", "image_base64": base64.b64encode(b).decode()} for i, b in enumerate(lesions[:3])
    ]
    records += [
        {"external_id": f"rest-plain-{i}", "image_base64": base64.b64encode(b).decode()} for i, b in enumerate(plain)
    ]
    reply = requests.post(f"{server.url}/api/v1/batches", headers=headers, json={"records": records}, timeout=60)
    assert reply.status_code == 201 and reply.json()["accepted"] == 5, reply.text
    rest_batch = reply.json()["batch_id"]
    sent.update({r["external_id"]: "rest" for r in records})

    # ZIP: a manifest whose age, sex and site columns are empty
    import pandas as pd

    rows = pd.DataFrame({"isic_id": ["zip-0", "zip-1"], "patient_id": ["P1", "P2"], "age_approx": ["", ""],
                         "sex": ["", ""], "anatom_site_general": ["", ""]})  # fmt: skip
    archive = zip_bytes({"manifest.csv": manifest_csv(rows).encode(), "zip-0.jpg": lesions[3], "zip-1.jpg": lesions[4]})
    reply = requests.post(
        f"{server.url}/api/v1/batches", headers=headers, files={"archive": ("z.zip", archive)}, timeout=60
    )
    assert reply.status_code == 201 and reply.json()["accepted"] == 2, reply.text
    sent.update({"zip-0": "zip", "zip-1": "zip"})

    # the portal's single upload with every metadata field left blank
    with session_factory(settings.database_url)() as session, session.begin():
        create_user(session, "nurse", "correct-horse-battery", "uploader", get_or_create_program(session, "ward-3").id)
    client = app_factory(settings).test_client()
    client.post("/login", data={"username": "nurse", "password": "correct-horse-battery",
                                "csrf_token": csrf(client.get("/login").text)})  # fmt: skip
    reply = client.post(
        "/upload/single",
        data={"csrf_token": csrf(client.get("/upload").text), "image": (io.BytesIO(lesions[5]), "lesion.jpg"),
              "age_approx": "", "sex": "", "anatom_site_general": "", "external_id": "portal-0"},
        headers={"Accept": "application/json"},
    )  # fmt: skip
    assert reply.status_code == 201, reply.text
    sent["portal-0"] = "portal"

    # STOW-RS: DICOM headers without PatientAge, PatientSex and AnatomicRegionSequence
    parts = [dicom_without_metadata(b) for b in lesions[6:8]]
    from tests.dicom_factory import to_bytes

    reply = stow(server.url, token, [to_bytes(ds) for ds in parts])
    assert reply.status_code == 200, reply.text
    sent.update({ds.SOPInstanceUID: "stow" for ds in parts})

    # C-STORE: the same kind of header from a modality
    port = free_port()
    receiver = make_server(settings, "DERMASCAN", "127.0.0.1", port, AllowList.from_entries([], "hospital-b", True))
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(DERMOSCOPIC_PHOTOGRAPHY, [JPEGBaseline8Bit])
        assoc = ae.associate("127.0.0.1", port, ae_title="DERMASCAN")
        assert assoc.is_established
        for jpeg in lesions[8:10]:
            ds = dicom_without_metadata(jpeg)
            assert assoc.send_c_store(ds).Status == 0x0000
            sent[ds.SOPInstanceUID] = "c-store"
        assoc.release()
    finally:
        receiver.shutdown()

    start_worker(settings)
    total = len(sent)

    def scored():
        with session_factory(settings.database_url)() as session:
            done = session.scalars(select(Study).where(Study.status == "done")).all()
            return done if len(done) == total else None

    studies = wait_for(scored, 180, message="every door's studies scored")
    with session_factory(settings.database_url)() as session:
        predictions = {p.study_id: p for p in session.scalars(select(Prediction))}
        referred = {r.study_id for r in session.scalars(select(Referral))}
    by_door: dict[str, list] = {}
    for study in studies:
        door = sent[study.external_id or study.sop_instance_uid]
        lesion = "plain" not in (study.external_id or "")
        assert predictions[study.id].missing_fields == FIELDS, (door, predictions[study.id].missing_fields)
        by_door.setdefault(door, []).append((lesion, study.id in referred))
    assert set(by_door) == {"rest", "zip", "portal", "stow", "c-store"}
    for door, outcomes in by_door.items():
        assert all(was for lesion, was in outcomes if lesion), (door, outcomes)  # every lesion referred
        assert not any(was for lesion, was in outcomes if not lesion), (door, outcomes)  # plain skin cleared

    # the results say which fields were missing and what it means: JSON, CSV, FHIR
    rest_study = next(s for s in studies if s.external_id == "rest-0")
    result = requests.get(f"{server.url}/api/v1/studies/{rest_study.id}", headers=headers, timeout=30).json()
    assert result["missing_fields"] == FIELDS and "rests on the image" in result["missing_fields_note"]
    csv_rows = read_csv_text(
        requests.get(f"{server.url}/api/v1/batches/{rest_batch}/results?format=csv", headers=headers, timeout=30).text
    )
    assert {r["missing_fields"] for r in csv_rows} == {"age_approx;sex;anatom_site_general"}
    fhir = requests.get(f"{server.url}/api/v1/studies/{rest_study.id}/fhir", headers=headers, timeout=30).json()
    missing = [r for r in fhir["contained"] if r["id"] == "missing-metadata"]
    assert missing and missing[0]["valueString"] == "age_approx, sex, anatom_site_general"
    assert "Scored without age, sex and anatomic site" in fhir["conclusion"]

    # monitoring counts them per program, with the referral rate among them
    from dermascan.governance import monitoring
    from dermascan.infra.schema import Program

    with session_factory(settings.database_url)() as session:
        program = session.scalar(select(Program).where(Program.name == "telederm-a"))
        window = monitoring.rolling(session, program, 1)
    # REST (3 lesions, 2 plain), ZIP (2) and STOW-RS (2) came from this program's token
    assert window.missing_metadata == 9 and window.missing_metadata_referred == 7
    assert window.missing_by_field == {"age_approx": 9, "sex": 9, "anatom_site_general": 9}


def test_the_sr_names_each_field_the_score_was_made_without():
    from dermascan.results_out import dicom_sr
    from tests.dicom_factory import content_items

    source = make_instance(planted_image(_any_jpeg(), True), age=None, site=None)
    result = dicom_sr.AiResult(0.7, 0.5, "high_risk", "v", "sha", missing_fields=("age_approx", "sex"))
    report = dicom_sr.ai_result_report(source, result)
    meanings = [(item.ConceptNameCodeSequence[0].CodeMeaning, getattr(item, "ConceptCodeSequence", [None])[0])
                for item in content_items(report) if "ConceptNameCodeSequence" in item]  # fmt: skip
    missing = [code.CodeMeaning for name, code in meanings if name == "Scored without patient detail"]
    assert missing == ["Patient age", "Patient sex"]


def _any_jpeg() -> bytes:
    from tests.services import HAM

    rows = ham_rows(HAM, 1)
    return next(iter(ham_images(HAM, rows.isic_id).values()))


def test_a_program_may_require_metadata(pg_settings, live_server, api_token, ham_dir):
    from click.testing import CliRunner

    from dermascan.cli import main

    server = live_server(pg_settings)
    _, token = api_token("strict-program")
    runner = CliRunner()
    env = pg_settings.as_env()
    done = runner.invoke(main, ["program", "require-metadata", "strict-program", "--on"], env=env)
    assert done.exit_code == 0, done.output
    rows = ham_rows(ham_dir, 3)
    pictures = ham_images(ham_dir, rows.isic_id)
    records = [
        {"external_id": f"r{i}", "image_base64": base64.b64encode(pictures[row.isic_id]).decode(),
         "age_approx": 50, "sex": "female", "anatom_site_general": "posterior torso"}
        for i, row in enumerate(rows.itertuples())
    ]  # fmt: skip
    del records[1]["sex"]
    records[2]["anatom_site_general"] = ""
    reply = requests.post(
        f"{server.url}/api/v1/batches",
        headers={"Authorization": f"Bearer {token}"},
        json={"records": records},
        timeout=60,
    )
    assert reply.status_code == 201, reply.text
    body = reply.json()
    assert body["accepted"] == 1 and body["rejected"] == 2
    reasons = {r["row"]: (r["field"], r["reason"]) for r in body["records"] if r["status"] == "rejected"}
    assert reasons[2][0] == "sex" and "requires age, sex and anatomic site" in reasons[2][1]
    assert reasons[3][0] == "anatom_site_general"
    # switched off again (audited both times): the same records are all accepted
    assert runner.invoke(main, ["program", "require-metadata", "strict-program", "--off"], env=env).exit_code == 0
    again = requests.post(
        f"{server.url}/api/v1/batches",
        headers={"Authorization": f"Bearer {token}"},
        json={"records": records},
        timeout=60,
    )
    assert again.json()["accepted"] == 3
    from dermascan.infra.schema import AuditEvent

    with session_factory(pg_settings.database_url)() as session:
        actions = session.scalars(
            select(AuditEvent.detail).where(AuditEvent.action == "program_require_metadata")
        ).all()
    assert [a["required"] for a in actions] == [True, False]
