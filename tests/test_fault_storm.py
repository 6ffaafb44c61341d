"""Scale-out through failing servers (upkeep and leases, end to end): three real worker processes
and the web app on a PostgreSQL and a Redis that the test starts itself (Redis without
persistence, as on these machines; no beat). 3,000 studies arrive through the REST API while one
worker is killed -9 mid-batch, PostgreSQL is restarted, and Redis is stopped for 30 s (the
messages it held are lost) and started again; every study names its lesion, so the workers link
visits of the same lesions while they write. Nothing is restarted by hand: every study ends done,
none is scored twice, `dermascan check` finds no damage, and the test prints the time from the
last fault to the last study done.

The size: 3,000 studies keep every worker busy through all three faults with the tiny bundle
(scored in chunks of 16, so there is always work in flight, in the broker and not yet sent when
each fault lands); the model's own speed does not change what recovery has to do.
"""

from __future__ import annotations

import time

import requests
from click.testing import CliRunner
from sqlalchemy import func, select

from dermascan.cli import main
from dermascan.infra import migrate
from dermascan.infra.db import engine_for, session_factory
from dermascan.infra.schema import Prediction, Study, StudyStatus
from dermascan.security.accounts import create_token
from dermascan.security.identity import get_or_create_program
from tests.ham_files import json_records
from tests.services import PrivatePostgres, wait_for

N, PER_REQUEST = 3000, 250


def counts(settings) -> dict:
    try:
        with session_factory(settings.database_url)() as session:
            rows = session.execute(select(Study.status, func.count()).group_by(Study.status)).all()
        return {StudyStatus(s).value: c for s, c in rows}
    except Exception:  # the database is restarting
        return {}


def test_three_workers_recover_from_a_killed_worker_a_database_restart_and_a_lost_broker(
    make_settings, tmp_path, private_redis, live_server, start_worker, ham_dir
):
    pg = PrivatePostgres(tmp_path / "pg")
    private_redis.start()
    try:
        settings = make_settings(
            database_url=pg.url, broker_url=private_redis.url, bulk_chunk_size=16, predict_batch_sizes=(1, 16),
            lease_s=6, sweep_interval_s=2, sweep_lost_after_s=5, sweep_queued_after_s=600, visibility_timeout_s=3600,
            api_rate_limit="100000/minute", api_address_rate_limit="100000/minute",
        )  # fmt: skip
        migrate.upgrade(settings.database_url)
        with session_factory(settings.database_url)() as session, session.begin():
            program = get_or_create_program(session, "storm")
            _, token = create_token(session, program.id, "storm")
        web = live_server(settings)
        headers = {"Authorization": f"Bearer {token}"}
        pool = json_records(ham_dir, 500)

        def send(first: int, n: int) -> None:
            for start in range(first, first + n, PER_REQUEST):
                # every study names its lesion (HAM10000's own lesion ids, each sent six times): the
                # workers link visits of the same lesions at once (the deadlock this storm once hit)
                records = [
                    {**pool[i % len(pool)], "external_id": f"storm-{i}", "lesion_id": pool[i % len(pool)]["patient_id"]}
                    for i in range(start, start + PER_REQUEST)
                ]
                reply = requests.post(
                    f"{web.url}/api/v1/batches", json={"records": records}, headers=headers, timeout=120
                )
                assert reply.status_code == 201, reply.text

        workers = [start_worker(settings) for _ in range(3)]
        send(0, 1000)
        wait_for(lambda: counts(settings).get("done", 0) >= 200, 240, message="a fifth of the first studies done")
        workers[0].kill()  # kill -9, mid-batch: its studies are held under a lease nobody renews
        assert counts(settings).get("processing", 0) + counts(settings).get("queued", 0) > 0
        pg.restart()
        send(1000, 1000)  # the web process's pool reconnects by itself
        private_redis.stop()  # the queued messages go with it (no persistence)
        send(2000, 1000)  # accepted and stored while the broker is down: sent later by the sweepers
        time.sleep(30)
        private_redis.start()
        last_fault = time.monotonic()
        wait_for(
            lambda: counts(settings).get("done", 0) + counts(settings).get("failed", 0) == N,
            180, interval=1, message=f"all {N} studies done within 3 minutes of the last fault",
        )  # fmt: skip
        recovered = time.monotonic() - last_fault
        print(f"\nfault storm: {N} studies, every one done {recovered:.0f} s after the last fault (Redis back)")
        final = counts(settings)
        assert final == {"done": N}, final
        with session_factory(settings.database_url)() as session:
            per_study = session.execute(
                select(Prediction.study_id, func.count())
                .where(Prediction.shadow.is_(False))
                .group_by(Prediction.study_id)
            ).all()
        assert len(per_study) == N and {c for _, c in per_study} == {1}  # none lost, none scored twice
        result = CliRunner().invoke(main, ["check", "--json"], env=settings.as_env())
        assert result.exit_code == 0, result.output
    finally:
        engine_for(pg.url).dispose()
        for worker in locals().get("workers", []):
            worker.stop()
        pg.stop()
