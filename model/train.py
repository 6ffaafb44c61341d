"""Training on the ISIC-2024 layout: patient-grouped stratified folds, augmentation, ReduceLROnPlateau
on validation AUC, per-epoch checkpoints (a stopped run resumes), out-of-fold predictions, a
threshold chosen on them, a report (metrics JSON + ROC PNG) and the model bundle.

The deployed model is the average of the fold models (an ensemble in one Keras graph), so every
development image is scored out-of-fold by exactly one member; the referral threshold is picked
on those out-of-fold scores at the target sensitivity.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from model import metrics
from model.data import IsicDataset, canonical_size, size_label
from model.errors import ModelError
from model.features import FeatureSpec

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    image_size: int | list[int] = 128  # one side (square), or [height, width]
    folds: int = 3
    epochs: int = 14
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    label_smoothing: float = 0.05
    patience: int = 4  # early stopping on val AUC; ReduceLROnPlateau waits half as long
    seed: int = 42  # the split (folds, calibration patients); also the training's, unless init_seed
    # the training's own randomness (initial weights, augmentation, batch order): another value
    # repeats a recipe on the same split, to see how much one run differs from the next
    init_seed: int | None = None
    weights: str | None = None
    target_sensitivity: float = 0.95
    threshold_confidence: float = 0.9  # bootstrap margin for the sensitivity at the threshold
    tta: bool = True
    # share of patients held out of every fold model: the ensemble's threshold, calibration map
    # and not-assessable gate are fitted on its scores there (0: the old out-of-fold rule)
    calibration_fraction: float = 0.15
    gate_false_flag_rate: float = 0.015  # share of held-out lesions the feature gate may flag
    gate_components: int = 32  # PCA components of the feature distance
    # the explicit is-this-dermoscopy check (model.ood.LesionCheck): its false-flag rate on held-out
    # lesions, or None for none (the feature distance and the quality checks alone)
    lesion_check_rate: float | None = None
    max_members: int | None = None  # keep only the best N fold models in the bundle
    limit: int | None = None  # use only the first N rows (smoke runs, tests)
    backbone: str = "nasnet_mobile"  # "tiny" for fast tests of the pipeline around the network
    weights_dtype: str = "float16"  # storage of the bundle's weights (they compute in float32)
    verbose: int = 2
    augmentation: dict = field(default_factory=dict)
    # Polyak averaging of the weights (e.g. 0.99): validation, early stopping and the saved
    # checkpoints use the averaged weights; None trains without it
    ema_momentum: float | None = None
    # "plateau": ReduceLROnPlateau on validation AUC; "cosine": cosine decay over all the epochs
    # (the only schedule that needs no validation data, so a network trained on every development
    # image can use it)
    lr_schedule: str = "plateau"
    # model v4: the differential diagnosis as a second output (its loss weight; 0: none), Shades of
    # Gray colour constancy in the graph, metadata dropout (each field hidden with this probability,
    # all of them with ``metadata_dropout_all``), and which weights a validated fold keeps ("best"
    # epoch by validation AUC, or "last": the same rule as a network trained without validation)
    diagnosis_weight: float = 0.0
    colour_constancy: bool = False
    metadata_dropout: float = 0.0
    metadata_dropout_all: float = 0.0
    keep: str = "best"

    def __post_init__(self):
        self.image_size = canonical_size(self.image_size)  # a JSON list, a tuple → one form
        # the network of fold k is seeded with init_seed + k, the final one (k = -1) with init_seed - 1
        if self.init_seed is not None and not 1 <= self.init_seed <= 2**31:
            raise ValueError(f"init_seed {self.init_seed}: a whole number from 1 to 2**31")


def make_folds(targets: np.ndarray, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold index per row: stratified by target, no group (patient/lesion) in two folds."""
    from sklearn.model_selection import StratifiedGroupKFold

    fold = np.full(targets.size, -1, dtype=int)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    for i, (_, val) in enumerate(splitter.split(np.zeros(targets.size), targets, groups)):
        fold[val] = i
    return fold


def calibration_mask(targets: np.ndarray, groups: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Rows held out of every fold model (about ``fraction`` of them): stratified by target, no
    group (patient/lesion) on both sides. The deployed ensemble has never trained on them, so its
    own scores there choose the threshold and fit the calibration without bias."""
    from sklearn.model_selection import StratifiedGroupKFold

    mask = np.zeros(targets.size, dtype=bool)
    if fraction <= 0:
        return mask
    splitter = StratifiedGroupKFold(n_splits=max(2, round(1 / fraction)), shuffle=True, random_state=seed + 1000)
    _, held = next(splitter.split(np.zeros(targets.size), targets, groups))
    mask[held] = True
    return mask


def split_rows(targets: np.ndarray, groups: np.ndarray, cfg: TrainConfig) -> np.ndarray:
    """Fold index per row; -1 for the calibration rows that no fold model sees."""
    calib = calibration_mask(targets, groups, cfg.calibration_fraction, cfg.seed)
    fold = np.full(targets.size, -1, dtype=int)
    dev = np.flatnonzero(~calib)
    fold[dev] = make_folds(targets[dev], groups[dev], cfg.folds, cfg.seed)
    return fold


def tta_views(model, images: np.ndarray, meta: np.ndarray, batch_size: int = 64, tta: bool = True):
    """The malignancy score of each view (views × n) and, for a network with the differential,
    the mean of the views' class probabilities (n × classes; None without)."""
    views = [images]
    if tta:
        views += [images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1]]
    preds, classes = [], []
    for v in views:
        out = model.predict({"image": np.ascontiguousarray(v), "meta": meta}, batch_size=batch_size, verbose=0)
        if isinstance(out, list | tuple):
            classes.append(np.asarray(out[1], np.float64))
            out = out[0]
        preds.append(np.asarray(out).ravel())
    return np.stack(preds), (np.mean(classes, axis=0) if classes else None)


