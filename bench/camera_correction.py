"""Can a correction at inference alone make the shipped network robust to another camera? Each
correction is scored on the calibration set as taken and under the fixed camera shifts of
``dermascan evaluate --shift`` (model/training/evaluate.py: SHIFTS), through the Predictor with the
bundle's threshold; the table shows AUC, sensitivity and specificity and how many images the
correction changed. Measured for docs/model.md ("Another camera").

Corrections (each applied after the circular field's fill, in place of any clamp the bundle has;
the clamps are model.inference.camera's, which a bundle asks for with ``dermascan camera-fit``):
- ``clamp-wb-P``: each image's illuminant estimated by Shades of Gray (p = 6) as log(R/G), log(B/G),
  and moved only as far as the P-th..(100-P)-th percentiles of the development images' estimates
  (an image inside that range is left as it is); no channel by more than ±25 %;
- ``clamp-exposure-P``: the median of the brightest channel moved into the development images'
  P-th..(100-P)-th percentiles by one gain (at most ±25 %); ``clamp-exposure-P:Q``: P below, Q
  above (0: that side open);
- ``clamp-wb-P+clamp-exposure-Q``: both ranges, one gain per channel;
- ``colour-views``: the bundle's four flips, two of them also given a cooler / a warmer white
  balance (red ×0.9, blue ×1.1 and back), averaged as the flips are (same number of passes).

    python -m bench.camera_correction --data ../shared/data/ham10000
"""

from __future__ import annotations

import argparse
import time

import numpy as np

SHIFT_NAMES = ("none", "white-balance", "darker", "brighter")


def _gain(x: np.ndarray, r: float, b: float) -> np.ndarray:
    return np.clip(np.rint(x.astype(np.float32) * np.array([r, 1.0, b], np.float32)), 0, 255).astype(np.uint8)


def colour_views(x: np.ndarray) -> list[np.ndarray]:
    return [x, _gain(x[:, :, ::-1], 0.9, 1.1), _gain(x[:, ::-1], 1.1, 0.9), x[:, ::-1, ::-1]]


def main() -> None:
    import model.inference.predictor as predictor_module
    from model import metrics
    from model.inference import camera
    from model.inference.data import IsicDataset
    from model.training import camera_fit
    from model.training.config import read_config, split_rows
    from model.training.evaluate import shifted

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default="model/bundles/default")
    parser.add_argument("--data", required=True)
    parser.add_argument(
        "--corrections",
        default="none,clamp-wb-5,clamp-wb-10,clamp-wb-20,clamp-exposure-5,clamp-exposure-20,colour-views",
    )
    args = parser.parse_args()
    t0 = time.time()
    predictor = predictor_module.Predictor(args.bundle)
    predictor.tta = True
    dataset = IsicDataset.open(args.data)
    y = dataset.targets()
    split = split_rows(y, dataset.groups(), read_config(predictor.bundle.directory))
    ids, meta = dataset.ids, predictor.spec.transform(dataset.metadata)

    def load(rows):
        return np.concatenate(
            [
                dataset.load_images(predictor.image_size, [ids[i] for i in rows[s : s + 512]])
                for s in range(0, len(rows), 512)
            ]
        )

    dev, cal = np.flatnonzero(split >= 0), np.flatnonzero(split < 0)
    development = predictor.fill(load(dev))
    pixels, truth, cal_meta = load(cal), y[cal], meta[cal]
    flips = predictor_module.flips
    print(f"bundle {predictor.version}, calibration set {len(cal)} images ({int(truth.sum())} malignant), "
          f"threshold {predictor.threshold:.4f}; development images' ranges from {len(dev)}")  # fmt: skip
    print("| correction | camera | changed | AUC | sensitivity | specificity |")
    print("|---|---|---|---|---|---|")
    try:
        for correction in args.corrections.split(","):
            # the views replace the flips inside the Predictor (it has no other hook for them)
            predictor_module.flips = colour_views if correction == "colour-views" else flips
            clamp_step = None  # "clamp-wb-5+clamp-exposure-20": both ranges, one gain per channel
            if correction.startswith("clamp-"):
                percentiles = {"wb": 0.0, "exposure": 0.0}
                for part in correction.split("+"):
                    _, kind, percentile = part.split("-")  # "20", or "20:0" (below : above) for the exposure
                    percentiles[kind] = camera_fit.percentiles(percentile)
                block = camera.fit(development, percentiles["exposure"], percentiles["wb"])
                clamp_step = camera.CameraClamp(block)
            for shift in SHIFT_NAMES:
                base = predictor.fill(shifted(pixels, shift))
                x = base if clamp_step is None else clamp_step(base)
                changed = float(np.mean(np.any(x != base, axis=(1, 2, 3))))
                p = np.concatenate(
                    [
                        predictor.predict(x[s : s + 256], cal_meta[s : s + 256]).probability
                        for s in range(0, len(x), 256)
                    ]
                )
                op = metrics.at_threshold(truth, p, predictor.threshold)
                print(f"| {correction} | {shift} | {changed:.0%} | {metrics.auc(truth, p):.4f} | "
                      f"{op.sensitivity:.3f} | {op.specificity:.3f} |", flush=True)  # fmt: skip
    finally:
        predictor_module.flips = flips
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
