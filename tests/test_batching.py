"""Dynamic batching of interactive studies, and interactive work served before bulk work."""

from __future__ import annotations

import threading
import time

from sqlalchemy import select

from dermascan.infra.db import session_factory
from dermascan.infra.schema import Study, StudyStatus
from dermascan.intake.submission import submit
from tests.helpers import all_done, ham_inputs, program_id, status_counts
from tests.services import wait_for


def queued_interactive(settings, ham_dir, n: int, offset: int = 0) -> list[int]:
    """Interactive studies stored without sending messages (the test calls the scorer directly)."""
    from dermascan.intake.submission import SubmitStudies

    pid = program_id(settings)
    with session_factory(settings.database_url)() as session, session.begin():
        result = SubmitStudies(
            settings, pid, ham_inputs(ham_dir, n, offset), source="test", interactive=True, batch=False
        ).run(session)
    return result.new_study_ids


def test_batches_form_up_to_the_max_size(pg_settings, ham_dir):
    from worker.scoring import ScoreStudies

    settings = pg_settings.replace(batch_max_size=16, batch_max_wait_ms=200)
    ids = queued_interactive(settings, ham_dir, 40)
    outcome = ScoreStudies(settings, [ids[0]], interactive=True).run()
    assert outcome.timings["batch_size"] == 16 and outcome.scored == 16
    assert status_counts(settings) == {"done": 16, "queued": 24}
    # the message of a study that was scored in someone else's batch is a no-op
    again = ScoreStudies(settings, [ids[1]], interactive=True).run()
    assert again.skipped == 1 and again.timings["batch_size"] == 16


def test_batches_flush_at_the_max_wait_with_what_arrived(pg_settings, ham_dir):
    from worker.scoring import ScoreStudies

    settings = pg_settings.replace(batch_max_size=32, batch_max_wait_ms=1500)
    first = queued_interactive(settings, ham_dir, 1)
    late: list[int] = []

    def arrive_during_the_wait():
        time.sleep(0.3)
        late.extend(queued_interactive(settings, ham_dir, 2, offset=1))

    thread = threading.Thread(target=arrive_during_the_wait)
    thread.start()
    outcome = ScoreStudies(settings, first, interactive=True).run()
    thread.join()
    # it did not wait for a full batch of 32: it flushed with the three that had arrived
    assert outcome.timings["batch_size"] == 3 and outcome.scored == 3
    after = queued_interactive(settings, ham_dir, 1, offset=3)
    with session_factory(settings.database_url)() as session:
        assert session.get(Study, after[0]).status == StudyStatus.QUEUED
        assert {s.status for s in session.scalars(select(Study).where(Study.id.in_(first + late)))} == {
            StudyStatus.DONE
        }


def test_bulk_work_is_never_batched_dynamically(pg_settings, ham_dir):
    from worker.scoring import ScoreStudies

    settings = pg_settings.replace(batch_max_size=16, batch_max_wait_ms=100)
    queued_interactive(settings, ham_dir, 5)
    bulk = submit(settings, program_id(settings, "bulk"), ham_inputs(ham_dir, 3, 10), source="test").new_study_ids
    outcome = ScoreStudies(settings, bulk, interactive=False).run()
    assert outcome.timings["batch_size"] == 3
    assert status_counts(settings) == {"done": 3, "queued": 5}


def test_interactive_study_is_served_before_queued_bulk_chunks(pg_settings, start_worker, ham_dir):
    settings = pg_settings.replace(bulk_chunk_size=8)
    pid = program_id(settings)
    bulk = submit(settings, pid, ham_inputs(ham_dir, 64), source="test", label="nightly")  # 8 chunks waiting
    single = submit(settings, pid, ham_inputs(ham_dir, 1, 100), source="test", interactive=True, batch=False)
    start_worker(settings)
    wait_for(lambda: all_done(settings, 65), 240, message="everything scored")
    with session_factory(settings.database_url)() as session:
        interactive = session.get(Study, single.new_study_ids[0])
        bulk_finished = sorted(
            s.finished_at for s in session.scalars(select(Study).where(Study.batch_id == bulk.batch_id))
        )
    assert interactive.finished_at < bulk_finished[0], "the interactive study waited behind bulk work"


def test_waiting_interactive_study_is_served_between_pieces_of_a_bulk_chunk(pg_settings, ham_dir):
    from worker.scoring import ScoreStudies

    settings = pg_settings.replace(predict_batch_sizes=(1, 8))
    bulk = submit(settings, program_id(settings, "bulk"), ham_inputs(ham_dir, 24), source="test").new_study_ids
    waiting = queued_interactive(settings, ham_dir, 1, offset=50)  # arrived while the chunk was queued
    outcome = ScoreStudies(settings, bulk).run()  # one chunk of 24: three pieces of 8
    assert outcome.scored == 24
    with session_factory(settings.database_url)() as session:
        person = session.get(Study, waiting[0])
        chunk_done = min(s.finished_at for s in session.scalars(select(Study).where(Study.id.in_(bulk))))
    assert person.status == StudyStatus.DONE and person.finished_at < chunk_done
