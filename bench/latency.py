"""Latency of single interactive studies, from submit to stored result: at idle, and while a
large bulk batch is being scored (PostgreSQL + Redis + one CPU worker).

    python -m bench.latency --singles 40 --bulk 10000
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from sqlalchemy import func, select

from bench import support
from model.inference.data import size_label


def percentile(values, q):
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--singles", type=int, default=40, help="interactive studies per phase")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between interactive studies")
    parser.add_argument("--bulk", type=int, default=10000, help="studies in the bulk batch")
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--bundle", type=Path, default=support.ROOT / "model" / "bundles" / "default")
    parser.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="flips on or off (default: as the bundle's manifest recommends)",
    )
    parser.add_argument("--concurrency", type=int, default=1, help="worker processes (celery --concurrency)")
    parser.add_argument(
        "--threads", type=int, default=0,
        help="threads of each worker process's forward pass (DERMASCAN_INFERENCE_THREADS; 0: every core)",
    )  # fmt: skip
    parser.add_argument("--keep-log", type=Path, help="copy the worker's log here")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from dermascan.infra.db import session_factory
    from dermascan.infra.schema import Study
    from dermascan.intake.submission import submit
    from dermascan.security.identity import get_or_create_program
    from model.inference.bundle import read_manifest
    from tests.helpers import ham_inputs

    manifest = read_manifest(args.bundle)
    pool = ham_inputs(support.HAM, 7510)
    singles = pool[: args.singles * 2]
    bulk_inputs = [pool[i % len(pool)] for i in range(args.bulk)]  # repeats are separate studies (no keys)

    with tempfile.TemporaryDirectory() as tmp, support.scratch_postgres() as pg:
        tmp = Path(tmp)
        settings = support.settings(
            tmp / "data",
            pg,
            support.redis_url(),
            args.bundle,
            tta=args.tta,
            bulk_chunk_size=args.chunk,
            inference_threads=args.threads,
        )
        factory = session_factory(settings.database_url)
        with factory() as session, session.begin():
            pid = get_or_create_program(session, "bench").id
        worker = support.Worker(settings, tmp / "worker.log", concurrency=args.concurrency)
        worker.wait_ready(900, warm=True)

        def send_singles(items) -> list[int]:
            ids = []
            for item in items:
                ids += submit(settings, pid, [item], source="bench", interactive=True, batch=False).new_study_ids
                time.sleep(args.interval)
            return ids

        def latencies(ids) -> list[float]:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                with factory() as session:
                    rows = session.execute(select(Study.created_at, Study.finished_at).where(Study.id.in_(ids))).all()
                if all(f is not None for _, f in rows):
                    return [(f - c).total_seconds() for c, f in rows]
                time.sleep(0.5)
            raise RuntimeError("interactive studies not finished")

        try:
            idle = latencies(send_singles(singles[: args.singles]))
            # the bulk batch goes in (its own thread: a big upload), interactive studies keep coming
            bulk_done = threading.Event()
            bulk_result = {}

            def send_bulk():
                bulk_result["r"] = submit(settings, pid, bulk_inputs, source="bench", label="bulk")
                bulk_done.set()

            threading.Thread(target=send_bulk, daemon=True).start()
            bulk_done.wait()
            time.sleep(3)
            under_ids = send_singles(singles[args.singles :])
            with factory() as session:
                left = session.scalar(
                    select(func.count())
                    .select_from(Study)
                    .where(Study.batch_id == bulk_result["r"].batch_id, Study.status.in_(["queued", "processing"]))
                )
            under = latencies(under_ids)
        finally:
            worker.stop()
            if args.keep_log:
                shutil.copy(tmp / "worker.log", args.keep_log)

    rows = [
        ("idle", len(idle), f"{percentile(idle, 50):.2f}", f"{percentile(idle, 95):.2f}", f"{max(idle):.2f}"),
        (
            f"while a {args.bulk:,}-study bulk batch runs",
            len(under),
            f"{percentile(under, 50):.2f}",
            f"{percentile(under, 95):.2f}",
            f"{max(under):.2f}",
        ),
    ]
    print(f"latency benchmark — {support.machine()}")
    print(f"bundle {manifest['version']} ({size_label(manifest['image_size'])}), TTA {'on' if (args.tta if args.tta is not None else manifest.get('inference', {}).get('tta')) else 'off'}, bulk chunk {args.chunk}, "
          f"one interactive study every {args.interval:g} s; {left:,} bulk studies were still waiting when the last interactive one was sent; "
          f"worker processes {args.concurrency}, inference threads {args.threads or 'every core'}")  # fmt: skip
    print(support.table(rows, ("phase", "studies", "p50 s", "p95 s", "max s")))


if __name__ == "__main__":
    main()
