"""Retention (issue 11, item 10): images and heat maps of studies finished and decided longer ago
than the period are deleted; results, decisions and the audit trail stay; an open referral, a
recent study and an image another kept study shares are never touched."""

from __future__ import annotations

import datetime as dt

from click.testing import CliRunner
from sqlalchemy import select

from dermascan.cli import main
from dermascan.governance import bundles
from dermascan.infra.blobs import BlobStore
from dermascan.infra.db import session_factory
from dermascan.infra.schema import (
    AuditEvent,
    Decision,
    Prediction,
    Referral,
    ReferralStatus,
    Study,
    StudyStatus,
    utcnow,
)
from dermascan.intake import submission
from dermascan.referrals import queue as referrals
from dermascan.screening import results
from dermascan.security import identity
from dermascan.security.accounts import create_user
from tests.helpers import ham_inputs
from tests.test_security import PASSWORD, _login


def test_purge_deletes_old_decided_images_and_keeps_what_is_still_needed(
    pg_settings, tiny_bundle, ham_dir, app_factory
):
    settings = pg_settings
    factory = session_factory(settings.database_url)
    with factory() as session, session.begin():
        program = identity.get_or_create_program(session, "retention")
        bundle = bundles.register(session, tiny_bundle)
        admin = create_user(session, "keeper-of-records", PASSWORD, "admin", program.id)
        program_id, admin_id = program.id, admin.id
    inputs = ham_inputs(ham_dir, 5)
    first = submission.submit(settings, program_id, inputs, source="test")
    again = submission.submit(settings, program_id, ham_inputs(ham_dir, 1), source="test")  # same image as #0
    old_benign, old_decided, old_open, recent, shared = [a.study_id for a in first.accepted]
    kept_twin = again.accepted[0].study_id
    blobs = BlobStore(settings.blob_dir)
    heatmap = blobs.put(b"\x89PNG heat map of the decided case")
    long_ago = utcnow() - dt.timedelta(days=90)
    with factory() as session, session.begin():
        ids = [old_benign, old_decided, old_open, recent, shared, kept_twin]
        for sid in ids:
            session.get(Study, sid).status = StudyStatus.PROCESSING
        results.record(
            session, bundle.version, 0.5,
            [results.ScoredStudy(old_benign, 0.1), results.ScoredStudy(old_decided, 0.9),
             results.ScoredStudy(old_open, 0.9), results.ScoredStudy(recent, 0.1),
             results.ScoredStudy(shared, 0.1), results.ScoredStudy(kept_twin, 0.9)],
        )  # fmt: skip
        for sid in (old_benign, old_decided, old_open, shared):
            session.get(Study, sid).finished_at = long_ago
        session.scalar(select(Prediction).where(Prediction.study_id == old_decided)).heatmap_sha256 = heatmap
        referral = session.scalar(select(Referral).where(Referral.study_id == old_decided))
        referral.status, referral.claimed_by_id, referral.claimed_at = ReferralStatus.CLAIMED, admin_id, utcnow()
        referrals.decide(session, referral.id, admin_id, Decision.BENIGN, "seborrhoeic keratosis", 1800)
        images = {sid: session.get(Study, sid).image_sha256 for sid in ids}
    assert images[old_benign] == images[kept_twin]  # one blob, two studies

    done = CliRunner().invoke(main, ["purge", "--older-than", "30"], env=settings.as_env())
    assert done.exit_code == 0, done.output
    assert "3 studies purged" in done.output, done.output
    with factory() as session:
        purged = {s.id for s in session.scalars(select(Study).where(Study.image_purged_at.is_not(None)))}
        assert purged == {old_benign, old_decided, shared}
        assert session.scalar(select(Referral.decision).where(Referral.study_id == old_decided)) == Decision.BENIGN
        assert session.scalar(select(Prediction.probability).where(Prediction.study_id == old_decided)) == 0.9
        event = session.scalar(select(AuditEvent).where(AuditEvent.action == "retention_purge"))
        assert event.detail["studies"] == 3
    assert not blobs.exists(images[old_decided]) and not blobs.exists(heatmap) and not blobs.exists(images[shared])
    assert blobs.exists(images[old_benign])  # still the image of the kept twin
    assert all(blobs.exists(images[s]) for s in (old_open, recent, kept_twin))
    # the portal says what happened instead of failing
    client = app_factory(settings).test_client()
    assert _login(client, "keeper-of-records", PASSWORD).status_code == 302
    gone = client.get(f"/studies/{old_decided}/image")
    assert gone.status_code == 410
    assert client.get(f"/studies/{old_open}/image").status_code == 200
    # a second run finds nothing more; a bad period is a clear error
    assert "0 studies purged" in CliRunner().invoke(main, ["purge", "--older-than", "30"], env=settings.as_env()).output
    bad = CliRunner().invoke(main, ["purge", "--older-than", "-1"], env=settings.as_env())
    assert bad.exit_code == 2
