"""Refitting a bundle's differential head on the features its network already has.

``dermascan diagnosis-fit BUNDLE --data DIR --version NEW``: the differential of a network trained
mainly for malignancy is a softmax head on the fused image + metadata features, trained for a few
epochs beside the malignancy output; it stays far from what those features can tell apart (v4:
balanced accuracy 0.470 on the held-out calibration set, nevi outvoting the rare classes). This
refits that one dense layer as a multinomial logistic regression with balanced class weights
(ISIC 2018's metric is balanced accuracy) on the bundle's own development rows, the four flips of
each image as four rows, reading beside the fused features the cell Grad-CAM shows (NASNet's last
cell at 1/8 of the side), average- and max-pooled — an earlier cell's texture and colour tell the diagnoses
apart better than the last cell's features, made for malignancy (docs/model.md); its L2 strength
chosen by balanced accuracy across the bundle's own patient-grouped folds. Nothing else of the network changes: the probability of malignancy, the
gate's features, the threshold and every map fitted on them stay as they are (checked: the
malignancy output before and after is compared on the calibration rows).

The bundle gets a new version (its weights change) and a new ``diagnosis`` block (prior adjustment
chosen again, report on the development rows out of fold and on the calibration set); its ONNX
package is then exported again (``dermascan export``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

import numpy as np

from model.errors import ModelError

log = logging.getLogger(__name__)
STRENGTHS = (0.003, 0.01, 0.03, 0.1)  # inverse L2 strength (scikit-learn's C) on standardised features
CELL_STRIDE = 8  # the differential also reads the cell at 1/8 of the side (the one Grad-CAM shows)


def fused_features(network, pixels: np.ndarray, meta: np.ndarray, tta: bool, batch_size: int = 128) -> np.ndarray:
    """What the differential head reads (the fused features, and the pooled cell where it reads
    one), per flip: (views, n, d)."""
    import keras

    from model.inference.network import DIAGNOSIS_HEAD
    from model.inference.predictor import flips

    head = network.get_layer(DIAGNOSIS_HEAD)
    features = keras.Model(network.inputs, head.input)
    views = flips(pixels) if tta else [pixels]
    out = []
    for i, view in enumerate(views):
        out.append(
            features.predict({"image": np.ascontiguousarray(view), "meta": meta}, batch_size=batch_size, verbose=0)
        )
        log.info("diagnosis-fit: the head's features of %d images, view %d of %d", len(pixels), i + 1, len(views))
    return np.stack(out).astype(np.float32)


def bundle_rows(loaded, bundle_dir, data_dir):
    """The rows a bundle was made from, as its Predictor would see them: (class index per row, -1
    without a diagnosis; fold per row, -1 for the calibration rows; pixels after the bundle's
    conform step — a circular field's surround filled, the camera clamp, where it asks; the metadata
    vectors)."""
    from model.inference import camera, diagnosis
    from model.inference.data import IsicDataset
    from model.training.config import read_config, split_rows

    cfg = read_config(Path(bundle_dir))
    dataset = IsicDataset.open(data_dir, limit=cfg.limit)
    truth = diagnosis.labels(dataset.metadata)
    parts = split_rows(dataset.targets(), dataset.groups(), cfg)
    fill, correct = camera.steps(loaded.manifest)
    pixels = correct(fill(dataset.load_images(loaded.image_size)))
    meta = loaded.spec.transform(dataset.metadata).astype(np.float32)
    return truth, parts, pixels, meta


def fit_head(features: np.ndarray, truth: np.ndarray, strength: float, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A dense softmax layer's (kernel (d, classes), bias) fitted on ``features`` (views, n, d) of
    rows with a class (``truth`` ≥ 0): standardised, balanced class weights, every view a row; the
    standardisation is folded into the layer. Rounded to float16, as a bundle stores its weights."""
    from sklearn.linear_model import LogisticRegression

    known = truth >= 0
    x = features[:, known].reshape(-1, features.shape[-1]).astype(np.float64)
    y = np.tile(truth[known], features.shape[0])
    present = np.unique(y)
    if present.size < 2:
        raise ModelError(f"{present.size} class(es) among the rows with a diagnosis: cannot fit the differential head")
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    model = LogisticRegression(C=strength, class_weight="balanced", max_iter=2000)
    model.fit((x - mean) / scale, y)
    coef = model.coef_ if present.size > 2 else np.vstack([-model.coef_, model.coef_]) / 2
    intercept = model.intercept_ if present.size > 2 else np.concatenate([-model.intercept_, model.intercept_]) / 2
    kernel = np.zeros((features.shape[-1], classes))
    bias = np.full(classes, -30.0)  # a class these rows never show is never predicted
    kernel[:, present] = (coef / scale).T
    bias[present] = intercept - (mean / scale) @ coef.T
    return kernel.astype(np.float16).astype(np.float32), bias.astype(np.float16).astype(np.float32)


