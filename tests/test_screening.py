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


def _write_one_piece(settings, ham_dir) -> dict:
    """One piece written as a worker writes it — scored, failed, not assessable; two visits of a
    lesion in the same piece; a visit whose previous visit is scored only in a later write; a
    redelivery — and what the database then holds, by each study's place in the piece."""
    import dataclasses

    with session_factory(settings.database_url)() as session, session.begin():
        program_id = get_or_create_program(session, "one-piece").id
        session.add(ModelBundle(version="unit", sha256="0" * 64, path="-", manifest={}, threshold=0.5))
    visits = [("L1", "2026-01-05"), ("L1", "2026-03-05"), (None, None), (None, None), (None, None),
              ("L2", "2026-03-05"), ("L2", "2026-01-05")]  # fmt: skip
    inputs = [
        dataclasses.replace(image, lesion_id=lesion, acquired_at=when, patient_id=f"patient-{lesion or k}",
                            external_id=f"piece-{k}", idempotency_key=f"piece-{k}")
        for k, (image, (lesion, when)) in enumerate(zip(ham_inputs(ham_dir, len(visits)), visits, strict=True))
    ]  # fmt: skip
    ids = store(settings, program_id, inputs).new_study_ids
    place = {study_id: k for k, study_id in enumerate(ids)}
    piece = [
        results.ScoredStudy(ids[0], 0.2, distance=1.5),
        results.ScoredStudy(ids[1], 0.7),  # its lesion's visit before it, in the same piece, at 0.2: newly high risk
        results.ScoredStudy(ids[2], 0.1, distance=float("nan")),  # a distance that is no number is kept as none
        results.ScoredStudy(ids[4], 0.9, assessable=False, reason="too dark"),
        results.ScoredStudy(ids[5], 0.3),  # its previous visit (ids[6]) is scored in a later write
    ]
    factory = session_factory(settings.database_url)
    with factory() as session, session.begin():
        results.claim(session, ids, "worker", 60)
    outcomes = []
    with factory() as session, session.begin():
        outcomes.append(results.record(session, "unit", 0.5, piece, [(ids[3], "image cannot be decoded")], "worker"))
    with factory() as session, session.begin():
        outcomes.append(results.record(session, "unit", 0.5, [results.ScoredStudy(ids[6], 0.1)], [], "worker"))
    with factory() as session, session.begin():  # a redelivery, by a writer without a lease: nothing doubled
        outcomes.append(results.record(session, "unit", 0.5, piece, [(ids[3], "again")]))
    with factory() as session:
        predictions = {
            place[p.study_id]: (p.probability, p.threshold, p.feature_distance, p.assessable,
                                place.get(p.previous_study_id), p.probability_change, p.newly_high_risk, p.id)
            for p in session.scalars(select(Prediction))
        }  # fmt: skip
        referrals = {
            place[r.study_id]: (r.category, r.tier, r.probability, predictions[place[r.study_id]][-1] == r.prediction_id)
            for r in session.scalars(select(Referral))
        }  # fmt: skip
        studies = {place[s.id]: (s.status, s.error, s.lease_owner) for s in session.scalars(select(Study))}
    for outcome in outcomes:
        for key in ("high_risk", "not_assessable", "scored_ids", "lost_lease"):
            outcome[key] = [place[i] for i in outcome[key]]
    return {"predictions": {k: v[:-1] for k, v in predictions.items()}, "referrals": referrals, "studies": studies,
            "outcomes": outcomes}  # fmt: skip


def test_a_piece_is_written_alike_in_one_statement_on_postgresql_and_statement_by_statement_on_sqlite(
    embedded_settings, pg_settings, ham_dir
):
    """PostgreSQL writes a piece's predictions, statuses and referrals in one statement; SQLite
    (the embedded default) one statement at a time. The same piece leaves the same rows in both."""
    on_sqlite, on_postgresql = _write_one_piece(embedded_settings, ham_dir), _write_one_piece(pg_settings, ham_dir)
    assert on_postgresql == on_sqlite
    predictions, referrals, studies = on_postgresql["predictions"], on_postgresql["referrals"], on_postgresql["studies"]
    assert sorted(predictions) == [0, 1, 2, 4, 5, 6]
    assert predictions[0][:5] == (0.2, 0.5, 1.5, True, None)  # the lesion's first visit: nothing before it
    assert predictions[1][4:] == (0, 0.5, True)  # compared with the visit before it, written in the same statement
    assert predictions[2][2] is None
    assert predictions[5][4:] == (6, 0.2, False)  # compared once its previous visit was scored
    assert referrals == {1: ("newly_high_risk", 0, 0.7, True), 4: ("not_assessable", 3, 0.9, True)}, (
        referrals
    )  # each tied to its prediction
    assert studies[3] == (StudyStatus.FAILED, "again", None)  # a failure written again: its latest reason
    assert {studies[k] for k in (0, 1, 2, 4, 5, 6)} == {(StudyStatus.DONE, None, None)}
    first, later, again = on_postgresql["outcomes"]
    assert (first["scored_ids"], first["failed"], first["high_risk"], first["not_assessable"]) == (
        [0, 1, 2, 4, 5],
        1,
        [1, 0],
        [4],
    )
    assert later["scored_ids"] == [6] and again["scored"] == 5 and again["lost_lease"] == []
