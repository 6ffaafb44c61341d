"""upkeep/check (`dermascan check`) on the embedded default (the fast tier): missing and damaged
blobs of kept studies, blobs no row refers to (removed with --fix only past the grace period, so
an upload in flight is never touched) and studies left without a result far too long."""

from __future__ import annotations

import datetime as dt
import json
import os
import time

from click.testing import CliRunner
from sqlalchemy import update

from dermascan.cli import main
from dermascan.infra.blobs import BlobStore
from dermascan.infra.db import session_factory
from dermascan.infra.schema import Study, StudyStatus, utcnow
from dermascan.security.identity import get_or_create_program
from dermascan.upkeep.check import check
from tests.helpers import ham_inputs, store


def test_check_finds_missing_damaged_and_orphaned_blobs_and_stalled_studies(embedded_settings, ham_dir):
    settings = embedded_settings
    with session_factory(settings.database_url)() as session, session.begin():
        program_id = get_or_create_program(session, "check").id
    ids = store(settings, program_id, ham_inputs(ham_dir, 4)).new_study_ids
    with session_factory(settings.database_url)() as session, session.begin():  # all scored
        session.execute(update(Study).values(status=StudyStatus.DONE))
    assert check(settings).clean
    blobs = BlobStore(settings.blob_dir)
    with session_factory(settings.database_url)() as session:
        digests = [session.get(Study, i).image_sha256 for i in ids]
    blobs.path(digests[0]).unlink()  # lost
    blobs.path(digests[1]).write_bytes(b"not the image any more")  # damaged
    old, young = blobs.put(b"left behind by an upload that failed"), blobs.put(b"an upload in flight")
    two_days_ago = time.time() - 2 * 86400
    os.utime(blobs.path(old), (two_days_ago, two_days_ago))
    with session_factory(settings.database_url)() as session, session.begin():
        session.execute(
            update(Study)
            .where(Study.id == ids[3])
            .values(status=StudyStatus.QUEUED, created_at=utcnow() - dt.timedelta(days=1))
        )
    report = check(settings)
    assert [(s, w) for s, w, _ in report.missing] == [(ids[0], "image")]
    assert [(s, w) for s, w, _ in report.corrupt] == [(ids[1], "image")]
    assert [d for d, _ in report.orphans] == [old] and report.young_orphans == 1
    assert [s for s, _, _ in report.stalled] == [ids[3]]
    quick = check(settings, verify=False)
    assert quick.corrupt == [] and [s for s, _, _ in quick.missing] == [ids[0]]
    result = CliRunner().invoke(main, ["--data-dir", str(settings.data_dir), "check", "--json"], env=_env(settings))
    assert result.exit_code == 1 and json.loads(result.output)["orphans"] == [old]
    fixed = check(settings, fix=True)
    assert fixed.removed == 1 and not blobs.exists(old) and blobs.exists(young)


def _env(settings) -> dict:
    return {"DERMASCAN_SECRET_KEY": settings.secret_key, "DERMASCAN_DATABASE_URL": settings.database_url}
