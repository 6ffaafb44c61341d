"""The cost as work grows: every stage at 1k, 10k and 50k studies, per study, on one PostgreSQL, one
Redis and one blob folder (a fresh database for each size).

Stages: ingest through the REST API (JSON records, 500 a request, gunicorn with 2 workers; every
image made unique, so the blob store holds one file per study); database rows and bytes per study;
a sweeper pass with every study queued and its message in the broker (the comparison of the two);
writing the results (the screening room's own writes, without the model: 40 % referred, so 50k
studies leave 20,000 open referrals); the batch page and the referral queue page; the whole-batch
exports (CSV, JSON, FHIR, streamed) with the web worker's peak memory; a sweeper pass with every
study done. The model's own cost is linear by construction: it is measured once, at the first
size, by a real worker scoring half of them (1,000 at most) with the shipped bundle, and held aside.

    python -m bench.scale --sizes 1000,10000,50000
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

from bench import support

STAGES = [
    ("ingest (REST API)", "ms/study"),
    ("database rows", "rows/study"),
    ("database bytes", "kB/study"),
    ("sweep, all queued", "µs/study"),
    ("write results", "µs/study"),
    ("batch page", "ms"),
    ("referral queue page", "ms"),
    ("export CSV", "µs/study"),
    ("export JSON", "µs/study"),
    ("export FHIR", "µs/study"),
    ("export peak memory", "MB"),
    ("sweep, all done", "µs/study"),
]


def unique_jpeg(jpeg: bytes, i: int) -> bytes:
    """The same picture with a JPEG comment segment naming ``i``: a different file (sha256)."""
    note = f"dermascan-bench-{i}".encode()
    return jpeg[:2] + b"\xff\xfe" + (len(note) + 2).to_bytes(2, "big") + note + jpeg[2:]


def wait_port(port: int, timeout: float = 60) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on {port}")


def peak_rss_mb(pids: list[int]) -> float:
    best = 0.0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        found = re.search(r"VmHWM:\s+(\d+) kB", text)
        best = max(best, int(found.group(1)) / 1024 if found else 0.0)
    return best


def reset_peaks(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM (Linux)


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def login(session: requests.Session, base: str, user: str, password: str) -> None:
    page = session.get(f"{base}/login").text
    token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page).group(1)
    reply = session.post(f"{base}/login", data={"username": user, "password": password, "csrf_token": token})
    reply.raise_for_status()


def run_size(n: int, records: list[dict], measure_model: bool) -> dict:
    from sqlalchemy import select, text, update

    from dermascan.infra.db import session_factory
    from dermascan.infra.schema import ModelBundle, Study, StudyStatus
    from dermascan.screening import results
    from dermascan.security.accounts import create_token, create_user
    from dermascan.security.identity import get_or_create_program
    from dermascan.upkeep.sweeper import sweep

    out: dict = {}
    with support.scratch_postgres() as url, tempfile.TemporaryDirectory() as tmp:
        settings = support.settings(
            Path(tmp), url, support.redis_url(), support.ROOT / "model" / "bundles" / "default",
            api_rate_limit="1000000 per minute", api_address_rate_limit="1000000 per minute", tta=None,
        )  # fmt: skip
        factory = session_factory(url)
        with factory() as session, session.begin():
            program = get_or_create_program(session, "scale")
            _, token = create_token(session, program.id, "scale")
            create_user(session, "scale-specialist", "scale-password-123", "specialist", program.id)
            create_user(session, "scale-admin", "scale-password-123", "admin", program.id)
        port = support.free_port()
        env = {**settings.as_env(), "PATH": "/usr/bin:/bin"}
        web = subprocess.Popen(
            [sys.executable, "-m", "dermascan.cli", "web", "--port", str(port), "--workers", "2"],
            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        try:
            wait_port(port)
            base, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {token}"}
            # 1. ingest
            t0, batch_ids = time.perf_counter(), []
            for start in range(0, n, 500):
                chunk = [
                    {**records[i % len(records)], "external_id": f"s{i}",
                     "image_base64": records[i % len(records)]["_unique"](i)}
                    for i in range(start, min(n, start + 500))
                ]  # fmt: skip
                for record in chunk:
                    record.pop("_unique", None)
                reply = requests.post(f"{base}/api/v1/batches", json={"records": chunk}, headers=headers, timeout=600)
                reply.raise_for_status()
                batch_ids.append(reply.json()["batch_id"])
            out["ingest (REST API)"] = (time.perf_counter() - t0) / n * 1000
            # 2. the database
            with factory() as session:
                tables = ["studies", "batches", "audit_events", "predictions", "referrals"]
                rows = sum(session.scalar(text(f"SELECT count(*) FROM {t}")) for t in tables)
                size = sum(session.scalar(text(f"SELECT pg_total_relation_size('{t}')")) for t in tables)
            # 3. a sweep with the whole backlog queued in the broker
            t0 = time.perf_counter()
            swept = sweep(settings)
            out["sweep, all queued"] = (time.perf_counter() - t0) / n * 1e6
            assert swept["sent"] == 0, swept
            # 4. the model, once: a real worker scores 1,000 of them
            if measure_model:
                # half of the first size at most, so that the results written below are measured too
                out["model"] = score_with_worker(settings, min(n // 2, 1000))
                with factory() as session, session.begin():  # the stopped worker's leases: over
                    session.execute(
                        update(Study).where(Study.status == StudyStatus.PROCESSING).values(lease_until=None)
                    )
            # 5. the results, written as a worker writes them (40 % referred)
            rng = np.random.default_rng(0)
            with factory() as session:
                pending = list(
                    session.scalars(select(Study.id).where(Study.status != StudyStatus.DONE).order_by(Study.id))
                )
            with factory() as session, session.begin():  # the stand-in bundle the results name
                if session.get(ModelBundle, "bench") is None:
                    session.add(ModelBundle(version="bench", sha256="bench", path="", manifest={}, threshold=0.6))
            t0 = time.perf_counter()
            for start in range(0, len(pending), 64):
                ids = pending[start : start + 64]
                scored = [results.ScoredStudy(i, float(p)) for i, p in zip(ids, rng.random(len(ids)), strict=True)]
                with factory() as session, session.begin():
                    results.claim(session, ids, "bench", 60)
                    results.record(session, "bench", 0.6, scored, owner="bench")
            out["write results"] = (time.perf_counter() - t0) / max(len(pending), 1) * 1e6
            with factory() as session:
                rows = sum(session.scalar(text(f"SELECT count(*) FROM {t}")) for t in tables)
                size = sum(session.scalar(text(f"SELECT pg_total_relation_size('{t}')")) for t in tables)
            out["database rows"], out["database bytes"] = rows / n, size / n / 1024
            # 6. pages
            browser = requests.Session()
            login(browser, base, "scale-admin", "scale-password-123")
            t0 = time.perf_counter()
            browser.get(f"{base}/batches/{batch_ids[-1]}").raise_for_status()
            out["batch page"] = (time.perf_counter() - t0) * 1000
            specialist = requests.Session()
            login(specialist, base, "scale-specialist", "scale-password-123")
            t0 = time.perf_counter()
            specialist.get(f"{base}/referrals/").raise_for_status()
            out["referral queue page"] = (time.perf_counter() - t0) * 1000
            # 7. the exports of the whole work (every batch), streamed
            workers = children(web.pid)
            reset_peaks(workers)
            for fmt in ("csv", "json", "fhir"):
                t0 = time.perf_counter()
                for batch_id in batch_ids:
                    with requests.get(f"{base}/api/v1/batches/{batch_id}/export?format={fmt}", headers=headers,
                                      stream=True, timeout=600) as reply:  # fmt: skip
                        reply.raise_for_status()
                        for _ in reply.iter_content(1 << 16):
                            pass
                out[f"export {fmt.upper()}"] = (time.perf_counter() - t0) / n * 1e6
            out["export peak memory"] = peak_rss_mb(workers)
            # 8. a sweep with everything done
            t0 = time.perf_counter()
            sweep(settings)
            out["sweep, all done"] = (time.perf_counter() - t0) / n * 1e6
        finally:
            web.send_signal(signal.SIGTERM)
            web.wait(30)
    return out


def score_with_worker(settings, n: int) -> float:
    """ms per study for a real worker (the shipped bundle, its TTA setting) scoring ``n`` of the
    queued studies — the model's own cost."""
    from sqlalchemy import func, select

    from dermascan.infra.db import session_factory
    from dermascan.infra.schema import Study, StudyStatus

    factory = session_factory(settings.database_url)
    log = Path(settings.data_dir) / "worker.log"
    worker = support.Worker(settings, log)
    worker.wait_ready(600, warm=True)
    try:
        t0, start = time.perf_counter(), None
        while True:
            with factory() as session:
                done = session.scalar(select(func.count()).select_from(Study).where(Study.status == StudyStatus.DONE))
            if done and start is None:
                start = time.perf_counter()
            if done >= n:
                return (time.perf_counter() - (start or t0)) / done * 1000
            time.sleep(0.5)
    finally:
        worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,50000")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    import base64

    from tests.ham_files import json_records

    records = json_records(support.HAM, 500)
    for record in records:
        jpeg = base64.b64decode(record["image_base64"])
        record["_unique"] = lambda i, jpeg=jpeg: base64.b64encode(unique_jpeg(jpeg, i)).decode()
    measured = {}
    for k, n in enumerate(sizes):
        print(f"-- {n:,} studies", flush=True)
        measured[n] = run_size(n, [dict(r) for r in records], measure_model=k == 0)
    first, last = sizes[0], sizes[-1]
    rows = []
    for stage, unit in STAGES:
        values = [measured[n].get(stage) for n in sizes]
        ratio = values[-1] / values[0] if values[0] else float("nan")
        per_study = unit.endswith("/study")
        rows.append((stage, unit, *(f"{v:,.2f}" for v in values), f"{ratio:.2f}×" if per_study else "—"))
    print(f"\ncost as work grows — {support.machine()}")
    print(support.table(rows, ("stage", "unit", *(f"{n:,}" for n in sizes), f"{last:,} / {first:,}")))
    if "model" in measured[first]:
        print(f"\nthe model (held aside, linear by construction): {measured[first]['model']:.1f} ms a study "
              f"(a real worker, the shipped bundle, {min(first // 2, 1000):,} studies)")  # fmt: skip


if __name__ == "__main__":
    main()