def tta_predict(model, images: np.ndarray, meta: np.ndarray, batch_size: int = 64, tta: bool = True):
    """Mean and spread (std) of the predictions over the four flips (or just the plain pass),
    and the plain pass alone."""
    preds, _ = tta_views(model, images, meta, batch_size, tta)
    return preds.mean(axis=0), preds.std(axis=0), preds[0]


@__import__("functools").cache
def _masked_loss():
    import keras

    @keras.saving.register_keras_serializable(package="dermascan")
    def masked_sparse_crossentropy(y_true, y_pred):
        """Cross-entropy of the differential over the rows that have a diagnosis (label ≥ 0)."""
        from keras import ops

        labels = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        known = ops.cast(labels >= 0, y_pred.dtype)
        safe = ops.maximum(labels, 0)
        loss = keras.losses.sparse_categorical_crossentropy(safe, y_pred)
        return ops.sum(loss * known) / ops.maximum(ops.sum(known), 1.0)

    return masked_sparse_crossentropy


class _ResumeState:
    """Restores EarlyStopping / ReduceLROnPlateau counters from the history of a resumed fold."""

    def __init__(self, history: list[dict], monitor: str):
        self.best = max((h[monitor] for h in history), default=None)
        last_best = max((i for i, h in enumerate(history) if h[monitor] == self.best), default=-1)
        self.wait = len(history) - 1 - last_best if history else 0

    def callback(self, *targets):
        import keras

        state = self

        class Restore(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                if state.best is None:
                    return
                for target in targets:
                    target.best = state.best
                    target.wait = state.wait

        return Restore()


def _read_history(path: Path) -> list[dict]:
    if not path.exists():
        return []
    import csv

    with path.open() as fh:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]
    for row in rows:  # a network with the differential logs its malignancy AUC under the head's name
        if "val_auc" not in row and "val_classification_head_auc" in row:
            row["val_auc"] = row["val_classification_head_auc"]
    return rows


