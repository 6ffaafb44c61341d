"""A worker's start-up: from the command to "warm: taking work", and to its heat maps being warm.

Each virtual environment given (in the checkout it installs, which is where the worker runs)
starts ``dermascan worker --concurrency 1`` in a fresh embedded
data directory (SQLite, the filesystem queue: no servers) with the bundle that install ships, and
the time is read off the worker's own log lines, with the resident memory of the worker's
processes once it is warm. Compare an install with TensorFlow (the model loaded as Keras, Grad-CAM
traced by TensorFlow) and one without (ONNX Runtime for both):

    python -m bench.startup --venv .venv-plain --venv /path/to/an/older/checkout/.venv --runs 3
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench import support

WARM = "warm: taking work"
HEATMAPS_WARM = "heat maps warm"


def tree(pid: int) -> list[int]:
    """A process and its descendants."""
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        out.append(p)
        try:
            stack += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            continue
    return out


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (MB)."""
    total = 0
    for p in tree(pid):
        try:
            total += next(int(line.split()[1]) for line in Path(f"/proc/{p}/status").read_text().splitlines()
                          if line.startswith("VmRSS:"))  # fmt: skip
        except (OSError, StopIteration):
            continue
    return total / 1024


def maps_tensorflow(pid: int) -> bool:
    """Whether any process of the tree has TensorFlow's library loaded."""
    for p in tree(pid):
        try:
            if "tensorflow" in Path(f"/proc/{p}/maps").read_text():
                return True
        except OSError:
            continue
    return False


def once(venv: Path, timeout: float = 600) -> tuple[float, float, float, bool]:
    """(seconds to warm, seconds to heat maps warm, RSS MB when warm, TensorFlow loaded)."""
    dermascan = venv / "bin" / "dermascan"
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "DERMASCAN_DATA_DIR": tmp, "PYTHONUNBUFFERED": "1"}
        env.pop("DERMASCAN_DATABASE_URL", None)
        env.pop("DERMASCAN_BROKER_URL", None)
        subprocess.run(
            [str(dermascan), "db", "upgrade"], env=env, check=True, capture_output=True, cwd=venv.resolve().parent
        )
        log = Path(tmp) / "worker.log"
        with open(log, "wb") as out:
            started = time.perf_counter()
            proc = subprocess.Popen(
                [str(dermascan), "worker", "--concurrency", "1"], env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=venv.resolve().parent,  # the checkout that venv installs
            )  # fmt: skip
        warm = heat = rss = None
        tensorflow = False
        try:
            while time.perf_counter() - started < timeout:
                text = log.read_text(errors="replace")
                if warm is None and WARM in text:
                    warm, rss = time.perf_counter() - started, rss_mb(proc.pid)
                if heat is None and HEATMAPS_WARM in text:  # before WARM since 2026-12-06, after it before
                    heat = time.perf_counter() - started
                    tensorflow = maps_tensorflow(proc.pid)
                if warm is not None and heat is not None:
                    break
                if proc.poll() is not None or "Grad-CAM warm-up failed" in text:
                    raise RuntimeError(f"the worker exited with {proc.returncode}:\n{text[-3000:]}")
                time.sleep(0.05)
            text = log.read_text(errors="replace")
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        if warm is None or heat is None:
            raise RuntimeError(f"the worker did not get warm within {timeout} s:\n{text[-3000:]}")
        return warm, heat, rss, tensorflow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=Path, action="append", required=True, help="a virtual environment (repeat)")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"worker start-up — {support.machine()}")
    rows = []
    for venv in args.venv:
        runs = [once(venv) for _ in range(args.runs)]
        size = subprocess.run(["du", "-sm", str(venv)], capture_output=True, text=True).stdout.split()[0]
        rows.append((
            str(venv), f"{size} MB", "yes" if runs[0][3] else "no",
            f"{statistics.median(r[0] for r in runs):.1f} s", f"{statistics.median(r[1] for r in runs):.1f} s",
            f"{statistics.median(r[2] for r in runs):.0f} MB",
        ))  # fmt: skip
    header = (
        "environment",
        "size",
        "TensorFlow loaded",
        "to 'warm: taking work'",
        "to heat maps warm",
        "RSS when warm",
    )
    print(f"median of {args.runs} runs each")
    print(support.table(rows, header))


if __name__ == "__main__":
    main()
