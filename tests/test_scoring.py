"""The scoring pipeline on real parts: PostgreSQL, Redis, a real `celery worker` subprocess."""

from __future__ import annotations

import re
import time

from sqlalchemy import func, select

from dermascan.infra.blobs import BlobStore
from dermascan.infra.db import session_factory
from dermascan.infra.schema import ModelBundle, Prediction, Referral, Study, StudyStatus
from dermascan.ingest.types import StudyInput
from dermascan.intake.submission import submit
from dermascan.upkeep.sweeper import sweep
from tests.helpers import all_done, ham_inputs, program_id, status_counts
from tests.services import wait_for
from worker.warm import FOLLOW_UP_WARM, HEATMAPS_WARM, WARM


def test_fifty_ham_studies_scored_and_referred_by_threshold(pg_settings, start_worker, ham_dir, tiny_bundle):
    settings = pg_settings
    worker = start_worker(settings)
    result = submit(settings, program_id(settings), ham_inputs(ham_dir, 50), source="test", label="fifty")
    assert len(result.accepted) == 50 and not result.rejected
    wait_for(lambda: all_done(settings, 50, result.batch_id), 180, message="50 studies scored")
    # warm means warm: Grad-CAM and the follow-up path ran before the first task, not beside it
    log = worker.log()
    assert log.index(HEATMAPS_WARM) < log.index(WARM) and log.index(FOLLOW_UP_WARM) < log.index(WARM), log

    with session_factory(settings.database_url)() as session:
        bundle = session.scalar(select(ModelBundle).where(ModelBundle.active.is_(True)))
        assert bundle.version == "tiny-test"
        studies = list(session.scalars(select(Study).where(Study.batch_id == result.batch_id)))
        assert {s.status for s in studies} == {StudyStatus.DONE}
        predictions = {p.study_id: p for p in session.scalars(select(Prediction))}
        assert len(predictions) == 50
        assert {p.bundle_version for p in predictions.values()} == {"tiny-test"}
        referred = set(session.scalars(select(Referral.study_id)))
        expected = {sid for sid, p in predictions.items() if p.probability >= bundle.threshold}
        assert referred == expected
        assert 0 < len(referred) < 50  # the tiny bundle's threshold is its median score
        high_risk = set(session.scalars(select(Referral.study_id).where(Referral.category == "high_risk")))

    # the score task sent one heat-map message for its referred studies; each heat-map task draws
    # one map and queues the rest again (scoring waiting goes first), until every one has its map
    def maps_drawn():
        with session_factory(settings.database_url)() as session:
            drawn = session.scalars(select(Prediction.heatmap_sha256).where(Prediction.study_id.in_(high_risk)))
            return all(drawn)

    def made() -> list[int]:  # each heat-map task's count, from its log line (written after its commit)
        return [int(n) for n in re.findall(r"heat maps: (\d+) made", worker.log())]

    wait_for(maps_drawn, 120, message="a heat map for every study referred for risk")
    wait_for(lambda: sum(made()) >= len(high_risk), 30, message="the heat-map tasks' log lines")
    assert max(made()) == 1 and sum(made()) == len(high_risk), made()


def test_same_idempotency_key_twice_gives_one_study_one_prediction(pg_settings, start_worker, ham_dir):
    settings = pg_settings
    pid = program_id(settings)
    item = ham_inputs(ham_dir, 1)[0]
    item.idempotency_key = "client-key-1"
    first = submit(settings, pid, [item], source="test", batch=False, interactive=True)
    second = submit(settings, pid, [item], source="test", batch=False, interactive=True)
    assert first.accepted[0].study_id == second.accepted[0].study_id
    assert second.accepted[0].duplicate and not second.new_study_ids
    start_worker(settings)
    wait_for(lambda: status_counts(settings).get("done") == 1, 120, message="the study scored")
    time.sleep(1.0)  # both messages have been consumed by now
    with session_factory(settings.database_url)() as session:
        assert session.scalar(select(func.count()).select_from(Study)) == 1
        assert session.scalar(select(func.count()).select_from(Prediction)) == 1