def train_fold(
    k: int, cfg: TrainConfig, work: Path, spec: FeatureSpec, x: dict, y: np.ndarray, train_idx, val_idx,
    *, targets: np.ndarray | None = None, folder: str | None = None, diagnosis: np.ndarray | None = None,
):  # fmt: skip
    """Train one fold (resuming from its last checkpoint). Returns the best model.

    ``targets``: what the network learns on its training rows (default ``y``; soft scores for a
    distilled student); validation always uses the labels ``y``. With no validation rows the
    network trains its full ``cfg.epochs`` (cosine schedule) and the last epoch is kept.
    ``folder``: the checkpoint folder inside ``work`` (default ``fold<k>``). ``diagnosis``: the class
    index of every row (-1: none) when the network has the differential (``cfg.diagnosis_weight``)."""
    import keras

    from model.network import Augmentation, build

    fold_dir = work / (folder or f"fold{k}")
    validated = len(val_idx) > 0
    two = cfg.diagnosis_weight > 0
    if two and diagnosis is None:
        raise ValueError("a network with the differential needs each row's diagnosis")
    monitor = "val_classification_head_auc" if two else "val_auc"
    keep_best = validated and cfg.keep == "best"
    if two:
        _masked_loss()  # registered before a checkpoint that uses it is loaded
    if not validated and cfg.lr_schedule != "cosine":
        raise ValueError("a network without validation rows needs lr_schedule='cosine' (nothing to plateau on)")
    fold_dir.mkdir(parents=True, exist_ok=True)
    best_path, last_path, hist_path = fold_dir / "best.keras", fold_dir / "last.keras", fold_dir / "history.csv"
    history = _read_history(hist_path)
    if (fold_dir / "done").exists():
        return keras.saving.load_model(best_path if keep_best else last_path)

    seed = (cfg.seed if cfg.init_seed is None else cfg.init_seed) + k
    keras.utils.set_random_seed(seed)
    if last_path.exists() and history:
        model = keras.saving.load_model(last_path)
        log.info("fold %d: resuming after epoch %d", k, len(history))
    else:
        history = []
        hist_path.unlink(missing_ok=True)
        dropout = None
        if cfg.metadata_dropout or cfg.metadata_dropout_all:
            dropout = {
                "groups": [[a, b] for _, a, b in spec.groups()], "missing": spec.missing_vector().tolist(),
                "rate": cfg.metadata_dropout, "all_rate": cfg.metadata_dropout_all,
            }  # fmt: skip
        from model.diagnosis import CODES

        model = build(
            spec.dim,
            cfg.image_size,
            augmentation=Augmentation(**cfg.augmentation),
            weights=cfg.weights,
            seed=seed,
            backbone=cfg.backbone,
            name=f"fold{k}",
            diagnoses=len(CODES) if two else 0,
            colour_constancy=cfg.colour_constancy,
            metadata_dropout=dropout,
        )
        learning_rate = cfg.learning_rate
        if cfg.lr_schedule == "cosine":
            steps = cfg.epochs * int(np.ceil(len(train_idx) / cfg.batch_size))
            learning_rate = keras.optimizers.schedules.CosineDecay(cfg.learning_rate, steps, alpha=0.01)
        model.compile(
            optimizer=keras.optimizers.AdamW(
                learning_rate,
                weight_decay=cfg.weight_decay,
                use_ema=cfg.ema_momentum is not None,
                ema_momentum=cfg.ema_momentum or 0.99,
            ),
            loss=[keras.losses.BinaryCrossentropy(label_smoothing=cfg.label_smoothing), _masked_loss()]
            if two
            else keras.losses.BinaryCrossentropy(label_smoothing=cfg.label_smoothing),
            loss_weights=[1.0, cfg.diagnosis_weight] if two else None,
            metrics=[[keras.metrics.AUC(name="auc")], []] if two else [keras.metrics.AUC(name="auc")],
        )

    def take(idx, labels):
        inputs = {"image": x["image"][idx], "meta": x["meta"][idx]}
        if two:
            return inputs, (labels[idx].astype("float32"), diagnosis[idx].astype("int32"))
        return inputs, labels[idx].astype("float32")

    (xt, yt), (xv, yv) = take(train_idx, y if targets is None else targets), take(val_idx, y)
    callbacks = []
    if cfg.ema_momentum is not None:
        # first, so that every callback after it (checkpoints, early stopping) sees the averaged
        # weights at the end of an epoch
        swap = keras.callbacks.SwapEMAWeights(swap_on_epoch=True)
        # a resumed fold's last checkpoint was written with the averages swapped in
        swap._ema_weights_in_model = bool(history)
        callbacks.append(swap)
    stopped = False
    if keep_best:
        early = keras.callbacks.EarlyStopping(monitor, mode="max", patience=cfg.patience)
        best_ckpt = keras.callbacks.ModelCheckpoint(best_path, monitor, mode="max", save_best_only=True)
        watched = [early]
        if cfg.lr_schedule != "cosine":  # a schedule owns the learning rate: nothing to reduce
            watched.append(keras.callbacks.ReduceLROnPlateau(
                monitor, mode="max", factor=0.5, patience=max(1, cfg.patience // 2), min_lr=1e-5, verbose=1
            ))  # fmt: skip
        if history:
            best_ckpt.best = max(h[monitor] for h in history)
        callbacks += [*watched, _ResumeState(history, monitor).callback(*watched), best_ckpt]
        stopped = bool(history) and _ResumeState(history, monitor).wait >= cfg.patience
    callbacks += [keras.callbacks.ModelCheckpoint(last_path), keras.callbacks.CSVLogger(str(hist_path), append=True)]
    if len(history) < cfg.epochs and not stopped:
        t0 = time.time()
        model.fit(
            xt,
            yt,
            batch_size=cfg.batch_size,
            epochs=cfg.epochs,
            initial_epoch=len(history),
            validation_data=(xv, yv) if validated else None,
            callbacks=callbacks,
            verbose=cfg.verbose,
        )
        log.info("%s: trained in %.0f s", fold_dir.name, time.time() - t0)
    (fold_dir / "done").write_text(json.dumps({"finished": time.time()}))
    return keras.saving.load_model(best_path if keep_best else last_path)


def cross_validate(data_dir, work_dir, cfg: TrainConfig, train_folds: list[int] | None = None) -> dict:
    """Run (or resume) the fold models — all of them, or only ``train_folds`` — then summarise
    the folds that are done: out-of-fold predictions, per-fold and pooled metrics, threshold."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    dataset = IsicDataset.open(data_dir, limit=cfg.limit)
    y, groups = dataset.targets(), dataset.groups()
    spec_path = work / "feature_spec.json"
    spec = FeatureSpec.from_json(spec_path.read_text()) if spec_path.exists() else FeatureSpec.fit(dataset.metadata)
    spec_path.write_text(spec.to_json())
    fold = split_rows(y, groups, cfg)
    np.save(work / "split.npy", fold)
    todo = [
        k
        for k in (range(cfg.folds) if train_folds is None else train_folds)
        if not (work / f"fold{k}" / "oof.npz").exists()
    ]
    log.info(
        "%d images, %d positives, %d groups, %d folds (to train: %s)",
        y.size,
        y.sum(),
        len(set(groups)),
        cfg.folds,
        todo,
    )
    if todo:
        t0 = time.time()
        x = {"image": dataset.load_images(cfg.image_size), "meta": spec.transform(dataset.metadata)}
        log.info("decoded %d images at %s in %.1f s", y.size, size_label(cfg.image_size), time.time() - t0)
        for k in todo:
            train_idx, val_idx = np.flatnonzero((fold != k) & (fold >= 0)), np.flatnonzero(fold == k)
            model = train_fold(k, cfg, work, spec, x, y, train_idx, val_idx)
            mean, spread, plain = tta_predict(model, x["image"][val_idx], x["meta"][val_idx], tta=cfg.tta)
            cal_idx = np.flatnonzero(fold < 0)
            cal = tta_predict(model, x["image"][cal_idx], x["meta"][cal_idx], tta=cfg.tta) if cal_idx.size else ()
            np.savez(
                work / f"fold{k}" / "oof.npz", mean=mean, spread=spread, plain=plain, index=val_idx,
                **dict(zip(("cal_mean", "cal_spread", "cal_plain"), cal, strict=False)), cal_index=cal_idx,
            )  # fmt: skip
            del model
    return summarise(work, dataset, fold, cfg)


def summarise(work: Path, dataset: IsicDataset, fold: np.ndarray, cfg: TrainConfig) -> dict:
    """Metrics of the finished folds: per fold, and pooled over their out-of-fold predictions."""
    import pandas as pd

    y = dataset.targets()
    oof = np.full(y.size, np.nan)
    oof_spread = np.full(y.size, np.nan)
    oof_plain = np.full(y.size, np.nan)
    per_fold = []
    for k in range(cfg.folds):
        path = work / f"fold{k}" / "oof.npz"
        if not path.exists():
            continue
        saved = np.load(path)
        val_idx = saved["index"]
        oof[val_idx], oof_spread[val_idx] = saved["mean"], saved["spread"]
        if "plain" in saved:
            oof_plain[val_idx] = saved["plain"]
        history = _read_history(work / f"fold{k}" / "history.csv")
        per_fold.append(
            {
                "fold": k,
                "n_train": int(np.sum((fold != k) & (fold >= 0))),
                "n_val": int(val_idx.size),
                "epochs_run": len(history),
                "best_epoch": int(np.argmax([h["val_auc"] for h in history])) + 1 if history else None,
                "auc": metrics.auc(y[val_idx], saved["mean"]),
                "pauc80": metrics.pauc_above_tpr(y[val_idx], saved["mean"]),
            }
        )
        log.info("fold %d: AUC %.4f pAUC80 %.4f", k, per_fold[-1]["auc"], per_fold[-1]["pauc80"])
    if not per_fold:
        raise ValueError(f"{work}: no finished fold to summarise")
    covered = ~np.isnan(oof)
    pd.DataFrame(
        {
            "isic_id": dataset.ids,
            "fold": fold,
            "target": y,
            "oof": oof,
            "oof_spread": oof_spread,
            "oof_plain": oof_plain,
        }
    ).to_csv(work / "oof.csv", index=False)
    yc, sc = y[covered], oof[covered]
    threshold = referral_threshold(y, oof, fold, cfg)
    report = {
        "data": {"directory": str(dataset.directory.resolve()), "n": int(y.size), "positives": int(y.sum())},
        "folds": per_fold,
        "oof": metrics.summary(yc, sc, threshold),
        "threshold": threshold,
        "target_sensitivity": cfg.target_sensitivity,
        "threshold_confidence": cfg.threshold_confidence,
    }
    plain = ~np.isnan(oof_plain) & covered
    if plain.any():
        report["oof_without_tta"] = {
            "n": int(plain.sum()),
            "auc": metrics.auc(y[plain], oof_plain[plain]),
            "pauc80": metrics.pauc_above_tpr(y[plain], oof_plain[plain]),
        }
    metrics.roc_png(
        work / "roc.png",
        {"out-of-fold": (yc, sc)},
        {f"threshold {threshold:.3f}": report["oof"]["operating_point"]},
        title=f"DermaScan {len(per_fold)} of {cfg.folds} folds, {size_label(cfg.image_size)}",
    )
    (work / "cv_report.json").write_text(json.dumps(report, indent=2))
    return report


def referral_threshold(y: np.ndarray, oof: np.ndarray, fold: np.ndarray, cfg: TrainConfig) -> float:
    """The referral threshold from out-of-fold predictions: the highest one that reaches the
    target sensitivity in ``threshold_confidence`` of bootstrap resamples of the pooled positives
    **and** on each fold's own validation set (each a different group of patients that its model
    never saw: how much sensitivity moves from one cohort to the next)."""
    covered = ~np.isnan(oof)
    threshold = metrics.conservative_threshold(
        y[covered], oof[covered], cfg.target_sensitivity, cfg.threshold_confidence
    )
    for k in np.unique(fold[covered]):
        own = covered & (fold == k)
        if y[own].any():
            threshold = min(threshold, metrics.threshold_for_sensitivity(y[own], oof[own], cfg.target_sensitivity))
    return float(threshold)


def data_fingerprint(data_dir) -> dict:
    """Which data the metrics came from: file names, sizes and sha256 digests."""
    from model.bundle import file_sha256
    from model.data import IMAGE_FILES, METADATA_FILES, find_file

    directory = Path(data_dir)
    out = {"directory": str(directory.resolve())}
    for role, names in (("metadata", METADATA_FILES), ("images", IMAGE_FILES)):
        path = find_file(directory, names)
        out[role] = {"file": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}
    return out


def roc_table(y: np.ndarray, scores: np.ndarray, points: int = 400) -> list[dict]:
    """(threshold, sensitivity, specificity) at up to ``points`` score quantiles, for the admin's
    operating-point page."""
    thresholds = np.unique(np.quantile(scores, np.linspace(0, 1, points)))
    out = []
    for t in thresholds:
        op = metrics.at_threshold(y, scores, float(t))
        out.append(
            {"threshold": float(t), "sensitivity": round(op.sensitivity, 5), "specificity": round(op.specificity, 5)}
        )
    return out


def ensemble(models: list, name: str = "dermascan_ensemble"):
    """One Keras model averaging the members' probabilities (same inputs)."""
    import keras

    if len(models) == 1:
        return models[0]
    first = models[0]
    image_in = keras.Input(first.get_layer("image").output.shape[1:], dtype="uint8", name="image")
    meta_in = keras.Input(first.get_layer("meta").output.shape[1:], dtype="float32", name="meta")
    outputs = []
    for k, member in enumerate(models):
        member.name = f"member_{k}"
        outputs.append(member({"image": image_in, "meta": meta_in}))
    averaged = keras.layers.Average(name="classification_head")(outputs)
    return keras.Model({"image": image_in, "meta": meta_in}, averaged, name=name)


