"""End-to-end scoring throughput against the raw model.

N studies from ../shared/data/ham10000 go through the real path — PostgreSQL → Redis → a
`dermascan worker` process → PostgreSQL — and, in the same run on the same machine, the bundle's
network runs alone on the same images at the same size and batch size. The ratio of the two is
how close the worker gets to the model's own speed.

    python -m bench.throughput --n 2000 --batch 64            # CPU, TensorFlow
    python -m bench.throughput --n 2000 --embedded             # SQLite + filesystem queue
    python -m bench.throughput --n 2000 --object-store         # images in S3 (moto's server)

With ``--object-store`` the images live in an S3 protocol server instead of the local folder:
the one ``AWS_ENDPOINT_URL`` names (MinIO, with ``AWS_ACCESS_KEY_ID``…), or else moto's
standalone server in this process (the worker reaches it over HTTP as it would MinIO).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from sqlalchemy import func, select

from bench import support
from model.inference.data import size_label


def raw_forward(settings, images: np.ndarray, meta: np.ndarray, seconds: float = 20.0, processes: int = 1):
    """Forward passes per second of the bundle's network on fixed-shape batches (after warm-up),
    loaded exactly as the worker loads it (its runtime, TTA, precision and thread settings), and
    the runtime's name; in ``processes`` processes side by side (as many as the worker has, each
    with the worker's threads), their rates summed."""
    if processes == 1:
        return _raw_one(settings, images, meta, seconds)
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # this process has a runtime's threads already
    ready, out = context.Barrier(processes), context.Queue()
    children = [
        context.Process(target=_raw_child, args=(settings, images, meta, seconds, ready, out)) for _ in range(processes)
    ]
    for child in children:
        child.start()
    rates = [out.get() for _ in children]
    for child in children:
        child.join()
    failed = [r for r in rates if isinstance(r, str)]
    if failed:
        raise RuntimeError(f"the raw network failed in {len(failed)} of {processes} processes: {failed[0]}")
    return sum(rate for rate, _ in rates), rates[0][1]


def _raw_child(settings, images, meta, seconds, ready, out) -> None:
    """One process's rate, or what stopped it (the others then give up at the barrier)."""
    try:
        out.put(_raw_one(settings, images, meta, seconds, ready))
    except BaseException as exc:
        ready.abort()
        out.put(f"{type(exc).__name__}: {exc}")