def head_probabilities(features: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The head's class probabilities, averaged over the views as the Predictor averages them."""
    logits = features.astype(np.float64) @ kernel + bias
    logits -= logits.max(axis=-1, keepdims=True)
    p = np.exp(logits)
    return (p / p.sum(axis=-1, keepdims=True)).mean(axis=0)


def choose_strength(features: np.ndarray, truth: np.ndarray, parts: np.ndarray, classes: int, strengths=STRENGTHS):
    """The strength of ``strengths`` with the best balanced accuracy out of fold over the
    development parts, and those out-of-fold probabilities (rows of no part: zeros) and every
    strength's score."""
    from model.inference.diagnosis import balanced_accuracy

    dev = (parts >= 0) & (truth >= 0)
    scores, best = {}, None
    for strength in strengths:
        oof = np.zeros((truth.size, classes))
        for k in np.unique(parts[parts >= 0]):
            train = dev & (parts != k)
            kernel, bias = fit_head(features[:, train], truth[train], strength, classes)
            oof[parts == k] = head_probabilities(features[:, parts == k], kernel, bias)
        scores[strength] = balanced_accuracy(truth[dev], oof[dev])
        log.info("diagnosis-fit: C=%g, balanced accuracy out of fold %.4f", strength, scores[strength])
        if best is None or scores[strength] > scores[best[0]]:
            best = (strength, oof)
    return best[0], best[1], scores


def refit(
    bundle_dir,
    data_dir,
    version: str,
    cell_stride: int | None = CELL_STRIDE,
    pools: tuple[str, ...] | None = None,
    strength: float | None = None,
) -> dict:
    """Refit ``bundle_dir``'s differential head in place under ``version``; returns its new
    ``diagnosis`` block. ``cell_stride``: the head also reads the cell at ``1/cell_stride`` of the
    input's side, pooled as ``pools`` says (``network.CELL_POOLS``; None: every way there, its average
    and its largest value per channel — ``network.diagnosis_reads_cell``; a head that already reads
    it that way keeps it, one that reads it otherwise is rewired); ``cell_stride`` None: the head
    reads what it reads now. ``strength``: the L2 strength C, where an earlier search chose it (else the
    best of ``STRENGTHS`` out of fold)."""
    from model.inference import bundle as bundle_lib
    from model.inference import diagnosis
    from model.inference.network import CELL_POOLS, DIAGNOSIS_HEAD, cell_pools, diagnosis_reads_cell

    bundle_dir = Path(bundle_dir)
    loaded = bundle_lib.load(bundle_dir)
    manifest = loaded.manifest
    if not manifest.get("diagnosis"):
        raise ModelError(f"{bundle_dir}: the bundle has no differential output to refit")
    if version == manifest["version"]:  # rewrite_network refuses it too: said here before the long work
        raise ModelError(f"{version}: the refitted bundle's weights change, so it needs a new version")
    network = loaded.network
    old_weights = network.get_layer(DIAGNOSIS_HEAD).get_weights()
    pools = tuple(CELL_POOLS) if pools is None else tuple(pools)
    if cell_stride and set(cell_pools(network)) != set(pools):
        network = diagnosis_reads_cell(network, cell_stride, pools)
    reads = cell_pools(network)
    head = network.get_layer(DIAGNOSIS_HEAD)
    classes = int(old_weights[1].shape[0])
    truth, parts, pixels, meta = bundle_rows(loaded, bundle_dir, data_dir)
    if not ((parts < 0) & (truth >= 0)).any():
        raise ModelError(f"{bundle_dir}: its split holds out no calibration rows with a diagnosis to report on")
    dev = (parts >= 0) & (truth >= 0)
    absent = sorted(set(range(classes)) - set(truth[dev].tolist()))
    if absent:
        raise ModelError(
            f"the development rows hold no example of class(es) {absent}: cannot fit the differential head"
        )
    tta = bool(manifest.get("inference", {}).get("tta"))
    features = fused_features(network, pixels, meta, tta)

    strength, oof, scores = choose_strength(
        features, truth, parts, classes, STRENGTHS if strength is None else (strength,)
    )
    kernel, bias = fit_head(features[:, dev], truth[dev], strength, classes)
    held = parts < 0
    # the bundle's own network, as it was loaded (before any rewiring): the malignancy output must not move
    before = np.asarray(
        loaded.network.predict({"image": pixels[held], "meta": meta[held]}, batch_size=128, verbose=0)[0]
    )
    # the previous head read the fused features (and the cell's average), which come first in a head
    # that reads more
    old_probabilities = head_probabilities(features[..., : old_weights[0].shape[0]], *old_weights)
    head.set_weights([kernel, bias])
    after = network.predict({"image": pixels[held], "meta": meta[held]}, batch_size=128, verbose=0)
    moved = float(np.max(np.abs(before - np.asarray(after[0])))) if len(before) else 0.0
    if moved > 1e-6:
        raise ModelError(f"refitting the differential head moved the malignancy output by {moved:.2g}")
    probabilities = oof.copy()
    probabilities[held] = head_probabilities(features[:, held], kernel, bias)
    block = diagnosis.fit_block(truth, probabilities, parts)
    block["report"]["refit"] = {
        "method": "multinomial logistic regression, balanced class weights, every flip a row",
        "reads": f"the fused features and the cell Grad-CAM shows, {' and '.join(reads)}-pooled"
        if reads
        else "the fused features",
        "strength_chosen": strength,
        "balanced_accuracy_out_of_fold_by_strength": {str(k): round(v, 4) for k, v in scores.items()},
        "previous_head": {
            "calibration_set": diagnosis.figures(
                truth[held], diagnosis.adjust(old_probabilities[held], manifest["diagnosis"])
            ),
        },
        "note": "development rows: the network's features are its own training rows' (the head alone is out of fold)",
    }
    refitted = {"refit_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "strength": strength,
                "from_version": manifest["version"], "command": "dermascan diagnosis-fit"}  # fmt: skip
    training = {**manifest.get("training", {}), "diagnosis_head": refitted}
    bundle_lib.rewrite_network(bundle_dir, network, version, {"diagnosis": block, "training": training})
    log.info("diagnosis-fit: %s written (%s)", version, json.dumps(block["report"]["calibration_set"])[:200])
    return block