def train(
    data_dir, out_dir, work_dir, cfg: TrainConfig, version: str | None = None, train_folds: list[int] | None = None
) -> dict:
    """Cross-validate (resumable; all folds, or only ``train_folds``), then assemble the bundle
    from the folds that are done."""
    t0 = time.time()
    report = cross_validate(data_dir, work_dir, cfg, train_folds)
    return assemble(data_dir, out_dir, work_dir, cfg, report, version, seconds=time.time() - t0)


def assemble(
    data_dir, out_dir, work_dir, cfg: TrainConfig, report: dict, version: str | None = None, seconds: float = 0.0
) -> dict:
    """The bundle: the finished fold models (the best ``max_members`` by validation AUC)
    averaged in one network, the threshold chosen on their out-of-fold predictions, the CV
    metrics, the ROC table and the data fingerprint."""
    import datetime as dt
    import shutil

    import keras

    work = Path(work_dir)
    spec = FeatureSpec.from_json((work / "feature_spec.json").read_text())
    ranked = sorted(report["folds"], key=lambda f: f["auc"], reverse=True)
    members = ranked[: cfg.max_members] if cfg.max_members else ranked
    in_network = sorted(members, key=lambda f: f["fold"])  # the order of the members in the graph
    models = [  # compile=False: a bundle carries no optimizer state (it would triple its size)
        keras.saving.load_model(work / f"fold{f['fold']}" / "best.keras", compile=False) for f in in_network
    ]
    network = ensemble(models)
    import pandas as pd

    oof = pd.read_csv(work / "oof.csv").dropna(subset=["oof"])
    y, scores = oof.target.to_numpy().astype(int), oof.oof.to_numpy()
    version = version or f"dermascan-{size_label(cfg.image_size)}-{dt.datetime.now(dt.UTC):%Y%m%d%H%M}"
    folds_used = len(report["folds"])
    metrics_block = {
        "data": {
            **data_fingerprint(data_dir),
            "description": f"out-of-fold predictions of {folds_used} of {cfg.folds} StratifiedGroupKFold folds (grouped by patient), "
            f"{'with' if cfg.tta else 'without'} test-time flips",
        },
        "folds": report["folds"],
        "oof": report["oof"],
        "oof_without_tta": report.get("oof_without_tta"),
        "threshold_rule": f"highest threshold with sensitivity >= {cfg.target_sensitivity} in {cfg.threshold_confidence:.0%} "
        "of bootstrap resamples of the out-of-fold positives and on every fold's own out-of-fold predictions",
        "roc_table": roc_table(y, scores),
    }
    threshold, extra = report["threshold"], {"inference": {"tta": cfg.tta}}
    dataset = IsicDataset.open(data_dir, limit=cfg.limit)
    fold = np.load(work / "split.npy") if (work / "split.npy").exists() else np.zeros(len(dataset.ids), int)
    if (fold < 0).any():
        y_all, saved = dataset.targets(), [fold_scores(work, f["fold"], fold) for f in in_network]
        missing = [f["fold"] for f, s in zip(in_network, saved, strict=True) if s is None or s.cal_scores is None]
        if missing:
            raise ValueError(f"fold(s) {missing} have no scores on this calibration set: retrain them")
        scores, validation = [s.cal_scores for s in saved], [s.validation_positives(y_all) for s in saved]
        threshold = with_calibration(metrics_block, extra, calibrate(work, y_all, fold, scores, cfg, validation))
    training = {"members": [f"fold{f['fold']}" for f in in_network], "duration_s": round(seconds, 1)}
    manifest = save_bundle(network, spec, out_dir, data_dir, dataset, fold, cfg, version, threshold, metrics_block, training, extra)  # fmt: skip
    for picture in ("roc.png", "reliability.png"):
        if (work / picture).exists():
            shutil.copy(work / picture, Path(out_dir) / picture)
    return manifest