def _raw_one(settings, images, meta, seconds, ready=None) -> tuple[float, str]:
    import dataclasses

    from worker.runtime import load_predictor

    batch = max(settings.predict_batch_sizes)
    predictor = load_predictor(dataclasses.replace(settings, predict_batch_sizes=(batch,)))
    x_img, x_meta = images[:batch], meta[:batch]
    predictor.predict(x_img, x_meta)  # trace / compile
    if ready is not None:  # the processes start timing together
        ready.wait(timeout=900)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        predictor.predict(x_img, x_meta)
        done += batch
    return done / (time.perf_counter() - start), predictor.runtime


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64, help="model batch size (the worker's largest fixed shape)")
    parser.add_argument("--chunk", type=int, default=None, help="studies per bulk message (default: the batch size)")
    parser.add_argument("--bundle", type=Path, default=support.ROOT / "model" / "bundles" / "default")
    parser.add_argument("--tta", action="store_true", help="test-time augmentation (4 flips) in both measurements")
    parser.add_argument("--mixed-precision", action="store_true", help="bfloat16 compute in both measurements")
    parser.add_argument(
        "--embedded", action="store_true", help="SQLite + filesystem queue instead of PostgreSQL + Redis"
    )
    parser.add_argument(
        "--runtime", choices=("auto", "keras", "onnxruntime"), default="auto",
        help="the worker's forward pass (DERMASCAN_RUNTIME), the raw network's too",
    )  # fmt: skip
    parser.add_argument("--object-store", action="store_true", help="images in S3 (moto's server) instead of a folder")
    parser.add_argument("--concurrency", type=int, default=1, help="worker processes (celery --concurrency)")
    parser.add_argument(
        "--threads", type=int, default=0,
        help="threads of each worker process's forward pass (DERMASCAN_INFERENCE_THREADS; 0: every core)",
    )  # fmt: skip
    parser.add_argument("--keep-log", type=Path, help="copy the worker's log here")
    args = parser.parse_args(argv)
    blob_url = start_object_store() if args.object_store else ""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    from dermascan.infra.db import session_factory
    from dermascan.infra.schema import Study
    from dermascan.intake.submission import submit
    from dermascan.security.identity import get_or_create_program
    from model.inference.bundle import read_manifest
    from tests.helpers import ham_inputs

    manifest = read_manifest(args.bundle)
    size = manifest["image_size"]
    inputs = ham_inputs(support.HAM, args.n)

    # the raw network's inputs: the same images
    from model.inference.data import decode_many
    from model.inference.features import FeatureSpec

    sample = inputs[: args.batch * 2]
    pixels, _ = decode_many([(i, x.image) for i, x in enumerate(sample)], size)
    meta = FeatureSpec.from_dict(manifest["feature_spec"]).transform([x.metadata for x in sample])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.embedded:
            db_url, broker, cleanup = "", "", None
        else:
            cleanup = support.scratch_postgres()
            db_url, broker = cleanup.__enter__(), support.redis_url()
        try:
            settings = support.settings(
                tmp / "data", db_url, broker, args.bundle, tta=args.tta, bulk_chunk_size=args.chunk or args.batch,
                predict_batch_sizes=(1, 8, args.batch), mixed_precision=args.mixed_precision, blob_url=blob_url,
                runtime=args.runtime, inference_threads=args.threads,
            )  # fmt: skip
            # 1. the raw network, alone, loaded as the worker loads it (an ONNX export it needs is made
            # once, in the data directory the worker then uses)
            raw, runtime = raw_forward(settings, pixels, meta, processes=args.concurrency)
            from dermascan.infra import migrate

            migrate.upgrade(settings.database_url)
            factory = session_factory(settings.database_url)
            with factory() as session, session.begin():
                pid = get_or_create_program(session, "bench").id
            # 2. everything queued first, then a warmed-up worker drains it
            t0 = time.perf_counter()
            submit(settings, pid, inputs, source="bench")
            ingest_s = time.perf_counter() - t0
            worker = support.Worker(settings, tmp / "worker.log", concurrency=args.concurrency)
            try:
                worker.wait_ready(900, warm=True)
                started = time.perf_counter()
                while True:
                    with factory() as session:
                        left = session.scalar(
                            select(func.count()).select_from(Study).where(Study.status.in_(["queued", "processing"]))
                        )
                    if left == 0:
                        break
                    time.sleep(0.25)
                wall = time.perf_counter() - started
            finally:
                worker.stop()
                if args.keep_log:  # as bench.latency's
                    import shutil

                    shutil.copy(tmp / "worker.log", args.keep_log)
            with factory() as session:
                first, last, done = session.execute(
                    select(func.min(Study.started_at), func.max(Study.finished_at), func.count()).where(
                        Study.status == "done"
                    )
                ).one()
            scoring_s = (last - first).total_seconds()
            stages = stage_rows(tmp / "worker.log", done, scoring_s, args.concurrency)
            # 3. the raw network again: the host's speed drifts (a neighbour's load), so the ratio is
            # taken against the mean of the runs before and after, and the drift is printed
            raw_after, _ = raw_forward(settings, pixels, meta, processes=args.concurrency)
        finally:
            if cleanup is not None:
                cleanup.__exit__(None, None, None)

    # Predictor.predict runs the 4 flips itself when TTA is on: studies/s either way
    per_study_raw = (raw + raw_after) / 2
    threads = f"{args.threads} thread{'s' if args.threads > 1 else ''}" if args.threads else "every core"
    layout = (
        f"; {args.concurrency} processes side by side, {threads} each"
        if args.concurrency > 1
        else (f"; {threads}" if args.threads else "")
    )
    drift = abs(raw_after - raw) / per_study_raw
    e2e = done / scoring_s
    rows = [
        (
            f"raw network (Predictor.predict, {runtime}, fixed batch{layout}), before / after the end-to-end run",
            size_label(size),
            args.batch,
            f"{raw:.1f} / {raw_after:.1f} studies/s",
        ),
        (
            f"end to end ({'SQLite + filesystem' if args.embedded else 'PostgreSQL + Redis'}"
            f"{' + S3 (moto)' if args.object_store else ''} → worker → DB)",
            size_label(size),
            args.batch,
            f"{e2e:.1f} studies/s",
        ),
        ("ratio end-to-end / raw (the mean of before and after)", "", "", f"{e2e / per_study_raw:.2f}"),
        ("wall time from worker ready to all done", "", "", f"{wall:.1f} s for {done} studies"),
        ("ingest (submit, not part of the ratio)", "", "", f"{args.n / ingest_s:.0f} studies/s"),
    ]
    print(f"throughput benchmark — {support.machine()}")
    print(
        f"bundle {manifest['version']}, TTA {'on (4 flips)' if args.tta else 'off'}, n={args.n}, chunk={args.chunk or args.batch}, worker processes {args.concurrency}, inference threads {args.threads or 'every core'}"
    )
    print(support.table(rows, ("path", "image", "batch", "rate")))
    if drift > 0.10:
        print(f"the host's speed moved by {drift:.0%} between the two raw runs: this run's ratio is unreliable")
    print(
        "\nwhere a study's time goes (the worker's own timings, summed over its tasks; the next piece is read and "
        "decoded in a thread while the network runs, so those overlap the forward pass"
        + (
            f"; {args.concurrency} processes: their seconds summed, shares of the wall time × {args.concurrency})"
            if args.concurrency > 1
            else ")"
        )
    )
    print(support.table(stages, ("stage", "seconds", "ms per study", "share of the scoring wall time")))


