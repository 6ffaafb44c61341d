"""The embedded default: SQLite + kombu's filesystem transport + a worker subprocess, driven
through the CLI as a newcomer would, and `dermascan demo --once` with the bundled model."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import ROOT, wait_for

pytestmark = pytest.mark.slow  # runs the real CLI, the demo and worker processes

EXAMPLES = ROOT / "dermascan" / "examples"


def cli(env: dict, *args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dermascan.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


def test_submit_and_results_on_the_embedded_default(make_settings, start_worker, ham_dir, tmp_path):
    settings = make_settings()  # no database or broker URL: SQLite and the filesystem queue
    assert settings.database_url.startswith("sqlite:///") and settings.broker_url == "filesystem://localhost/"
    env = {
        **os.environ,
        **{k: v for k, v in settings.as_env().items() if k not in ("DERMASCAN_DATABASE_URL", "DERMASCAN_BROKER_URL")},
    }
    submitted = cli(env, "submit", str(ham_dir), "--limit", "6", "--label", "embedded")
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.strip().splitlines()[-1]
    assert "6 accepted" in submitted.stderr
    start_worker(settings)

    def finished():
        done = cli(env, "results", batch_id, "--format", "json")
        body = json.loads(done.stdout)
        return body if body["batch"]["state"] == "complete" else None

    body = wait_for(finished, 180, interval=1, message="embedded batch scored")
    assert [r["status"] for r in body["results"]] == ["done"] * 6
    exported = cli(env, "results", batch_id, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(exported.stdout)))
    assert len(rows) == 6 and all(
        0 <= float(r["probability"]) <= 1 and r["bundle_version"] == "tiny-test" for r in rows
    )
    assert Path(settings.data_dir / "dermascan.sqlite").exists()
    # the queue's control files (the worker's pidbox) live in the data directory, not in the cwd
    assert "celery.pidbox.exchange" in {p.name for p in (settings.queue_dir / "control").iterdir()}


def test_demo_once_prints_scores_for_the_examples(tmp_path):
    """As on a fresh clone: nothing configured but a data directory; the bundled model."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DERMASCAN_")}
    env["DERMASCAN_DATA_DIR"] = str(tmp_path / "var")
    done = cli(env, "demo", "--once", timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.strip().startswith(tuple("123456789"))]
    ids = {p.stem for p in EXAMPLES.glob("*.jpg")}
    scored = [line.split() for line in lines if line.split()[1] in ids]
    assert len(scored) == len(ids) == 8
    assert all(row[2] == "done" and 0 <= float(row[3]) <= 1 and row[4] in ("YES", "no") for row in scored)
    assert "referral threshold" in done.stdout
    # the shipped bundle's differential: each example's most likely diagnosis and its probability
    suspected = re.compile(r"\b(mel|nv|bcc|akiec|bkl|df|vasc) (0\.\d\d|1\.00)\b")
    assert "suspected" in done.stdout and all(suspected.search(line) for line in lines if line.split()[1] in ids)


def processes_with(variable: str) -> set[int]:
    """Live processes whose environment holds ``variable`` (NAME=value)."""
    found = set()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if variable.encode() in environ.read_bytes().split(b"\0"):
                found.add(int(environ.parent.name))
        except OSError:
            continue
    return found


def test_demo_serves_metrics_and_stops_everything_on_sigterm(tmp_path):
    """`dermascan demo` as a newcomer runs it: the portal's metrics page reads the demo's worker;
    a SIGTERM (kill, timeout, a supervisor) stops the portal and the worker as Ctrl-C does."""
    import re
    import signal
    import socket

    import requests

    from tests.services import free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DERMASCAN_")}
    env["DERMASCAN_DATA_DIR"] = str(tmp_path / "var")
    marker = f"DERMASCAN_DATA_DIR={tmp_path / 'var'}"
    log = tmp_path / "demo.log"
    with log.open("w") as out:
        demo = subprocess.Popen(
            [sys.executable, "-m", "dermascan.cli", "demo", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, text=True,
        )  # fmt: skip
    try:
        text = wait_for(lambda: "login:  admin / " in log.read_text() and log.read_text(), 900, interval=1,
                        message="the demo's portal")  # fmt: skip
        password = re.search(r"login:  admin / (\S+)", text).group(1)
        base, session = f"http://127.0.0.1:{port}", requests.Session()

        def login_page():
            try:
                return session.get(f"{base}/login", timeout=5).text
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or still booting
                return None

        csrf = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', wait_for(login_page, 60)).group(1)
        session.post(f"{base}/login", data={"username": "admin", "password": password, "csrf_token": csrf}, timeout=30)
        html = session.get(f"{base}/admin/metrics", timeout=30).text
        assert "No worker metrics URL" not in html and "dermascan_studies_scored_total" in html
        assert 'id="depth-bulk">0<' in html
        started = processes_with(marker) - {demo.pid}
        assert len(started) >= 2  # the portal and the worker (and their children)
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=60) == 0
    finally:
        if demo.poll() is None:
            demo.kill()
    wait_for(lambda: not processes_with(marker), 30, message="every process the demo started to stop")
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0  # nothing serves the portal's port any more
