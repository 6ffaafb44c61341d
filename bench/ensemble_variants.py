"""Variants of the shipped ensemble measured on its held-out calibration set, from a finished
training work folder — what can be tried without training again: test-time flips or not, which
members, and each member's best checkpoint against the average of its best and last weights (a
cheap stand-in for an exponential moving average of weights).

    python -m bench.ensemble_variants --work /work/cv15 --data ../shared/data/ham10000
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--weight-average", action="store_true", help="also score best+last weight averages")
    args = parser.parse_args()

    from model import metrics
    from model.inference.data import IsicDataset

    fold = np.load(args.work / "split.npy")
    cal_idx = np.flatnonzero(fold < 0)
    y = IsicDataset.open(args.data).targets()[cal_idx]
    saved = {k: np.load(args.work / f"fold{k}" / "oof.npz") for k in range(args.folds)}
    rows = []

    def add(name: str, scores: np.ndarray) -> None:
        rows.append((name, metrics.auc(y, scores), metrics.pauc_above_tpr(y, scores)))

    for size in range(1, args.folds + 1):
        for members in itertools.combinations(range(args.folds), size):
            add(f"members {members}, flips", np.mean([saved[k]["cal_mean"] for k in members], axis=0))
    add("all members, no flips", np.mean([saved[k]["cal_plain"] for k in range(args.folds)], axis=0))
    if args.weight_average:
        import keras

        from model.training.folds import tta_predict

        dataset = IsicDataset.open(args.data)
        images = dataset.load_images(args.image_size, [dataset.ids[i] for i in cal_idx])
        from model.inference.features import FeatureSpec

        spec = FeatureSpec.from_json((args.work / "feature_spec.json").read_text())
        meta = spec.transform(dataset.metadata.iloc[cal_idx])
        averaged = []
        for k in range(args.folds):
            best = keras.saving.load_model(args.work / f"fold{k}" / "best.keras", compile=False)
            last = keras.saving.load_model(args.work / f"fold{k}" / "last.keras", compile=False)
            best.set_weights([(a + b) / 2 for a, b in zip(best.get_weights(), last.get_weights(), strict=True)])
            averaged.append(tta_predict(best, images, meta)[0])
        add("all members, best+last weights averaged, flips", np.mean(averaged, axis=0))
    print(f"calibration set: {y.size} images, {int(y.sum())} malignant\n")
    print(f"| {'variant':<52} | AUC    | pAUC80 |")
    print(f"|{'-' * 54}|--------|--------|")
    for name, auc, pauc in rows:
        print(f"| {name:<52} | {auc:.4f} | {pauc:.4f} |")


if __name__ == "__main__":
    main()
