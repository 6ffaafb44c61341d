"""The CPU image's size: the project's ``Dockerfile`` built at one or more commits, side by side.

Each commit is exported (``git archive``) into a scratch folder and built with the local Docker
daemon; the table gives the image's size, its base image's, the ``pip install .`` layer's, whether
TensorFlow or Keras is installed in it, and (``--demo``) what ``dermascan demo --once`` prints in the
image with no network: the examples scored, and a heat map for every referred one.

    python -m bench.image_size 153256c HEAD --demo

The base image (``FROM python:3.11-slim-bookworm``) comes from the daemon's own store when it has
it (``docker build`` pulls only what is missing): on a machine without a registry, put a stand-in
there under that name first (docs/benchmarks.md says how) and read the layers above it.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from pathlib import Path

from bench import support

PROBE = "import importlib.util as u; print(' '.join(n for n in ('tensorflow', 'keras') if u.find_spec(n)) or 'neither')"


def docker(*args: str, timeout: float = 1800) -> str:
    try:
        done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise SystemExit("docker: not installed (the benchmark builds with the local Docker daemon)") from None
    if done.returncode:
        raise SystemExit(f"docker {' '.join(args[:2])}: {done.stderr.strip()[-2000:]}")
    return done.stdout


def build(revision: str, dockerfile: str) -> str:
    """The image of ``revision`` (a tag named after its commit)."""
    commit = subprocess.run(["git", "rev-parse", "--short", revision], cwd=support.ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()  # fmt: skip
    tag = f"dermascan-image-size:{commit}"
    with tempfile.TemporaryDirectory() as context:
        archive = subprocess.run(["git", "archive", commit], cwd=support.ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", context], input=archive, check=True)
        docker("build", "--network", "host", "-f", str(Path(context) / dockerfile), "-t", tag, context)
    return tag


def demo_rows(out: str) -> list[dict]:
    """The rows of the table ``dermascan demo --once`` prints, by its header's columns."""
    lines = out.splitlines()
    rule = next((i for i, line in enumerate(lines) if line.startswith("---")), None)
    if not rule:
        raise SystemExit(f"dermascan demo --once printed no table:\n{out[-2000:]}")
    header = lines[rule - 1]
    starts = [m.start() for m in re.finditer(r"(?<!\S)\S+(?: \S+)*", header)]
    ends = [*starts[1:], None]
    names = [header[a:b].strip() for a, b in zip(starts, ends, strict=True)]
    rows = []
    for line in lines[rule + 1 :]:
        if not line.strip():
            break
        rows.append({name: line[a:b].strip() for name, a, b in zip(names, starts, ends, strict=True)})
    return rows


def megabytes(n: int | str) -> str:
    return f"{int(n) / 1e6:,.0f} MB"


def measure(tag: str, dockerfile_text: str, demo: bool) -> dict:
    base = re.search(r"^FROM\s+(\S+)", dockerfile_text, re.MULTILINE).group(1)
    layers = [line.split("\t", 1) for line in docker("history", "--human=false", "--no-trunc", "--format",
                                                       "{{.Size}}\t{{.CreatedBy}}", tag).splitlines()]  # fmt: skip
    row = {
        "size": int(docker("image", "inspect", "-f", "{{.Size}}", tag)),
        "base": int(docker("image", "inspect", "-f", "{{.Size}}", base)),
        "pip": sum(int(size) for size, made_by in layers if "pip install" in made_by),
        "installed": docker("run", "--rm", "--network", "none", "--entrypoint", "python", tag, "-c", PROBE).strip(),
    }
    if demo:
        out = docker("run", "--rm", "--network", "none", "-e", "DERMASCAN_DATA_DIR=/tmp/demo", "-w", "/tmp",
                     "--entrypoint", "dermascan", tag, "demo", "--once", timeout=600)  # fmt: skip
        rows = demo_rows(out)
        referred = [r for r in rows if r["referred"] == "YES"]
        row["demo"] = (f"{sum(r['status'] == 'done' for r in rows)} of {len(rows)} scored, "
                       f"{sum(r['heat map'] == 'yes' for r in referred)} of {len(referred)} referred with a heat map")  # fmt: skip
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revisions", nargs="*", default=["HEAD"], help="commits to build (default: HEAD)")
    parser.add_argument("--dockerfile", default="Dockerfile", help="the Dockerfile, relative to the checkout")
    parser.add_argument("--demo", action="store_true", help="run 'dermascan demo --once' in each image, offline")
    args = parser.parse_args()
    print(f"container image size — {support.machine()}")
    rows = []
    for revision in args.revisions:
        tag = build(revision, args.dockerfile)
        text = subprocess.run(["git", "show", f"{revision}:{args.dockerfile}"], cwd=support.ROOT, capture_output=True,
                              text=True, check=True).stdout  # fmt: skip
        r = measure(tag, text, args.demo)
        rows.append((revision, tag.split(":")[1], megabytes(r["size"]), megabytes(r["base"]), megabytes(r["pip"]),
                     r["installed"], r.get("demo", "")))  # fmt: skip
    header = ("revision", "commit", "image", "of it: base image", "of it: pip install .", "TensorFlow / Keras",
              "dermascan demo --once, offline")  # fmt: skip
    print(support.table(rows, header))


if __name__ == "__main__":
    main()
