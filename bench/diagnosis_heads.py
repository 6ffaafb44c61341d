"""Would a larger differential head do better than the shipped one dense layer? The shipped head
(``dermascan diagnosis-fit``: balanced multinomial logistic regression on what the head reads, C =
0.01) against one-hidden-layer networks on the same features, the same four flips as rows and the
same balanced class weights: balanced accuracy and melanoma-against-rest AUC out of fold over the
bundle's patient-grouped development folds, and on the calibration rows (fitted on every
development row). Not shipped — measured for docs/model.md ("A differential diagnosis").

The fused features of every image and flip (the bundle's network, the circular-field fill applied
as the Predictor applies it) take about 20 minutes on two cores; ``--cache`` keeps them.

    python -m bench.diagnosis_heads --data ../shared/data/ham10000 --cache /tmp/fused.npz
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from model.inference.diagnosis import CODES

CLASSES = len(CODES)

NETWORKS = ((256, 1e-4, 10, 0.5), (256, 1e-3, 20, 0.5), (512, 1e-4, 20, 0.5), (128, 1e-4, 10, 0.3))


def fused(bundle_dir: Path, data_dir: Path, cache: Path | None):
    """(fused features (views, n, d), class per row, fold per row), from ``cache`` when it exists;
    the features are stored at float16, so they are that precision either way."""
    if cache is None or not cache.is_file():
        from model.inference import bundle as bundle_lib
        from model.training.diagnosis_fit import bundle_rows, fused_features

        loaded = bundle_lib.load(bundle_dir)
        truth, parts, pixels, meta = bundle_rows(loaded, bundle_dir, data_dir)
        features = fused_features(loaded.network, pixels, meta, True).astype(np.float16)
        if cache is None:
            return features.astype(np.float32), truth, parts
        np.savez(cache, features=features, truth=truth, parts=parts)
    d = np.load(cache)
    return d["features"].astype(np.float32), d["truth"], d["parts"]


def logistic(features, truth, strength=0.01):
    from model.training.diagnosis_fit import fit_head, head_probabilities

    kernel, bias = fit_head(features, truth, strength, CLASSES)
    return lambda x: head_probabilities(x, kernel, bias)


def network(features, truth, hidden, l2, epochs, dropout, seed=0):
    import keras

    keras.utils.set_random_seed(seed)
    x = features.reshape(-1, features.shape[-1])
    y = np.tile(truth, features.shape[0])
    mean, scale = x.mean(0), x.std(0) + 1e-6
    weights = (len(y) / (CLASSES * np.maximum(np.bincount(y, minlength=CLASSES), 1)))[y]
    inputs = keras.Input((x.shape[1],))
    h = keras.layers.Dropout(dropout)(inputs)
    h = keras.layers.Dense(hidden, activation="relu", kernel_regularizer=keras.regularizers.l2(l2))(h)
    h = keras.layers.Dropout(dropout)(h)
    out = keras.layers.Dense(CLASSES, activation="softmax", kernel_regularizer=keras.regularizers.l2(l2))(h)
    model = keras.Model(inputs, out)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    model.fit((x - mean) / scale, y, sample_weight=weights, epochs=epochs, batch_size=256, verbose=0)

    def predict(f):
        flat = ((f - mean) / scale).reshape(-1, f.shape[-1])
        return model.predict(flat, verbose=0, batch_size=4096).reshape(f.shape[0], f.shape[1], CLASSES).mean(0)

    return predict


def main() -> None:
    from bench import support
    from model.inference.diagnosis import figures

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=support.ROOT / "model" / "bundles" / "default")
    parser.add_argument("--data", type=Path, default=support.HAM)
    parser.add_argument("--cache", type=Path, help="an .npz file for the fused features (read when it exists)")
    args = parser.parse_args()
    features, truth, parts = fused(args.bundle, args.data, args.cache)
    dev, cal = (parts >= 0) & (truth >= 0), (parts < 0) & (truth >= 0)
    heads = {"one dense layer, C = 0.01 (shipped)": logistic}
    for hidden, l2, epochs, dropout in NETWORKS:
        heads[f"hidden {hidden}, L2 {l2:g}, {epochs} epochs, dropout {dropout}"] = (
            lambda f, t, h=hidden, r=l2, e=epochs, d=dropout: network(f, t, h, r, e, d)
        )
    rows = []
    for name, fit in heads.items():
        oof = np.zeros((truth.size, CLASSES))
        for k in np.unique(parts[parts >= 0]):
            train = dev & (parts != k)
            oof[parts == k] = fit(features[:, train], truth[train])(features[:, parts == k])
        held = fit(features[:, dev], truth[dev])(features[:, cal])
        cells = [name]
        for found in (figures(truth[dev], oof[dev]), figures(truth[cal], held)):
            cells += [f"{found['balanced_accuracy']:.3f}", f"{found['melanoma_auc']:.3f}"]
        rows.append(tuple(cells))
    print(f"differential heads — {support.machine()}")
    header = (
        "head",
        "out of fold: balanced accuracy",
        "melanoma AUC",
        "calibration set: balanced accuracy",
        "melanoma AUC",
    )
    print(support.table(rows, header))


if __name__ == "__main__":
    main()
