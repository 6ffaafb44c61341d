"""What a bundle's steps between decoding and the network cost a worker: the circular field's fill
(model.inference.field) and the camera clamp (model.inference.camera), in milliseconds a study on
pieces of 64 HAM10000 images at 128 px — as taken (the fill looks at the corners only; the clamp
measures every image and moves those outside its ranges), with every image given a circular field
(each is filled), and darker by 20 % (the clamp moves most of them).

    python -m bench.preprocessing --data ../shared/data/ham10000 --n 640 [--bundle model/bundles/default]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    from model.inference import camera, field
    from model.inference.data import IsicDataset
    from model.training.evaluate import shifted

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--bundle", default="model/bundles/default", help="Its manifest's camera ranges.")
    parser.add_argument("--n", type=int, default=640)
    parser.add_argument("--piece", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    manifest = json.loads((Path(args.bundle) / "manifest.json").read_text())
    clamp = camera.for_manifest(manifest)
    if not isinstance(clamp, camera.CameraClamp):
        raise SystemExit(f"{args.bundle}: its manifest asks for no camera clamp (dermascan camera-fit)")
    steps = {"the field's fill": field.fill_outside_field, f"the camera clamp ({manifest['version']})": clamp}
    pixels = IsicDataset.open(args.data, limit=args.n).load_images(128)
    print(f"| step | images ({len(pixels)}, pieces of {args.piece}) | changed | ms a study (best of {args.repeats}) |")
    print("|---|---|---|---|")
    cameras = {"as taken": "none", "each with a circular field": "field-of-view", "exposure −20 %": "darker"}
    for step_name, step in steps.items():
        for name, shift in cameras.items():
            images = shifted(pixels, shift)
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                out = [step(images[i : i + args.piece]) for i in range(0, len(images), args.piece)]
                best = min(best, time.perf_counter() - start)
            changed = int(sum((a != b).any() for a, b in zip(np.concatenate(out), images, strict=True)))
            print(f"| {step_name} | {name} | {changed} | {1000 * best / len(images):.3f} |", flush=True)


if __name__ == "__main__":
    main()