def with_calibration(metrics_block: dict, extra: dict, cal: dict) -> float:
    """Put what :func:`calibrate` found into a bundle's metrics and manifest; its threshold."""
    extra["calibration"] = cal["manifest"]
    metrics_block["calibration_set"] = cal["metrics"]
    metrics_block["threshold_rule"] = cal["rule"]
    metrics_block["roc_table"] = roc_table(cal["y"], cal["calibrated"])
    metrics_block["score_histogram"] = score_histogram(cal["calibrated"])
    return cal["threshold"]


def save_bundle(
    network, spec, out_dir, data_dir, dataset, fold, cfg: TrainConfig, version, threshold, metrics_block, training, extra,
    gate_members: list[int] | None = None,
) -> dict:  # fmt: skip
    """Fit the gate, write the network, the manifest and the development profile."""
    import keras

    from model import bundle
    from model.reference import write_profile

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    extra["gate"] = fit_gate(network, dataset, fold, cfg, gate_members).manifest_block(Path(out_dir))
    change = fit_change(network, dataset, fold, cfg, gate_members, Path(out_dir))
    if change is not None:
        extra["change"] = change
    training = {"config": asdict(cfg), **training, "keras": keras.__version__, "backend": keras.backend.backend()}
    manifest = bundle.save(
        network,
        spec,
        out_dir,
        version=version,
        threshold=threshold,
        metrics=metrics_block,
        training=training,
        extra=extra,
        weights_dtype=cfg.weights_dtype,
    )
    write_profile(out_dir, data_dir, cfg.image_size, cfg.limit)  # what monitoring compares with
    return manifest


