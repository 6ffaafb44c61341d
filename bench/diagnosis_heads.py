"""Would a larger differential head do better than the shipped one dense layer? The shipped head
(``dermascan diagnosis-fit``: balanced multinomial logistic regression on the fused features, C =
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

CLASSES = 7
NETWORKS = ((256, 1e-4, 10, 0.5), (256, 1e-3, 20, 0.5), (512, 1e-4, 20, 0.5), (128, 1e-4, 10, 0.3))


def fused(bundle_dir: Path, data_dir: Path, cache: Path | None):
    if cache is not None and cache.is_file():
        d = np.load(cache)
        return d["features"].astype(np.float32), d["truth"], d["parts"]
    from model.inference import bundle as bundle_lib
    from model.inference import diagnosis, field
    from model.inference.data import IsicDataset
    from model.training.config import read_config, split_rows
    from model.training.diagnosis_fit import fused_features

    loaded = bundle_lib.load(bundle_dir)
    cfg = read_config(bundle_dir)
    dataset = IsicDataset.open(data_dir, limit=cfg.limit)
    truth = diagnosis.labels(dataset.metadata)
    parts = split_rows(dataset.targets(), dataset.groups(), cfg)
    pixels = field.for_manifest(loaded.manifest)(dataset.load_images(loaded.image_size))
    meta = loaded.spec.transform(dataset.metadata).astype(np.float32)
    features = fused_features(loaded.network, pixels, meta, True)
    if cache is not None:
        np.savez(cache, features=features.astype(np.float16), truth=truth, parts=parts)
    return features.astype(np.float16).astype(np.float32), truth, parts


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
    from sklearn.metrics import roc_auc_score

    from bench import support
    from model.inference.diagnosis import balanced_accuracy

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
        rows.append((
            name,
            f"{balanced_accuracy(truth[dev], oof[dev]):.3f}", f"{roc_auc_score(truth[dev] == 0, oof[dev][:, 0]):.3f}",
            f"{balanced_accuracy(truth[cal], held):.3f}", f"{roc_auc_score(truth[cal] == 0, held[:, 0]):.3f}",
        ))  # fmt: skip
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
