"""A bundle from finished networks: the ensemble graph, calibration and threshold on the held-out
calibration set, the ROC table and score histogram, the gate and change measure, the manifest."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np

from model import metrics
from model.inference.data import IsicDataset, size_label
from model.inference.features import FeatureSpec
from model.training.config import TrainConfig
from model.training.folds import fold_scores
from model.training.gate_fit import fit_change, fit_gate

log = logging.getLogger(__name__)


def data_fingerprint(data_dir) -> dict:
    """Which data the metrics came from: file names, sizes and sha256 digests."""
    from model.inference.bundle import file_sha256
    from model.inference.data import IMAGE_FILES, METADATA_FILES, find_file

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


def score_histogram(scores: np.ndarray, bins: int = 20) -> dict:
    """Counts of validation scores in equal bins of [0, 1] (the reference distribution that
    monitoring compares a program's scores with)."""
    counts, edges = np.histogram(np.clip(scores, 0, 1), bins=bins, range=(0.0, 1.0))
    return {"edges": [round(float(e), 4) for e in edges], "counts": counts.astype(int).tolist()}


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

    from model.inference import bundle
    from model.inference.reference import write_profile

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
    from model.inference import calibration

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
    if level_rule is not None:  # a level chosen by the caller (model.training.threshold's resampling)
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

    from model.inference import calibration

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
