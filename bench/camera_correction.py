"""Can a correction at inference alone make the shipped network robust to another camera? Each
correction is scored on the calibration set as taken and under the fixed camera shifts of
``dermascan evaluate --shift`` (model/training/evaluate.py: SHIFTS), through the Predictor with the
bundle's threshold; the table shows AUC, sensitivity and specificity and how many images the
correction changed. Not shipped — measured for docs/model.md ("Another camera").

Corrections (none is in the bundle; each is applied after the bundle's own conform step):
- ``clamp-wb-P``: each image's illuminant estimated by Shades of Gray (p = 6) as log(R/G), log(B/G),
  and moved only as far as the P-th..(100-P)-th percentiles of the development images' estimates
  (an image inside that range is left as it is);
- ``clamp-exposure-P``: the median of the brightest channel moved into the development images'
  P-th..(100-P)-th percentiles by one gain;
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


def image_statistics(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(median of the brightest channel (n,), Shades-of-Gray log chroma (n, 2): log R/G, log B/G)."""
    f = pixels.astype(np.float32)
    exposure = np.median(f.max(axis=-1).reshape(len(f), -1), axis=1)
    sog = np.mean(f.reshape(len(f), -1, 3) ** 6, axis=1) ** (1 / 6)
    return exposure, np.log(np.maximum(sog[:, [0, 2]], 1.0) / np.maximum(sog[:, [1]], 1.0))


def clamp(pixels: np.ndarray, kind: str, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Each image's exposure (``kind`` "exposure") or colour cast ("wb") moved into [low, high]."""
    f = pixels.astype(np.float32)
    exposure, chroma = image_statistics(pixels)
    if kind == "exposure":
        f = f * (np.clip(exposure, low, high) / np.maximum(exposure, 1.0))[:, None, None, None]
    else:
        gain = np.exp(np.clip(chroma, low, high) - chroma)
        f = f * np.stack([gain[:, 0], np.ones(len(f)), gain[:, 1]], axis=1)[:, None, None, :]
    return np.clip(np.rint(f), 0, 255).astype(np.uint8)


def main() -> None:
    import model.inference.predictor as predictor_module
    from model import metrics
    from model.inference.data import IsicDataset
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
    exposure, chroma = image_statistics(predictor.conform(load(dev)))
    pixels, truth, cal_meta = load(cal), y[cal], meta[cal]
    flips = predictor_module.flips
    print(f"bundle {predictor.version}, calibration set {len(cal)} images ({int(truth.sum())} malignant), "
          f"threshold {predictor.threshold:.4f}; development images' ranges from {len(dev)}")  # fmt: skip
    print("| correction | camera | changed | AUC | sensitivity | specificity |")
    print("|---|---|---|---|---|---|")
    development = {"exposure": exposure, "wb": chroma}
    try:
        for correction in args.corrections.split(","):
            # the views replace the flips inside the Predictor (it has no other hook for them)
            predictor_module.flips = colour_views if correction == "colour-views" else flips
            if correction.startswith("clamp-"):
                _, kind, percentile = correction.split("-")
                low, high = np.percentile(development[kind], [float(percentile), 100 - float(percentile)], axis=0)
            for shift in SHIFT_NAMES:
                base = predictor.conform(shifted(pixels, shift))
                x = clamp(base, kind, low, high) if correction.startswith("clamp-") else base
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
