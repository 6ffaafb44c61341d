"""What filling a circular field's dark surround costs a worker (model.inference.field): the
milliseconds a study on pieces of 64 HAM10000 images at 128 px, as taken (almost none has a
surround: only the corners are looked at) and with every image given one (each is filled).

    python -m bench.field_fill --data ../shared/data/ham10000 --n 640
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    from model.inference.data import IsicDataset
    from model.inference.field import fill_outside_field
    from model.training.evaluate import shifted

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--n", type=int, default=640)
    parser.add_argument("--piece", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    pixels = IsicDataset.open(args.data, limit=args.n).load_images(128)
    print(f"| images ({len(pixels)}, pieces of {args.piece}) | filled | ms a study (best of {args.repeats}) |")
    print("|---|---|---|")
    for name, images in (("as taken", pixels), ("each with a circular field", shifted(pixels, "field-of-view"))):
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = [fill_outside_field(images[i : i + args.piece]) for i in range(0, len(images), args.piece)]
            best = min(best, time.perf_counter() - start)
        filled = int(sum((a != b).any() for a, b in zip(np.concatenate(out), images, strict=True)))
        print(f"| {name} | {filled} | {1000 * best / len(images):.3f} |")


if __name__ == "__main__":
    main()
