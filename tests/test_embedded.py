"""The embedded default: SQLite + kombu's filesystem transport + a worker subprocess, driven
through the CLI as a newcomer would, and `dermascan demo --once` with the bundled model."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, wait_for

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
    assert settings.database_url.startswith("sqlite:///") and settings.broker_url == "filesystem://"
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