def score_histogram(scores: np.ndarray, bins: int = 20) -> dict:
    """Counts of validation scores in equal bins of [0, 1] (the reference distribution that
    monitoring compares a program's scores with)."""
    counts, edges = np.histogram(np.clip(scores, 0, 1), bins=bins, range=(0.0, 1.0))
    return {"edges": [round(float(e), 4) for e in edges], "counts": counts.astype(int).tolist()}


@dataclass
class FoldScores:
    """What a finished fold saved (``oof.npz``): its TTA scores of its own validation fold and,
    when scored on this calibration set, of the calibration set."""

    index: np.ndarray  # rows of its validation fold
    scores: np.ndarray  # its scores of them
    cal_scores: np.ndarray | None

    def validation_positives(self, y: np.ndarray) -> np.ndarray:
        return self.scores[y[self.index] == 1]


def fold_scores(work: Path, k: int, fold: np.ndarray) -> FoldScores | None:
    """The scores fold ``k`` of a work folder saved, or None while it has not finished."""
    path = Path(work) / f"fold{k}" / "oof.npz"
    if not path.is_file():
        return None
    saved = np.load(path)
    same = "cal_mean" in saved and np.array_equal(saved["cal_index"], np.flatnonzero(fold < 0))
    return FoldScores(saved["index"], saved["mean"], saved["cal_mean"] if same else None)


def calibrate(
    pictures: Path, y: np.ndarray, fold: np.ndarray, per_member: list[np.ndarray], cfg: TrainConfig,
    validation_positives: list[np.ndarray | None] | None = None, level_rule: tuple[float, str] | None = None,
) -> dict:  # fmt: skip
    """On the calibration set (rows no member trained on, ``fold == -1``): the shipped ensemble's
    own scores (the mean of its members' TTA scores ``per_member``, as the averaged graph computes
    them), a calibration map chosen by cross-validated log loss, and the referral threshold on the
    calibrated scores with the bootstrap rule. With ``validation_positives`` (per member, its
    scores of its own validation fold's malignant lesions, or None), the threshold is taken at the
    calibration-set sensitivity that the members' validation folds show corresponds to the target
    on a typical cohort (:func:`model.metrics.transferred_threshold`); with ``level_rule`` (level,
    description) it is taken at that calibration-set sensitivity. Writes the ROC and the
    reliability diagram into ``pictures``."""
    from model import calibration

    cal_idx = np.flatnonzero(fold < 0)
    yc, raw = y[cal_idx], np.mean(per_member, axis=0)
    if yc.sum() == 0 or yc.sum() == yc.size:
        raise ValueError("the calibration set needs malignant and benign lesions: use more data or a larger fraction")
    calibrator, candidates = calibration.choose(yc, raw)
    calibrated = calibrator(raw)
    known = [(m, v) for m, v in zip(per_member, validation_positives or [], strict=False) if v is not None and v.size]
    rule = (f"highest threshold with sensitivity >= {cfg.target_sensitivity} in {cfg.threshold_confidence:.0%} "
            "of bootstrap resamples of the calibration-set positives, on the shipped ensemble's calibrated scores")  # fmt: skip
    level = None
    if level_rule is not None:  # a level chosen by the caller (model.threshold's resampling)
        level, rule = level_rule
        threshold = metrics._at_level(calibrated[yc == 1], level)
    elif known:
        threshold, level = metrics.transferred_threshold(
            calibrated[yc == 1], [m[yc == 1] for m, _ in known], [v for _, v in known],
            cfg.target_sensitivity, cfg.threshold_confidence, seed=cfg.seed,
        )  # fmt: skip
        rule = (f"sensitivity {cfg.target_sensitivity} on a typical cohort: the calibration-set sensitivity that "
                f"matches it for the members on their own validation folds ({level:.3f}), on the shipped ensemble's "
                f"calibrated scores, holding in {cfg.threshold_confidence:.0%} of bootstrap resamples of the "
                "calibration-set and validation-fold positives")  # fmt: skip
    else:
        threshold = metrics.conservative_threshold(yc, calibrated, cfg.target_sensitivity, cfg.threshold_confidence)
    summary = metrics.summary(yc, calibrated, threshold)
    if level is not None:
        summary["threshold_level"] = {
            "calibration_set_sensitivity": level,
            "members_with_validation_scores": len(known),
        }
    summary.update(
        {
            "raw_auc": metrics.auc(yc, raw),
            "ece_raw": calibration.ece(yc, raw),
            "ece": calibration.ece(yc, calibrated),
            "log_loss_raw": calibration.log_loss(yc, raw),
            "log_loss": calibration.log_loss(yc, calibrated),
            "reliability": calibration.reliability(yc, calibrated),
            "candidates": candidates,
        }
    )
    metrics.roc_png(
        pictures / "roc.png",
        {"calibration set (shipped ensemble)": (yc, calibrated)},
        {f"threshold {threshold:.3f}": summary["operating_point"]},
        title=f"DermaScan ensemble of {len(per_member)}, {size_label(cfg.image_size)}: held-out calibration set",
    )
    reliability_png(pictures / "reliability.png", yc, raw, calibrated, calibrator.method)
    log.info(
        "calibration set: %d images (%d malignant), AUC %.4f, %s calibration (ECE %.4f → %.4f), threshold %.4f",
        yc.size, yc.sum(), summary["auc"], calibrator.method, summary["ece_raw"], summary["ece"], threshold,
    )  # fmt: skip
    return {
        "threshold": float(threshold),
        "y": yc,
        "calibrated": calibrated,
        "metrics": summary,
        "manifest": {
            **calibrator.to_dict(),
            "prevalence": float(yc.mean()),
            "n": int(yc.size),
            "ece": summary["ece"],
            "fitted_on": "held-out calibration set (patients no member trained on)",
        },
        "rule": rule,
    }


