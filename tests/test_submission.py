"""intake/submission on the embedded default (the fast tier): good studies stored, bad ones rejected
with their reason, idempotency keys kept once and replayed, an upload and its audit event committed
together."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from dermascan.infra.db import session_factory
from dermascan.infra.schema import Batch, Study, StudyStatus
from dermascan.ingest.types import StudyInput
from dermascan.intake.submission import SubmitStudies
from dermascan.security.identity import get_or_create_program, pseudonymise
from tests.helpers import ham_inputs, store


def test_submission_stores_good_studies_rejects_bad_ones_and_keeps_keys_once(embedded_settings, ham_dir):
    with session_factory(embedded_settings.database_url)() as session, session.begin():
        program_id = get_or_create_program(session, "fast").id
    good = ham_inputs(ham_dir, 3)
    good[0].idempotency_key = good[1].idempotency_key = "same-study"  # one study sent twice
    good[2].patient_id = "MRN-5"
    bad_image = StudyInput(image=b"not an image", metadata={"age_approx": 50}, external_id="broken", row=4)
    bad_meta = StudyInput(image=good[2].image, metadata={"age_approx": "old"}, external_id="ageless", row=5)
    result = store(embedded_settings, program_id, [*good, bad_image, bad_meta], label="fast tier")
    assert [(a.row, a.duplicate) for a in result.accepted] == [
        (good[0].row, False),
        (good[1].row, True),
        (good[2].row, False),
    ]
    assert result.accepted[0].study_id == result.accepted[1].study_id
    assert {r.external_id: r.field for r in result.rejected} == {"broken": "image", "ageless": "age_approx"}
    assert len(result.new_study_ids) == 2
    with session_factory(embedded_settings.database_url)() as session:
        batch = session.get(Batch, result.batch_id)
        assert (batch.total, batch.rejected, batch.label) == (3, 2, "fast tier")
        studies = list(session.scalars(select(Study).order_by(Study.id)))
        assert [s.status for s in studies] == [StudyStatus.QUEUED] * 2
        by_id = {s.id: s for s in studies}
        assert by_id[result.accepted[2].study_id].patient_pseudonym == pseudonymise(
            embedded_settings.secret_key, program_id, "MRN-5"
        )
    # a retry of the whole upload with the same key is answered from the first one's report
    again = store(embedded_settings, program_id, good, idempotency_key="upload-1")
    replay = store(embedded_settings, program_id, good, idempotency_key="upload-1")
    assert replay.replayed and [a.study_id for a in replay.accepted] == [a.study_id for a in again.accepted]


def test_an_upload_and_its_audit_event_commit_together(embedded_settings, ham_dir):
    from dermascan.infra.schema import AuditEvent

    with session_factory(embedded_settings.database_url)() as session, session.begin():
        program_id = get_or_create_program(session, "fast").id
    factory = session_factory(embedded_settings.database_url)
    with pytest.raises(RuntimeError), factory() as session, session.begin():
        SubmitStudies(embedded_settings, program_id, ham_inputs(ham_dir, 1), source="test", ip="192.0.2.7").run(session)
        raise RuntimeError("the caller's transaction fails after the submission")
    with factory() as session:
        assert session.query(Study).count() == 0 and session.query(AuditEvent).count() == 0
    result = store(embedded_settings, program_id, ham_inputs(ham_dir, 1), ip="192.0.2.7")
    with factory() as session:
        event = session.scalar(select(AuditEvent).where(AuditEvent.action == "upload"))
        assert (event.object_id, event.ip, event.detail["accepted"]) == (result.batch_id, "192.0.2.7", 1)
