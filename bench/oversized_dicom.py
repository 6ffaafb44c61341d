"""What an oversized DICOM instance costs before it is refused (issue 11's target: a 49 MB
uncompressed instance refused in under 1 s with under 50 MB of extra memory).

A 7,000 × 7,000 8-bit monochrome VL Photographic instance (49 MB of Pixel Data) is sent:
- by C-STORE (pynetdicom) to ``dermascan dicom-scp`` running as its own process: time to the
  refusal, and the receiver's peak resident memory (VmHWM) over its idle baseline;
- as a STOW-RS part to ``dermascan web``'s app in its own process: the same two numbers.

    python -m bench.oversized_dicom
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import requests
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE

from bench import support
from bench.ingest import wait_port
from dermascan.ingest.dicom import VL_PHOTOGRAPHIC
from tests.dicom_factory import monochrome_uncompressed, to_bytes
from tests.ham_files import ham_images, ham_rows

HAM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ham10000"


def instance(side: int = 7000):
    jpeg = next(iter(ham_images(HAM, ham_rows(HAM, 1).isic_id).values()))
    return monochrome_uncompressed(jpeg, side, side)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ds = instance()
    part10 = to_bytes(ds)
    work = Path(tempfile.mkdtemp(prefix="dermascan-bench-oversized-"))
    env = {**os.environ, "DERMASCAN_DATA_DIR": str(work), "PYTHONUNBUFFERED": "1"}
    subprocess.run([sys.executable, "-m", "dermascan.cli", "db", "upgrade"], env=env, check=True, capture_output=True)
    rows = []

    port = support.free_port()
    scp = subprocess.Popen(
        [sys.executable, "-m", "dermascan.cli", "dicom-scp", "--host", "127.0.0.1", "--port", str(port), "--allow-any"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_port(port)
        time.sleep(1)
        base = peak_rss_mb(scp.pid)
        ae = AE(ae_title="BENCH")
        ae.add_requested_context(VL_PHOTOGRAPHIC, [ExplicitVRLittleEndian])
        assoc = ae.associate("127.0.0.1", port, ae_title="DERMASCAN")
        t0 = time.perf_counter()
        status = assoc.send_c_store(ds)
        elapsed = time.perf_counter() - t0
        outcome = f"0x{status.Status:04X}" if "Status" in status else "association aborted"
        if assoc.is_established:
            assoc.release()
        time.sleep(0.5)
        rows.append(
            ("C-STORE", f"{len(part10) / 1e6:.1f}", outcome, f"{elapsed:.2f}", f"{peak_rss_mb(scp.pid) - base:.0f}")
        )
    finally:
        scp.terminate()
        scp.wait(10)

    port = support.free_port()
    code = textwrap.dedent(f"""
        from dermascan.security.accounts import create_token
        from dermascan.config import Settings
        from dermascan.infra.db import session_factory
        from dermascan.security.identity import get_or_create_program
        from web import create_app
        settings = Settings.from_env()
        with session_factory(settings.database_url)() as s, s.begin():
            _, plain = create_token(s, get_or_create_program(s, "bench").id, "bench")
        open({str(work / "token")!r}, "w").write(plain)
        create_app(settings).run("127.0.0.1", {port}, threaded=True)
    """)
    web = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        time.sleep(1)
        token = (work / "token").read_text()
        base = peak_rss_mb(web.pid)
        body = b"--b\r\nContent-Type: application/dicom\r\n\r\n" + part10 + b"\r\n--b--\r\n"
        t0 = time.perf_counter()
        reply = requests.post(
            f"http://127.0.0.1:{port}/dicomweb/studies",
            data=body,
            headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": 'multipart/related; type="application/dicom"; boundary=b',
            },
            timeout=120,
        )
        elapsed = time.perf_counter() - t0
        failed = reply.json().get("00081198", {}).get("Value", [{}])[0]
        outcome = f"{reply.status_code}, 0x{failed.get('00081197', {}).get('Value', [0])[0]:04X}"
        rows.append(
            ("STOW-RS", f"{len(part10) / 1e6:.1f}", outcome, f"{elapsed:.2f}", f"{peak_rss_mb(web.pid) - base:.0f}")
        )
    finally:
        web.terminate()
        web.wait(10)
    print(f"# oversized DICOM instance (7000 x 7000, 8-bit, uncompressed) — {support.machine()}")
    print(support.table(rows, ("door", "instance MB", "answer", "seconds to refusal", "extra peak memory MB")))


if __name__ == "__main__":
    main()
