"""The worker's two database steps, alone: claiming a piece of studies under a lease and writing
its results (``results.claim``, ``results.record``), on a scratch PostgreSQL database.

N HAM10000 studies (their lesion ids kept, so the follow-up comparison runs as it does for a
sender that names lesions) are stored, then claimed and written a piece at a time with made-up
scores (a tenth of them referred), as a worker does; the table gives the milliseconds a study and
the statements a piece of each step, best of ``--rounds`` rounds on fresh studies. With
``PYTHONPATH`` set to another checkout, the same script measures that checkout's code.

    python -m bench.result_write --n 1280 --piece 64 --rounds 3
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from sqlalchemy import event, select


def main(argv=None) -> None:
    from bench import support
    from dermascan.infra import migrate
    from dermascan.infra.db import session_factory
    from dermascan.infra.schema import Study
    from dermascan.intake.submission import SubmitStudies
    from dermascan.screening import results
    from dermascan.security.identity import get_or_create_program
    from tests.helpers import ham_inputs
    from worker.runtime import register_bundle

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1280, help="studies a round")
    parser.add_argument("--piece", type=int, default=64, help="studies a piece (the worker's batch)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    inputs = ham_inputs(support.HAM, args.n)
    rng = random.Random(0)
    best = {"claim": float("inf"), "record": float("inf")}
    statements = {"claim": 0, "record": 0}
    with tempfile.TemporaryDirectory() as tmp, support.scratch_postgres() as db_url:
        settings = support.settings(Path(tmp) / "data", db_url, "", support.ROOT / "model" / "bundles" / "default")
        migrate.upgrade(db_url)
        factory = session_factory(db_url)
        with factory() as session, session.begin():
            program_id = get_or_create_program(session, "bench").id
            version = register_bundle(settings, session).version
        counting = {"n": 0}

        @event.listens_for(factory.kw["bind"], "before_cursor_execute")
        def _count(*_):
            counting["n"] += 1

        for round_ in range(args.rounds):
            with factory() as session, session.begin():  # fresh studies each round (no idempotency hits)
                SubmitStudies(settings, program_id, inputs, source=f"bench-{round_}").run(session)
            with factory() as session:
                ids = sorted(session.scalars(select(Study.id).where(Study.status == "queued")))
            spent = {"claim": 0.0, "record": 0.0}
            counted = {"claim": 0, "record": 0}
            for start in range(0, len(ids), args.piece):
                piece = ids[start : start + args.piece]
                scored = [
                    results.ScoredStudy(
                        i, rng.random() * 0.11, 0.01, True, None, rng.random() * 3,
                        {"brightness": 0.5, "contrast": 0.2, "sharpness": 0.1, "min_side": 450},
                        [rng.gauss(0, 1) for _ in range(32)], [], [rng.random() / 7 for _ in range(7)],
                    )
                    for i in piece
                ]  # fmt: skip
                for step in ("claim", "record"):
                    counting["n"] = 0
                    t0 = time.perf_counter()
                    with factory() as session, session.begin():
                        if step == "claim":
                            results.claim(session, piece, "bench", 60)
                        else:
                            results.record(session, version, 0.1, scored, [], "bench")
                    spent[step] += time.perf_counter() - t0
                    counted[step] += counting["n"]
            pieces = -(-len(ids) // args.piece)
            for step in best:
                best[step] = min(best[step], spent[step] / len(ids))
                statements[step] = counted[step] / pieces
    rows = [(step, f"{best[step] * 1000:.3f}", f"{statements[step]:.1f}") for step in ("claim", "record")]
    print(f"result write — {support.machine()}; n={args.n} a round, pieces of {args.piece}, best of {args.rounds}")
    print(support.table(rows, ("step", "ms per study", "statements a piece")))


if __name__ == "__main__":
    main()
