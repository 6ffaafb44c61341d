"""Raw forward speed of bundles (the predictor alone, fixed batch, no flips), to compare input
sizes and ensemble sizes: images per second, and per member.

    python -m bench.member_speed model/bundles/default /path/to/another/bundle
"""

from __future__ import annotations

import sys
import time

import numpy as np

from bench import support
from model.inference.data import size_label


def speed(path: str, batch: int = 64, seconds: float = 20.0) -> tuple[int | list[int], int, float]:
    from model.inference.predictor import Predictor

    predictor = Predictor(path, batch_sizes=(batch,), tta=False)
    size = predictor.image_size
    members = len(predictor.bundle.manifest.get("training", {}).get("members", []) or []) or 1
    pixels = (np.random.default_rng(0).random((batch, *predictor.image_shape, 3)) * 255).astype("float32")
    meta = np.zeros((batch, predictor.spec.dim), "float32")
    predictor.predict(pixels, meta)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        predictor.predict(pixels, meta)
        done += batch
    return size, members, done / (time.perf_counter() - start)


def main(paths: list[str]) -> None:
    rows = []
    for path in paths:
        size, members, rate = speed(path)
        rows.append((path, size_label(size), members, f"{rate:.1f}", f"{rate * members:.0f}"))
    print(f"raw forward speed (batch 64, no flips) — {support.machine()}")
    print(support.table(rows, ("bundle", "input", "members", "images/s", "member-images/s")))


if __name__ == "__main__":
    main(sys.argv[1:] or [str(support.ROOT / "model" / "bundles" / "default")])