def reliability_png(path: Path, y: np.ndarray, raw: np.ndarray, calibrated: np.ndarray, method: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from model import calibration

    fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=110)
    ax.plot([0, 1], [0, 1], color="#888", lw=1, ls="--", label="perfect")
    for label, scores, colour in (("raw", raw, "#c0392b"), (method, calibrated, "#1f5fa8")):
        rows = [r for r in calibration.reliability(y, scores) if r["n"]]
        ax.plot(
            [r["mean_probability"] for r in rows],
            [r["observed"] for r in rows],
            marker="o",
            color=colour,
            label=f"{label} (ECE {calibration.ece(y, scores):.3f})",
        )
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed share malignant")
    ax.set_title("Reliability on the calibration set")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def fit_gate(
    network,
    dataset: IsicDataset,
    fold: np.ndarray,
    cfg: TrainConfig,
    feature_members: list[int] | None = None,
    features_of=None,
):
    """The not-assessable gate of this bundle: quality thresholds beyond the development images'
    range, and the feature distance fitted on the development images' features (of all members,
    or of ``feature_members``) with its threshold at ``gate_false_flag_rate`` of the calibration
    set (held-out lesions). Without a calibration set the threshold is taken on the development
    images themselves. ``features_of(pixels)``: where the features come from when not from
    ``network`` (an int8 edge package refits its gate on its own features)."""
    from model import gate_data, quality
    from model.data import resize
    from model.gate import Gate
    from model.ood import FeatureDistance, LesionCheck, feature_network

    sizes = np.zeros((len(dataset.ids), 2), np.float32)
    pixels = dataset.load_images(cfg.image_size, sizes=sizes)
    thresholds = quality.fit_thresholds(quality.measure(pixels, sizes))
    if features_of is None:
        net = feature_network(network, feature_members)

        def features_of(x):
            return image_features(net, x)

    features = features_of(pixels)
    held = fold < 0 if (fold < 0).any() else np.ones(len(pixels), bool)
    distance = FeatureDistance.fit(features[~held] if (~held).any() else features, cfg.gate_components)
    distance.choose_threshold(features[held], cfg.gate_false_flag_rate)
    gate = Gate(thresholds, distance, cfg.gate_false_flag_rate, feature_members=feature_members)
    if cfg.lesion_check_rate is not None:
        fit_kinds, fit_images = gate_data.world(seed=cfg.seed, part="fit")
        fit_pixels = np.stack([resize(img, cfg.image_size) for img in fit_images])
        check = LesionCheck.fit(features[~held] if (~held).any() else features, features_of(fit_pixels))
        check.choose_threshold(features[held], cfg.lesion_check_rate)
        gate.lesion_check = check
        log.info("gate: lesion check fitted against %d photographs and other medical images", len(fit_kinds))
    reasons, _ = gate.reasons(pixels[held], sizes[held], features[held])
    gate.report = {"held_out_lesions": _flag_summary(["lesion"] * len(reasons), reasons)}
    held_ids = [dataset.ids[i] for i in np.flatnonzero(held)[:160]]
    originals = [decode_original(b) for b in dataset.read_bytes(held_ids)]
    kinds, negatives = gate_data.negatives(originals, seed=cfg.seed)
    world_kinds, world_images = gate_data.world(seed=cfg.seed, part="report")  # none of them fitted anything
    kinds, negatives = kinds + world_kinds, negatives + world_images
    neg_pixels = np.stack([resize(img, cfg.image_size) for img in negatives])
    neg_sizes = np.array([[img.shape[1], img.shape[0]] for img in negatives], np.float32)
    neg_reasons, _ = gate.reasons(neg_pixels, neg_sizes, features_of(neg_pixels))
    gate.report["negatives"] = _flag_summary(kinds, neg_reasons)
    log.info(
        "gate: quality %s; feature distance threshold %.3f; flags %.2f%% of held-out lesions, %.1f%% of %d negatives",
        thresholds.to_dict(), distance.threshold, 100 * gate.report["held_out_lesions"]["flagged_share"],
        100 * gate.report["negatives"]["flagged_share"], len(negatives),
    )  # fmt: skip
    return gate


