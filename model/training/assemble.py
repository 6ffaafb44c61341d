"""A bundle from finished networks: the ensemble graph, calibration and threshold on the held-out
calibration set, the ROC table and score histogram, the gate and change measure, the manifest."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
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
        "threshold_rule": report["threshold_rule"],
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
        raw = np.mean([s.cal_scores for s in saved], axis=0)  # as the averaged graph computes them
        ruler = Ruler.calibration_set(y_all, dataset.groups(), fold, raw, "the ensemble's held-out calibration set")
        threshold = with_calibration(metrics_block, extra, calibrate(work, ruler, cfg))
    training = {"members": [f"fold{f['fold']}" for f in in_network], "duration_s": round(seconds, 1)}
    manifest = save_bundle(network, spec, out_dir, data_dir, dataset, fold, cfg, version, threshold, metrics_block, training, extra)  # fmt: skip
    for picture in ("roc.png", "reliability.png"):
        if (work / picture).exists():
            shutil.copy(work / picture, Path(out_dir) / picture)
    return manifest


def with_calibration(metrics_block: dict, extra: dict, cal: dict) -> float:
    """Put what :func:`calibrate` found into a bundle's metrics and manifest; its threshold."""
    from model.training.threshold import cohort_spread

    extra["calibration"] = cal["manifest"]
    metrics_block["ruler"] = cal["metrics"]
    metrics_block["calibration_set"] = cal["shipped"] or cal["metrics"]
    metrics_block["threshold_rule"] = cal["rule"].description
    metrics_block["cohort_spread"] = cohort_spread(cal["rule"])
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


@dataclass
class Ruler:
    """Held-out scores of the shipped recipe that the calibration map and the threshold are fitted
    on: each row's label, raw score (the TTA mean, as the bundle computes it), its patient-disjoint
    part, and what the ruler is, in words."""

    y: np.ndarray
    raw: np.ndarray
    parts: np.ndarray
    what: str

    @classmethod
    def calibration_set(cls, y: np.ndarray, groups: np.ndarray, fold: np.ndarray, raw: np.ndarray, what: str) -> Ruler:
        """The held-out calibration set alone (its patient-grouped parts for the rule's check)."""
        from model.training.threshold import grouped_parts

        rows = np.flatnonzero(fold < 0)
        return cls(y[rows], np.asarray(raw, np.float64), grouped_parts(groups[rows], y[rows]), what)


def calibrate(
    pictures: Path, ruler: Ruler, cfg: TrainConfig, shipped: tuple[np.ndarray, np.ndarray] | None = None
) -> dict:
    """On the ruler: a calibration map chosen by cross-validated log loss, then the referral
    threshold on the calibrated scores by the one rule (:mod:`model.training.threshold`).
    ``shipped``: (labels, raw scores) of the shipped network on its own held-out set, reported at
    the threshold beside the ruler. Writes the ROC and the reliability diagram into ``pictures``."""
    from model.inference import calibration
    from model.training import threshold as rule_of

    y, raw = ruler.y, ruler.raw
    if y.sum() == 0 or y.sum() == y.size:
        raise ValueError("the ruler needs malignant and benign lesions: use more data or a larger calibration fraction")
    calibrator, candidates = calibration.choose(y, raw)
    calibrated = calibrator(raw)
    rule = rule_of.choose(y, calibrated, ruler.parts, cfg.target_sensitivity, ruler.what)
    summary = metrics.summary(y, calibrated, rule.threshold)
    summary.update({
        "raw_auc": metrics.auc(y, raw), "ece_raw": calibration.ece(y, raw), "ece": calibration.ece(y, calibrated),
        "log_loss_raw": calibration.log_loss(y, raw), "log_loss": calibration.log_loss(y, calibrated),
        "reliability": calibration.reliability(y, calibrated), "candidates": candidates, "rule": rule.as_dict(),
    })  # fmt: skip
    curves = {f"ruler ({ruler.what})": (y, calibrated)}
    shipped_summary = None
    if shipped is not None:
        ys, scores = shipped
        shipped_summary = metrics.summary(ys, calibrator(scores), rule.threshold)
        shipped_summary["ece"] = calibration.ece(ys, calibrator(scores))
        curves["the shipped network on its own held-out set"] = (ys, calibrator(scores))
    metrics.roc_png(
        pictures / "roc.png", curves, {f"threshold {rule.threshold:.3f}": summary["operating_point"]},
        title=f"DermaScan, {size_label(cfg.image_size)}: the ruler and the threshold",
    )  # fmt: skip
    reliability_png(pictures / "reliability.png", y, raw, calibrated, calibrator.method)
    log.info(
        "ruler: %d images (%d malignant), AUC %.4f, %s calibration (ECE %.4f → %.4f), threshold %.4f; %s",
        y.size, y.sum(), summary["auc"], calibrator.method, summary["ece_raw"], summary["ece"], rule.threshold,
        rule.description,
    )  # fmt: skip
    return {
        "threshold": rule.threshold, "rule": rule, "y": y, "calibrated": calibrated, "metrics": summary,
        "shipped": shipped_summary,
        "manifest": {
            **calibrator.to_dict(), "prevalence": float(y.mean()), "n": int(y.size), "ece": summary["ece"],
            "fitted_on": f"the ruler: {ruler.what}",
        },
    }  # fmt: skip


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
