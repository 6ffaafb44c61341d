"""The fast tier's core tests: submission, result recording with the referral rule, queue order
and the parsers — on SQLite and the embedded default, no PostgreSQL, Redis or trained model
(`pytest -m "not slow"`)."""

from __future__ import annotations

import io

import pytest
from sqlalchemy import select

from dermascan.config import Settings
from dermascan.infra import broker, migrate
from dermascan.infra.db import session_factory
from dermascan.infra.schema import Batch, ModelBundle, Prediction, Referral, Study, StudyStatus
from dermascan.ingest import json_records
from dermascan.ingest.errors import IngestError
from dermascan.ingest.multipart import MultipartError, iter_parts
from dermascan.ingest.types import StudyInput
from dermascan.intake.submission import SubmitStudies
from dermascan.screening import results
from dermascan.security.identity import get_or_create_program, pseudonymise
from tests.helpers import ham_inputs


@pytest.fixture
def embedded(tmp_path) -> Settings:
    settings = Settings.from_env(env={}, data_dir=tmp_path / "var", secret_key="fast-tier-secret")
    migrate.upgrade(settings.database_url)
    return settings


def run(settings, program_id, inputs, **options):
    with session_factory(settings.database_url)() as session, session.begin():
        return SubmitStudies(settings, program_id, inputs, source="test", **options).run(session)


def test_submission_stores_good_studies_rejects_bad_ones_and_keeps_keys_once(embedded, ham_dir):
    with session_factory(embedded.database_url)() as session, session.begin():
        program_id = get_or_create_program(session, "fast").id
    good = ham_inputs(ham_dir, 3)
    good[0].idempotency_key = good[1].idempotency_key = "same-study"  # one study sent twice
    good[2].patient_id = "MRN-5"
    bad_image = StudyInput(image=b"not an image", metadata={"age_approx": 50}, external_id="broken", row=4)
    bad_meta = StudyInput(image=good[2].image, metadata={"age_approx": "old"}, external_id="ageless", row=5)
    result = run(embedded, program_id, [*good, bad_image, bad_meta], label="fast tier")
    assert [(a.row, a.duplicate) for a in result.accepted] == [
        (good[0].row, False),
        (good[1].row, True),
        (good[2].row, False),
    ]
    assert result.accepted[0].study_id == result.accepted[1].study_id
    assert {r.external_id: r.field for r in result.rejected} == {"broken": "image", "ageless": "age_approx"}
    assert len(result.new_study_ids) == 2
    with session_factory(embedded.database_url)() as session:
        batch = session.get(Batch, result.batch_id)
        assert (batch.total, batch.rejected, batch.label) == (3, 2, "fast tier")
        studies = list(session.scalars(select(Study).order_by(Study.id)))
        assert [s.status for s in studies] == [StudyStatus.QUEUED] * 2
        by_id = {s.id: s for s in studies}
        assert by_id[result.accepted[2].study_id].patient_pseudonym == pseudonymise(
            embedded.secret_key, program_id, "MRN-5"
        )
    # a retry of the whole upload with the same key is answered from the first one's report
    again = run(embedded, program_id, good, idempotency_key="upload-1")
    replay = run(embedded, program_id, good, idempotency_key="upload-1")
    assert replay.replayed and [a.study_id for a in replay.accepted] == [a.study_id for a in again.accepted]


def test_results_are_recorded_once_and_the_referral_rule_decides(embedded, ham_dir):
    with session_factory(embedded.database_url)() as session, session.begin():
        program_id = get_or_create_program(session, "fast").id
        session.add(ModelBundle(version="unit", sha256="0" * 64, path="-", manifest={}, threshold=0.5))
    ids = run(embedded, program_id, ham_inputs(ham_dir, 4)).new_study_ids
    scored = [
        results.ScoredStudy(ids[0], 0.9),
        results.ScoredStudy(ids[1], 0.5),  # at the threshold: referred
        results.ScoredStudy(ids[2], 0.1),
        results.ScoredStudy(ids[3], 0.01, assessable=False, reason="too dark"),  # never cleared
    ]
    factory = session_factory(embedded.database_url)
    with factory() as session, session.begin():
        outcome = results.record(session, "unit", 0.5, scored)
    assert outcome["high_risk"] == [ids[0], ids[1]] and outcome["not_assessable"] == [ids[3]]
    with factory() as session, session.begin():  # recorded again (a redelivered message): no duplicates
        results.record(session, "unit", 0.5, scored)
    with factory() as session:
        assert session.query(Prediction).count() == 4
        referrals = {r.study_id: r.category for r in session.scalars(select(Referral))}
        assert referrals == {ids[0]: "high_risk", ids[1]: "high_risk", ids[3]: "not_assessable"}
        assert {s.status for s in session.scalars(select(Study))} == {StudyStatus.DONE}


