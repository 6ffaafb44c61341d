"""Ingest throughput: the REST bulk path (studies/s accepted: parsed, checked, stored, committed
and enqueued) and the C-STORE receiver (instances/s from dcmtk's storescu over one association),
with Orthanc (Debian package) receiving the same files from the same storescu in the same run.

    python -m bench.ingest --rest 2000 --dicom 1120
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from bench import support
from tests.ham_files import ham_images, ham_rows, ham_zip

STORESCU = shutil.which("storescu", path="/usr/bin:/usr/local/bin") or "storescu"


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


def make_dicom_files(folder: Path, n: int) -> list[Path]:
    from tests.dicom_factory import make_instance, write

    rows = ham_rows(support.HAM, n)
    images = ham_images(support.HAM, rows.isic_id)
    sites = ["posterior torso", "anterior torso", "head/neck", "upper extremity", "lower extremity"]
    paths = []
    for i, row in enumerate(rows.itertuples()):
        path = folder / f"{i:05d}.dcm"
        write(make_instance(images[row.isic_id], age=row.age_approx if row.age_approx == row.age_approx else None,
                            sex=row.sex if isinstance(row.sex, str) else None, site=sites[i % len(sites)],
                            patient_id=row.patient_id), path)  # fmt: skip
        paths.append(path)
    return paths


def storescu(port: int, called: str, folder: Path) -> float:
    env = {**os.environ, "TCP_NODELAY": "1"}
    start = time.perf_counter()
    subprocess.run([STORESCU, "-aet", "BENCH", "-aec", called, "-R", "-xy", "+sd", "127.0.0.1", str(port), str(folder)],
                   check=True, env=env, capture_output=True, timeout=3600)  # fmt: skip
    return time.perf_counter() - start


def send_to_scp(command: list[str], port: int, called: str, folder: Path, env: dict | None = None) -> float:
    """Start an SCP process, send the folder with storescu, stop it: seconds storescu took."""
    scp = subprocess.Popen(command, env=env, cwd=support.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)  # fmt: skip
    try:
        wait_port(port)
        return storescu(port, called, folder)
    finally:
        os.killpg(scp.pid, signal.SIGTERM)
        scp.wait(30)


def bench_rest(settings, n: int, workdir: Path) -> dict:
    from dermascan.infra.db import session_factory
    from dermascan.security.accounts import create_token
    from dermascan.security.identity import get_or_create_program

    with session_factory(settings.database_url)() as session, session.begin():
        _, token = create_token(session, get_or_create_program(session, "bench").id, "bench")
    archive, _ = ham_zip(support.HAM, n)
    port = support.free_port()
    env = {**os.environ, **settings.as_env()}
    web = subprocess.Popen([sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "2", "--timeout", "600",
                            "web:create_app()"], env=env, cwd=support.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)  # fmt: skip
    try:
        wait_port(port)
        start = time.perf_counter()
        reply = requests.post(f"http://127.0.0.1:{port}/api/v1/batches", headers={"Authorization": f"Bearer {token}"},
                              files={"archive": ("bench.zip", archive, "application/zip")}, timeout=3600)  # fmt: skip
        seconds = time.perf_counter() - start
        assert reply.status_code == 201, reply.text[:500]
        assert reply.json()["accepted"] == n
    finally:
        os.killpg(web.pid, signal.SIGTERM)
        web.wait(30)
    return {"n": n, "seconds": seconds, "per_s": n / seconds, "zip_mb": len(archive) / 1e6}


def bench_cstore(settings, folder: Path, n: int) -> dict:
    port = support.free_port()
    command = [sys.executable, "-m", "dermascan.cli", "dicom-scp", "--ae-title", "DERMASCAN", "--host", "127.0.0.1",
               "--port", str(port)]  # fmt: skip
    seconds = send_to_scp(command, port, "DERMASCAN", folder, {**os.environ, **settings.as_env()})
    from sqlalchemy import func, select

    from dermascan.infra.db import session_factory
    from dermascan.infra.schema import Study

    with session_factory(settings.database_url)() as session:
        stored = session.scalar(select(func.count()).select_from(Study).where(Study.source == "dicom"))
    assert stored == n, f"{stored} of {n} instances stored"
    return {"n": n, "seconds": seconds, "per_s": n / seconds}


NOOP_SCP = """
import sys
from pynetdicom import evt
from dermascan.intake.dicom_scp import NoDelayServer, make_ae