STAGE_NAMES = {
    "claim": "claim (leases, one statement per task)", "read": "read the images (object store)",
    "decode": "decode and resize", "wait": "waiting for read + decode (what the forward pass did not hide)",
    "infer": "forward pass and calibration", "checks": "quality checks and the gate",
    "shadow": "shadow bundles", "write": "write results (one transaction per task)",
    "messages": "follow-up messages (heat maps, callbacks, deliveries)",
}  # fmt: skip


def stage_rows(log_path: Path, studies: int, wall: float, processes: int = 1) -> list[tuple]:
    """Per-stage totals from the worker log's task lines (``scored …, failed …, referred … ({timings})``)
    and its heat-map lines, as table rows; with several worker processes the stages are summed over
    them, and shared out of the wall time times their number."""
    import ast
    import re

    totals: dict[str, float] = {}
    heat_n, heat_s, tasks = 0, 0.0, 0
    for line in log_path.read_text(errors="replace").splitlines():
        found = re.search(r"scored \d+, failed \d+, referred \d+ \((\{.*\})\)", line)
        if found:
            tasks += 1
            for stage, seconds in ast.literal_eval(found.group(1)).items():
                if stage != "batch_size":
                    totals[stage] = totals.get(stage, 0.0) + seconds
        sent = re.search(r"follow-up messages \(heat maps, callbacks, deliveries\) sent in ([\d.]+) s", line)
        if sent:
            totals["messages"] = totals.get("messages", 0.0) + float(sent.group(1))
        made = re.search(r"heat maps: (\d+) made in ([\d.]+) s", line)
        if made:
            heat_n, heat_s = heat_n + int(made.group(1)), heat_s + float(made.group(2))
    wall *= processes
    rows = [
        (STAGE_NAMES.get(stage, stage), f"{seconds:.2f}", f"{1000 * seconds / max(studies, 1):.2f}",
         f"{seconds / wall:.0%}" if wall else "")
        for stage, seconds in totals.items()
    ]  # fmt: skip
    # read and decode run in a thread: only the wait for them is on the critical path
    rest = wall - sum(v for k, v in totals.items() if k not in ("read", "decode"))
    rows.append(("the rest (Celery between tasks, the benchmark's 0.25 s polling)", f"{rest:.2f}", f"{1000 * rest / max(studies, 1):.2f}",
                 f"{rest / wall:.0%}" if wall else ""))  # fmt: skip
    own = wall - totals.get("infer", 0.0)  # what the host's speed moves least: all but the network
    rows.append(("the worker's own work (the scoring wall time less the forward pass)", f"{own:.2f}",
                 f"{1000 * own / max(studies, 1):.2f}", f"{own / wall:.0%}" if wall else ""))  # fmt: skip
    rows.append((f"heat maps ({heat_n} referred studies, maintenance queue)", f"{heat_s:.2f}",
                 f"{1000 * heat_s / max(heat_n, 1):.1f} per map", ""))  # fmt: skip
    rows.append((f"{tasks} tasks", "", "", ""))
    return rows


def start_object_store() -> str:
    """The S3 endpoint in AWS_ENDPOINT_URL (e.g. the MinIO of docker-compose.yml) if set, else
    moto's S3 server on a free port; the worker inherits the AWS_* variables; a bucket."""
    import boto3
    from moto.server import ThreadedMotoServer

    if os.environ.get("AWS_ENDPOINT_URL"):
        client = boto3.client("s3")
        if "bench" not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket="bench")
        return "s3://bench/studies"
    port = support.free_port()
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )  # fmt: skip
    boto3.client("s3").create_bucket(Bucket="bench")
    return "s3://bench/studies"


if __name__ == "__main__":
    main()
