"""screening/ on the embedded default (the fast tier): a batch's results are recorded once (per study
and bundle version) and the referral rule decides; the broker's queue order and task routes."""

from __future__ import annotations

from sqlalchemy import select

from dermascan.infra import broker
from dermascan.infra.db import session_factory
from dermascan.infra.schema import ModelBundle, Prediction, Referral, Study, StudyStatus
from dermascan.screening import results
from dermascan.security.identity import get_or_create_program
from tests.helpers import ham_inputs, store


def test_results_are_recorded_once_and_the_referral_rule_decides(embedded_settings, ham_dir):
    with session_factory(embedded_settings.database_url)() as session, session.begin():
        program_id = get_or_create_program(session, "fast").id
        session.add(ModelBundle(version="unit", sha256="0" * 64, path="-", manifest={}, threshold=0.5))
    ids = store(embedded_settings, program_id, ham_inputs(ham_dir, 4)).new_study_ids
    scored = [
        results.ScoredStudy(ids[0], 0.9),
        results.ScoredStudy(ids[1], 0.5),  # at the threshold: referred
        results.ScoredStudy(ids[2], 0.1),
        results.ScoredStudy(ids[3], 0.01, assessable=False, reason="too dark"),  # never cleared
    ]
    factory = session_factory(embedded_settings.database_url)
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


def test_queue_order_and_routes(embedded_settings):
    assert broker.QUEUES == ("interactive", "bulk", "maintenance", "callbacks")
    router = broker.celery_for(embedded_settings).amqp.router
    routes = {task: router.route({}, task)["queue"].name for task in (
        broker.TASK_SCORE, broker.TASK_HEATMAPS, broker.TASK_SWEEP, broker.TASK_CALLBACK)}  # fmt: skip
    assert routes == {
        broker.TASK_SCORE: "bulk", broker.TASK_HEATMAPS: "maintenance",
        broker.TASK_SWEEP: "maintenance", broker.TASK_CALLBACK: "callbacks",
    }  # fmt: skip


def test_a_lease_is_taken_renewed_expired_and_checked_when_results_are_written(embedded_settings, ham_dir):
    """Worker A claims under a lease; B cannot take the studies while it lives; once it runs out
    B takes them over; A, waking up, writes nothing (its results would be a second opinion over
    B's); B's results go in and the studies are done with no lease left."""
    import datetime as dt

    from dermascan.infra.schema import utcnow

    with session_factory(embedded_settings.database_url)() as session, session.begin():
        program_id = get_or_create_program(session, "lease").id
        session.add(ModelBundle(version="unit", sha256="0" * 64, path="-", manifest={}, threshold=0.5))
    ids = store(embedded_settings, program_id, ham_inputs(ham_dir, 3)).new_study_ids
    factory = session_factory(embedded_settings.database_url)
    with factory() as session, session.begin():
        assert [s.id for s in results.claim(session, ids, "worker-a", 60)] == ids
    with factory() as session, session.begin():
        assert results.claim(session, ids, "worker-b", 60) == []  # A's lease is alive
        assert [s.id for s in results.claim(session, ids, "worker-a", 60)] == ids  # A's retry keeps them
        assert results.renew_leases(session, "worker-a", 60, ids) == 3
        assert results.renew_leases(session, "worker-a", 60, ids[:1]) == 1  # only what a task holds
        assert results.renew_leases(session, "worker-b", 60, ids) == 0
    with factory() as session, session.begin():  # A stalls: its lease runs out
        session.query(Study).update({Study.lease_until: utcnow() - dt.timedelta(seconds=1)})
    with factory() as session, session.begin():
        assert [s.id for s in results.claim(session, ids, "worker-b", 60)] == ids
    scored = [results.ScoredStudy(i, 0.9) for i in ids]
    with factory() as session, session.begin():
        late = results.record(session, "unit", 0.5, scored, owner="worker-a")
    assert late["lost_lease"] == ids and late["scored"] == 0
    with factory() as session:
        assert session.query(Prediction).count() == 0
    with factory() as session, session.begin():
        written = results.record(session, "unit", 0.5, scored, owner="worker-b")
    assert written["scored_ids"] == ids and written["lost_lease"] == []
    with factory() as session:
        rows = list(session.scalars(select(Study)))
        assert {s.status for s in rows} == {StudyStatus.DONE} and {s.lease_owner for s in rows} == {None}
        assert session.query(Prediction).count() == 3


def test_concurrent_writers_of_follow_up_batches_never_deadlock(pg_settings, ham_dir):
    """Two workers write at once: one the first visits of 30 lesions, the other their second
    visits (whose previous_study_id points at the first worker's studies). Each takes the lesions'
    locks first, in id order, before any study row: they take turns, never deadlock (PostgreSQL
    logged `deadlock detected` here before, in a fault storm)."""
    import dataclasses
    import threading

    from dermascan.screening import results as writer

    settings = pg_settings
    with session_factory(settings.database_url)() as session, session.begin():
        program_id = get_or_create_program(session, "follow-up-writers").id
        session.add(ModelBundle(version="unit", sha256="0" * 64, path="-", manifest={}, threshold=0.5))
    images = ham_inputs(ham_dir, 60)
    rounds, lesions = 6, 30
    errors: list = []
    for r in range(rounds):
        visits = []
        for k in range(lesions):
            for v, when in enumerate(("2026-01-05", "2026-03-05")):
                visits.append(dataclasses.replace(
                    images[(2 * k + v) % len(images)], lesion_id=f"round{r}-lesion{k}", acquired_at=when,
                    patient_id=f"patient-{r}-{k}", external_id=f"r{r}-l{k}-v{v}", idempotency_key=f"r{r}-l{k}-v{v}",
                ))  # fmt: skip
        ids = store(settings, program_id, visits).new_study_ids
        first, second = ids[0::2], ids[1::2]
        factory = session_factory(settings.database_url)
        with factory() as session, session.begin():
            writer.claim(session, first, "worker-a", 600)
            writer.claim(session, second, "worker-b", 600)
        start = threading.Barrier(2)

        def write(owner, study_ids, start=start, factory=factory):
            try:
                start.wait()
                with factory() as session, session.begin():
                    writer.record(session, "unit", 0.5, [writer.ScoredStudy(i, 0.7) for i in study_ids], owner=owner)
            except Exception as exc:  # a deadlock is an OperationalError from PostgreSQL
                errors.append(exc)

        threads = [threading.Thread(target=write, args=("worker-a", first)),
                   threading.Thread(target=write, args=("worker-b", list(reversed(second))))]  # fmt: skip
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        with factory() as session:
            done = session.scalars(select(Study).where(Study.id.in_(ids), Study.status == StudyStatus.DONE)).all()
            assert len(done) == len(ids)
            linked = session.scalars(select(Prediction).where(Prediction.study_id.in_(second))).all()
            assert sorted(p.previous_study_id for p in linked) == sorted(first)  # every second visit linked