def store(event):
    event.dataset  # decoded, as a real handler must; nothing stored
    return 0x0000

ae = make_ae("NOOP")
ae.make_server(("127.0.0.1", int(sys.argv[1])), evt_handlers=[(evt.EVT_C_STORE, store)], server_class=NoDelayServer).serve_forever()
"""


def bench_noop_scp(folder: Path, n: int) -> dict:
    """pynetdicom with the same AE set-up and a handler that stores nothing: the ceiling of any
    receiver built on pynetdicom, which our per-instance work (parse, check, store, commit) adds to."""
    port = support.free_port()
    seconds = send_to_scp([sys.executable, "-c", NOOP_SCP, str(port)], port, "NOOP", folder)
    return {"n": n, "seconds": seconds, "per_s": n / seconds}


def bench_orthanc(folder: Path, n: int, workdir: Path) -> dict:
    orthanc = shutil.which("Orthanc", path="/usr/sbin:/usr/bin")
    if not orthanc:
        return {"error": "Orthanc is not installed (Debian package orthanc)"}
    port, http = support.free_port(), support.free_port()
    storage = workdir / "orthanc"
    storage.mkdir()
    config = workdir / "orthanc.json"
    config.write_text(json.dumps({
        "Name": "bench", "StorageDirectory": str(storage), "IndexDirectory": str(storage), "DicomAet": "ORTHANC",
        "DicomPort": port, "HttpPort": http, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True, "Plugins": [], "StorageCompression": False,
    }))  # fmt: skip
    proc = subprocess.Popen([orthanc, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "TCP_NODELAY": "1"})  # fmt: skip
    try:
        wait_port(port)
        wait_port(http)
        seconds = storescu(port, "ORTHANC", folder)
        stats = requests.get(f"http://127.0.0.1:{http}/statistics", timeout=30).json()
        assert stats["CountInstances"] == n, stats
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    return {"n": n, "seconds": seconds, "per_s": n / seconds}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rest", type=int, default=2000, help="studies in the REST bulk upload")
    parser.add_argument("--dicom", type=int, default=1120, help="DICOM instances sent by storescu")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, support.scratch_postgres() as pg:
        tmp = Path(tmp)
        settings = support.settings(
            tmp / "data", pg, support.redis_url(), support.ROOT / "model" / "bundles" / "default"
        )
        folder = tmp / "dicom"
        folder.mkdir()
        files = make_dicom_files(folder, args.dicom)
        size = sum(p.stat().st_size for p in files) / len(files) / 1024
        rest = bench_rest(settings, args.rest, tmp)
        rows.append(
            (
                "REST POST /api/v1/batches (ZIP + CSV)",
                rest["n"],
                f"{rest['seconds']:.1f}",
                f"{rest['per_s']:.0f} studies/s",
            )
        )
        ours = bench_cstore(settings, folder, args.dicom)
        rows.append(
            (
                f"C-STORE → dermascan dicom-scp ({size:.0f} KB instances)",
                ours["n"],
                f"{ours['seconds']:.1f}",
                f"{ours['per_s']:.0f} instances/s",
            )
        )
        ceiling = bench_noop_scp(folder, args.dicom)
        rows.append(
            (
                "C-STORE → pynetdicom SCP storing nothing (ceiling)",
                ceiling["n"],
                f"{ceiling['seconds']:.1f}",
                f"{ceiling['per_s']:.0f} instances/s",
            )
        )
        theirs = bench_orthanc(folder, args.dicom, tmp)
        if "error" in theirs:
            rows.append(("C-STORE → Orthanc", "-", "-", theirs["error"]))
        else:
            rows.append(
                (
                    f"C-STORE → Orthanc {orthanc_version()} (same files, same storescu)",
                    theirs["n"],
                    f"{theirs['seconds']:.1f}",
                    f"{theirs['per_s']:.0f} instances/s",
                )
            )
            rows.append(("ratio dermascan / Orthanc", "", "", f"{ours['per_s'] / theirs['per_s']:.2f}"))
    print(f"ingest benchmark — {support.machine()}")
    print("storescu: dcmtk, one association, TCP_NODELAY=1, JPEG baseline proposed (-R -xy)")
    print(support.table(rows, ("path", "n", "seconds", "rate")))


def orthanc_version() -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "orthanc"], capture_output=True, text=True).stdout
        return out.split("+")[0]
    except OSError:
        return ""


if __name__ == "__main__":
    main()