def test_submit_while_redis_is_down_is_swept_and_scored_later(
    make_settings, pg_url, private_redis, start_worker, ham_dir
):
    settings = make_settings(database_url=pg_url, broker_url=private_redis.url, sweep_interval_s=1)
    pid = program_id(settings)
    # the broker is not running: the submit still succeeds and the studies wait in PostgreSQL
    started = time.monotonic()
    result = submit(settings, pid, ham_inputs(ham_dir, 3), source="test")
    assert time.monotonic() - started < 30
    assert len(result.accepted) == 3
    with session_factory(settings.database_url)() as session:
        studies = list(session.scalars(select(Study)))
        assert [s.status for s in studies] == [StudyStatus.QUEUED] * 3
        assert all(s.enqueued_at is None for s in studies)
    # the broker comes back; the worker's beat runs the sweeper, which re-sends them
    private_redis.start()
    start_worker(settings, beat=True)
    wait_for(lambda: status_counts(settings).get("done") == 3, 120, message="swept studies scored")
    with session_factory(settings.database_url)() as session:
        assert all(s.enqueued_at is not None for s in session.scalars(select(Study)))


def test_sweep_command_resends_unsent_studies(make_settings, pg_url, private_redis, ham_dir):
    settings = make_settings(database_url=pg_url, broker_url=private_redis.url)
    submit(settings, program_id(settings), ham_inputs(ham_dir, 2), source="test")
    private_redis.start()
    time.sleep(5.5)  # older than the unsent grace period
    outcome = sweep(settings)
    assert outcome == {
        "found": 2,
        "stuck_processing": 0,
        "sent": 2,
        "stale_claims": 0,
        "purged": 0,
        "broker_read": True,
    }
    import redis

    assert redis.Redis.from_url(private_redis.url).llen("bulk") == 1  # one chunk message


def test_worker_killed_mid_batch_loses_and_duplicates_nothing(make_settings, pg_url, redis_url, start_worker, ham_dir):
    settings = make_settings(
        database_url=pg_url,
        broker_url=redis_url,
        visibility_timeout_s=3600,  # the killed worker's message is not redelivered: the lease recovers it
        lease_s=6,
        sweep_interval_s=1,
    )
    n = 160
    result = submit(settings, program_id(settings), ham_inputs(ham_dir, n), source="test")
    first = start_worker(settings)

    seen: list[dict] = []  # each distinct state the studies passed through, for the message on a timeout

    def mid_batch():
        counts = status_counts(settings)
        if not seen or seen[-1] != counts:
            seen.append(counts)
        return counts.get("processing", 0) > 0 and 0 < counts.get("done", 0) < n - 16

    try:
        wait_for(mid_batch, 180, interval=0.01, message="a batch in progress")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the studies' states seen, in order: {seen}") from None
    first.kill()  # SIGKILL to the worker's whole process group
    counts = status_counts(settings)
    assert counts.get("done", 0) < n
    start_worker(settings)  # no beat: the worker's own sweeper takes the dead worker's studies over
    wait_for(lambda: all_done(settings, n, result.batch_id), 240, message="all studies scored after the restart")
    with session_factory(settings.database_url)() as session:
        per_study = dict(session.execute(select(Prediction.study_id, func.count()).group_by(Prediction.study_id)).all())
        assert len(per_study) == n
        assert set(per_study.values()) == {1}
        assert status_counts(settings) == {"done": n}


def test_undecodable_image_fails_alone_with_its_reason(pg_settings, start_worker, ham_dir):
    settings = pg_settings
    inputs = ham_inputs(ham_dir, 8)
    result = submit(settings, program_id(settings), inputs, source="test")
    with session_factory(settings.database_url)() as session:
        victim = session.get(Study, result.accepted[3].study_id)
    # the stored file is damaged after it was accepted (disk fault, bad copy): its blob no longer
    # matches its sha256, and a second study's blob is replaced by bytes that are not an image
    path = BlobStore(settings.blob_dir).path(victim.image_sha256)
    path.write_bytes(path.read_bytes()[:500])
    start_worker(settings)
    wait_for(lambda: all_done(settings, 8, result.batch_id), 120, message="batch finished")
    with session_factory(settings.database_url)() as session:
        studies = {s.id: s for s in session.scalars(select(Study))}
        failed = [s for s in studies.values() if s.status == StudyStatus.FAILED]
        assert [s.id for s in failed] == [victim.id]
        assert "damaged" in failed[0].error
        assert session.scalar(select(func.count()).select_from(Prediction)) == 7


def test_undecodable_pixels_fail_alone(pg_settings, start_worker, ham_dir):
    """An image that passed the door's checks but cannot be decoded by the model's reader."""
    settings = pg_settings
    inputs = ham_inputs(ham_dir, 4)
    result = submit(settings, program_id(settings), inputs, source="test")
    bad_bytes = b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 20
    digest = BlobStore(settings.blob_dir).put(bad_bytes)
    with session_factory(settings.database_url)() as session, session.begin():
        session.get(Study, result.accepted[1].study_id).image_sha256 = digest
    start_worker(settings)
    wait_for(lambda: all_done(settings, 4, result.batch_id), 120, message="batch finished")
    with session_factory(settings.database_url)() as session:
        failed = list(session.scalars(select(Study).where(Study.status == StudyStatus.FAILED)))
        assert [s.id for s in failed] == [result.accepted[1].study_id]
        assert failed[0].error.startswith("image cannot be decoded")
        assert status_counts(settings) == {"done": 3, "failed": 1}