def fit_change(network, dataset: IsicDataset, fold: np.ndarray, cfg: TrainConfig, feature_members, out_dir: Path,
               features: np.ndarray | None = None) -> dict | None:  # fmt: skip
    """The bundle's change measure (:mod:`model.change`), fitted on the development patients'
    same-lesion pairs and reported on the calibration set's; None when the data names too few
    lesions imaged twice (then the bundle compares visits by probability only)."""
    from model import change
    from model.errors import BundleError
    from model.ood import feature_network

    if "lesion_id" not in dataset.metadata.columns:
        log.info("change measure: the data has no lesion_id column; none fitted")
        return None
    if features is None:
        pixels = dataset.load_images(cfg.image_size)
        features = image_features(feature_network(network, feature_members), pixels)
    lesion_ids = list(dataset.metadata["lesion_id"].where(dataset.metadata["lesion_id"].notna(), None))
    held = fold < 0 if (fold < 0).any() else np.zeros(len(fold), bool)
    try:
        measure, report = change.fit(features, lesion_ids, np.flatnonzero(~held), np.flatnonzero(held))
    except BundleError as exc:
        log.info("change measure: %s; none fitted", exc)
        return None
    log.info("change measure: threshold %.3f, flags %s of %d unchanged same-lesion pairs of held-out patients",
             measure.threshold, report["report"]["flagged_share"], report["report"]["pairs"])  # fmt: skip
    described = "images of the same lesion (lesion_id) in the development data, taken as unchanged"
    return change.manifest_block(measure, report, out_dir, described)


def add_change(bundle_dir, data_dir) -> dict:
    """Fit the change measure of an existing bundle on its own development data (the split it was
    trained with) and add it to the bundle's manifest (``dermascan change-fit``)."""
    import json

    from model import bundle as bundle_lib
    from model.combine import read_config
    from model.gate import Gate
    from model.ood import feature_network

    loaded = bundle_lib.load(bundle_dir)
    cfg = read_config(loaded.directory)
    dataset = IsicDataset.open(data_dir, limit=cfg.limit)
    fold = split_rows(dataset.targets(), dataset.groups(), cfg)
    gate = Gate.from_bundle(loaded.directory, loaded.manifest)
    features = image_features(
        feature_network(loaded.network, gate.feature_members), dataset.load_images(cfg.image_size)
    )
    block = fit_change(None, dataset, fold, cfg, None, Path(bundle_dir), features=features)
    if block is None:
        raise ModelError(f"{data_dir}: too few lesions imaged twice to fit a change measure")
    path = Path(bundle_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["change"] = block
    path.write_text(json.dumps(manifest, indent=2))
    return block


def image_features(net, pixels: np.ndarray, batch: int = 64) -> np.ndarray:
    """The image-branch features of a feature network (see ``model.ood.feature_network``);
    the metadata input does not reach them, so it is left at zero."""
    meta_dim = net.get_layer("meta").output.shape[-1]
    out = []
    for i in range(0, len(pixels), batch):
        x = pixels[i : i + batch]
        out.append(np.asarray(net.predict_on_batch({"image": x, "meta": np.zeros((len(x), meta_dim), np.float32)})[1]))
    return np.concatenate(out)


def decode_original(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _flag_summary(kinds: list[str], reasons: list) -> dict:
    """Share flagged overall and per kind (the kind's first word), with the reasons given."""
    per_kind: dict[str, list[int]] = {}
    by_reason: dict[str, int] = {}
    for kind, reason in zip(kinds, reasons, strict=True):
        key = kind.split("-")[0] if not kind.startswith("sample") else "sample"
        if kind.startswith(("degraded", "scene", "medical", "photo")):
            key = "-".join(kind.split("-")[:2])
        per_kind.setdefault(key, [0, 0])
        per_kind[key][0] += reason is not None
        per_kind[key][1] += 1
        if reason is not None:
            by_reason[reason] = by_reason.get(reason, 0) + 1
    flagged = sum(v[0] for v in per_kind.values())
    return {
        "n": len(reasons),
        "flagged": flagged,
        "flagged_share": flagged / max(len(reasons), 1),
        "per_kind": {k: {"flagged": v[0], "n": v[1]} for k, v in sorted(per_kind.items())},
        "reasons": by_reason,
    }
