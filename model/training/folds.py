"""Training one fold network (resumable: a checkpoint every epoch, early stopping and the learning
rate schedule restored on resume), its scores with test-time flips, and cross-validation: every
fold trained, then the out-of-fold summary."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from model import metrics
from model.inference.data import IsicDataset, size_label
from model.inference.features import FeatureSpec
from model.training.config import TrainConfig, split_rows
from model.training.threshold import choose

log = logging.getLogger(__name__)


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


def class_weights(diagnosis: np.ndarray, power: float, classes: int) -> np.ndarray:
    """Each class's weight in the differential's loss: (its count among the rows that have a
    diagnosis)^-power, scaled so that those rows' mean weight is 1 (power 0: all 1; 1: balanced).
    A class absent from the rows gets the largest weight of the others (nothing to weigh)."""
    known = diagnosis[diagnosis >= 0].astype(int)
    if not known.size:
        return np.ones(classes)
    counts = np.bincount(known, minlength=classes).astype(float)
    weights = np.where(counts > 0, np.maximum(counts, 1.0) ** -float(power), 0.0)
    weights /= weights[known].mean()
    weights[counts == 0] = weights.max()
    return weights


@__import__("functools").cache
def _masked_loss_types():
    import keras
    from keras import ops

    def masked(y_true, y_pred, weights=None):
        labels = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        known = ops.cast(labels >= 0, y_pred.dtype)
        safe = ops.maximum(labels, 0)
        loss = keras.losses.sparse_categorical_crossentropy(safe, y_pred)
        if weights is not None:
            loss = loss * ops.take(ops.convert_to_tensor(weights, y_pred.dtype), safe)
        return ops.sum(loss * known) / ops.maximum(ops.sum(known), 1.0)

    @keras.saving.register_keras_serializable(package="dermascan")
    def masked_sparse_crossentropy(y_true, y_pred):
        """Cross-entropy of the differential over the rows that have a diagnosis (label ≥ 0)."""
        return masked(y_true, y_pred)

    @keras.saving.register_keras_serializable(package="dermascan")
    class WeightedMaskedCrossentropy(keras.losses.Loss):
        """The same, each row weighted by its class's weight (:func:`class_weights`), summed over
        the rows that have a diagnosis and divided by their number."""

        def __init__(self, weights, name="weighted_masked_crossentropy", **kwargs):
            super().__init__(name=name, **kwargs)
            self.weights = [float(w) for w in weights]

        def call(self, y_true, y_pred):
            return masked(y_true, y_pred, self.weights)

        def get_config(self):
            return {"weights": self.weights, "name": self.name}

    return masked_sparse_crossentropy, WeightedMaskedCrossentropy


def _masked_loss(weights=None):
    """The differential's loss (registered, so a checkpoint that uses it loads): plain, or with
    each class weighted."""
    plain, weighted = _masked_loss_types()
    return plain if weights is None else weighted(weights)


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


def read_history(path: Path) -> list[dict]:
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

    from model.inference.network import Augmentation, build

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
    history = read_history(hist_path)
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
        from model.inference.diagnosis import CODES

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
        if cfg.warm_start.get(fold_dir.name):
            from model.training.warm_start import copy_weights, source_network

            copy_weights(model, source_network(cfg.warm_start[fold_dir.name]))
        differential_loss = None
        if two:
            weights = None
            if cfg.diagnosis_balance:
                weights = class_weights(diagnosis[train_idx], cfg.diagnosis_balance, len(CODES))
                log.info("%s: differential class weights %s", fold_dir.name, np.round(weights, 3).tolist())
            differential_loss = _masked_loss(weights)
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
            loss=[keras.losses.BinaryCrossentropy(label_smoothing=cfg.label_smoothing), differential_loss]
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
        history = read_history(work / f"fold{k}" / "history.csv")
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
    rule = choose(yc, sc, fold[covered], cfg.target_sensitivity, "out-of-fold scores of the fold networks")
    threshold = rule.threshold
    report = {
        "data": {"directory": str(dataset.directory.resolve()), "n": int(y.size), "positives": int(y.sum())},
        "folds": per_fold,
        "oof": metrics.summary(yc, sc, threshold),
        "threshold": threshold,
        "threshold_rule": rule.description,
        "target_sensitivity": cfg.target_sensitivity,
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