def test_queue_order_and_routes(embedded):
    assert broker.QUEUES == ("interactive", "bulk", "maintenance", "callbacks")
    router = broker.celery_for(embedded).amqp.router
    routes = {task: router.route({}, task)["queue"].name for task in (
        broker.TASK_SCORE, broker.TASK_HEATMAPS, broker.TASK_SWEEP, broker.TASK_CALLBACK)}  # fmt: skip
    assert routes == {
        broker.TASK_SCORE: "bulk", broker.TASK_HEATMAPS: "maintenance",
        broker.TASK_SWEEP: "maintenance", broker.TASK_CALLBACK: "callbacks",
    }  # fmt: skip


def test_json_records_parser(ham_dir):
    import base64

    image = base64.b64encode(ham_inputs(ham_dir, 1)[0].image).decode()
    inputs, rejected = json_records.parse(
        {"records": [
            {"image_base64": image, "external_id": "a", "age_approx": 40, "patient_id": 7, "idempotency_key": "k" * 300},
            {"image_base64": "***", "external_id": "b"},
            {"external_id": "c"},
            "not an object",
            {"image_base64": image, "external_id": "d", "favourite_colour": "blue"},
        ]},
        max_key=200,
    )  # fmt: skip
    assert [(i.external_id, i.patient_id, len(i.idempotency_key)) for i in inputs] == [("a", "7", 200)]
    assert [(r.row, r.field) for r in rejected] == [
        (2, "image_base64"),
        (3, "image_base64"),
        (4, None),
        (5, "favourite_colour"),
    ]
    with pytest.raises(IngestError):
        json_records.parse({"rows": []})


def test_multipart_parts_stream_and_oversized_parts_are_dropped():
    body = (
        b"--b\r\nContent-Type: application/dicom\r\n\r\n" + b"x" * 10 + b"\r\n"
        b"--b\r\nContent-Type: application/dicom\r\n\r\n" + b"y" * 5000 + b"\r\n--b--\r\n"
    )
    parts = list(iter_parts(io.BytesIO(body), "b", max_part_bytes=100))
    assert [(p.headers["content-type"], bytes(p.payload), p.too_large, p.size) for p in parts] == [
        ("application/dicom", b"x" * 10, False, 10),
        ("application/dicom", b"", True, 5000),
    ]
    with pytest.raises(MultipartError):
        list(iter_parts(io.BytesIO(body[:40]), "b", max_part_bytes=100))


def test_an_upload_and_its_audit_event_commit_together(embedded, ham_dir):
    from dermascan.infra.schema import AuditEvent

    with session_factory(embedded.database_url)() as session, session.begin():
        program_id = get_or_create_program(session, "fast").id
    factory = session_factory(embedded.database_url)
    with pytest.raises(RuntimeError), factory() as session, session.begin():
        SubmitStudies(embedded, program_id, ham_inputs(ham_dir, 1), source="test", ip="192.0.2.7").run(session)
        raise RuntimeError("the caller's transaction fails after the submission")
    with factory() as session:
        assert session.query(Study).count() == 0 and session.query(AuditEvent).count() == 0
    result = run(embedded, program_id, ham_inputs(ham_dir, 1), ip="192.0.2.7")
    with factory() as session:
        event = session.scalar(select(AuditEvent).where(AuditEvent.action == "upload"))
        assert (event.object_id, event.ip, event.detail["accepted"]) == (result.batch_id, "192.0.2.7", 1)