def test_rejected_input_is_reported_and_others_accepted(pg_settings, ham_dir):
    settings = pg_settings
    good = ham_inputs(ham_dir, 2)
    bad = [
        StudyInput(image=b"GIF89a not an image", external_id="gif", row=3),
        StudyInput(image=good[0].image, metadata={"age_approx": "200"}, external_id="old", row=4),
        StudyInput(image=good[0].image, metadata={"sex": "x"}, external_id="sexless", row=5),
    ]
    result = submit(settings, program_id(settings), good + bad, source="test")
    assert len(result.accepted) == 2
    reasons = {r.external_id: r.reason for r in result.rejected}
    assert "not an image" in reasons["gif"]
    assert "outside 0–120" in reasons["old"]
    assert "not one of male, female" in reasons["sexless"]


def test_messages_lost_with_the_broker_are_found_and_sent_again(
    make_settings, pg_url, private_redis, start_worker, ham_dir
):
    """A Redis without persistence restarts: the queued studies' messages are gone. The sweeper
    compares what is queued in the database with what the broker holds and sends the missing ones
    again — none of those still in the broker (a backlog is not flooded with duplicates)."""
    from dermascan.infra import broker

    private_redis.start()
    settings = make_settings(database_url=pg_url, broker_url=private_redis.url, sweep_lost_after_s=0)
    first = submit(settings, program_id(settings), ham_inputs(ham_dir, 24), source="test")
    assert broker.held_study_ids(settings) == set(first.new_study_ids)
    assert sweep(settings)["sent"] == 0  # every queued study's message is in the broker
    private_redis.stop()
    private_redis.start()  # empty: the messages went with it
    assert broker.held_study_ids(settings) == set()
    assert sweep(settings)["sent"] == 24
    assert broker.held_study_ids(settings) == set(first.new_study_ids)
    start_worker(settings.replace(worker_sweeps=False))
    wait_for(lambda: all_done(settings, 24, first.batch_id), 120, message="the re-sent studies scored")
    with session_factory(settings.database_url)() as session:
        assert session.scalar(select(func.count()).select_from(Prediction)) == 24


def test_a_task_that_ends_by_retry_gives_its_leases_back_and_nothing_renews_them(
    make_settings, pg_url, redis_url, start_worker, ham_dir
):
    """The fault storm's stuck studies: a score task's write fails (here another transaction holds
    the predictions table, as a deadlock would end it), the task ends by a retry, and the retry's
    message is lost. The leases go with the task: the studies are queued again at once, the
    process's heartbeat renews none of them, and the sweeper sends them to a worker that scores them."""
    import datetime as dt

    from sqlalchemy import create_engine, text

    from dermascan.infra.schema import utcnow
    from dermascan.intake.submission import SubmitStudies
    from worker.leases import HELD, Heartbeat
    from worker.runtime import TransientError
    from worker.scoring import ScoreStudies

    settings = make_settings(database_url=pg_url + "?options=-c%20lock_timeout%3D1500", broker_url=redis_url)
    with session_factory(settings.database_url)() as session, session.begin():  # stored, never sent
        ids = (
            SubmitStudies(settings, program_id(settings), ham_inputs(ham_dir, 4), source="test")
            .run(session)
            .new_study_ids
        )
    blocker = create_engine(pg_url).connect()
    transaction = blocker.begin()
    blocker.execute(text("LOCK TABLE predictions IN ACCESS EXCLUSIVE MODE"))
    try:
        try:
            ScoreStudies(settings, ids).run()
            raise AssertionError("the write should have failed")
        except TransientError:
            pass  # what the task turns into a retry (its message then lost: never sent here)
    finally:
        transaction.rollback()
        blocker.close()
    with session_factory(settings.database_url)() as session:
        rows = session.scalars(select(Study).where(Study.id.in_(ids))).all()
    assert {(s.status, s.lease_owner, s.lease_until) for s in rows} == {(StudyStatus.QUEUED, None, None)}
    assert HELD.snapshot() == [] and Heartbeat(settings).beat() == 0
    swept = sweep(settings, now=utcnow() + dt.timedelta(seconds=settings.sweep_lost_after_s + 1))
    assert swept["sent"] == 4
    start_worker(settings)
    wait_for(lambda: all_done(settings, 4), 120, message="the studies scored after the sweep")
