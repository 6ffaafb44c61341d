"""What should the differential head read? The shipped head's fit (``dermascan diagnosis-fit``:
balanced multinomial logistic regression, every flip a row) on the fused features alone, and on
the fused features beside NASNet's cells at 1/4, 1/8 and 1/16 of the image's side, average- or
max-pooled (the 1/8 cell is the one Grad-CAM shows): balanced accuracy and melanoma-against-rest AUC out of fold
over the bundle's patient-grouped development folds, and on the calibration rows (fitted on every
development row). Measured for docs/model.md ("The differential diagnosis").

The features of every image and flip (the bundle's network, its conform step — the circular-field fill and the camera clamp — applied as the
Predictor applies it) take a few minutes on two cores; ``--cache`` keeps them.

    python -m bench.diagnosis_features --data ../shared/data/ham10000 --cache /tmp/dx-features.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from model.inference.diagnosis import CODES

SETS = ("fused", "fused+cell8", "fused+cell16", "fused+cell8+cell16")
# each cell's feature maps pooled: the average (the head as shipped) or the largest value of each
# channel (a small structure that an average over the whole image would dilute)
STRIDES = {"cell8": (8, "average"), "cell16": (16, "average"), "cell4": (4, "average"),
           "cell8max": (8, "max"), "cell16max": (16, "max")}  # fmt: skip


def features(bundle_dir: Path, data_dir: Path, cache: Path | None) -> tuple[dict, np.ndarray, np.ndarray]:
    """({name: (views, n, d)}, class per row, fold per row), from ``cache`` when it exists; stored
    at float16, so they are that precision either way."""
    if cache is None or not cache.is_file():
        import keras

        from model.inference import bundle as bundle_lib
        from model.inference.gradcam import cell_layer
        from model.inference.network import CELL_POOLS
        from model.inference.predictor import flips
        from model.training.diagnosis_fit import bundle_rows

        loaded = bundle_lib.load(bundle_dir)
        network = loaded.network
        truth, parts, pixels, meta = bundle_rows(loaded, bundle_dir, data_dir)
        outputs = {"fused": network.get_layer("fusion_dropout").output}
        for name, (stride, how) in STRIDES.items():
            pooled = CELL_POOLS[how][1](name=f"bench_pool_{name}")  # the layer the differential head pools with
            outputs[name] = pooled(cell_layer(network, stride).output)
        model = keras.Model(network.input, list(outputs.values()))
        found = {name: [] for name in outputs}
        for view in flips(pixels):
            batch = model.predict({"image": np.ascontiguousarray(view), "meta": meta}, batch_size=128, verbose=0)
            for name, values in zip(outputs, batch, strict=True):
                found[name].append(values.astype(np.float16))
        stacked = {name: np.stack(values) for name, values in found.items()}
        if cache is not None:
            np.savez(cache, truth=truth, parts=parts, **stacked)
        return {k: v.astype(np.float32) for k, v in stacked.items()}, truth, parts
    d = np.load(cache)
    return {k: d[k].astype(np.float32) for k in ("fused", *STRIDES) if k in d}, d["truth"], d["parts"]


def main() -> None:
    from bench import support
    from model.inference.diagnosis import figures
    from model.training.diagnosis_fit import fit_head, head_probabilities

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=support.ROOT / "model" / "bundles" / "default")
    parser.add_argument("--data", type=Path, default=support.HAM)
    parser.add_argument("--cache", type=Path, help="an .npz file for the features (read when it exists)")
    parser.add_argument("--strength", type=float, default=0.01, help="the L2 strength C (the shipped head's)")
    parser.add_argument("--sets", default=";".join(SETS), help=f"';'-separated, of {SETS}")
    args = parser.parse_args()
    found, truth, parts = features(args.bundle, args.data, args.cache)
    dev, cal = (parts >= 0) & (truth >= 0), (parts < 0) & (truth >= 0)
    rows = []
    for name in args.sets.split(";"):
        x = np.concatenate([found[part] for part in name.split("+")], axis=-1)
        oof = np.zeros((truth.size, len(CODES)))
        for k in np.unique(parts[parts >= 0]):
            train = dev & (parts != k)
            oof[parts == k] = head_probabilities(
                x[:, parts == k], *fit_head(x[:, train], truth[train], args.strength, len(CODES))
            )
        held = head_probabilities(x[:, cal], *fit_head(x[:, dev], truth[dev], args.strength, len(CODES)))
        cells = [name, str(x.shape[-1])]
        for result in (figures(truth[dev], oof[dev]), figures(truth[cal], held)):
            cells += [f"{result['balanced_accuracy']:.3f}", f"{result['melanoma_auc']:.3f}"]
        cells.append(" / ".join(f"{v:.2f}" for v in figures(truth[cal], held)["recall"].values()))
        rows.append(tuple(cells))
        print(" · ".join(cells), flush=True)  # progress: each set takes minutes
    print(f"\nwhat the differential head reads (C = {args.strength:g}) — {support.machine()}")
    print(support.table(rows, HEADER))


HEADER = (
    "features", "dimensions", "out of fold: balanced accuracy", "melanoma AUC", "calibration set: balanced accuracy",
    "melanoma AUC", "calibration recall " + " / ".join(CODES),
)  # fmt: skip

if __name__ == "__main__":
    main()
