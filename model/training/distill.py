"""Distillation: one fusion network taught by an ensemble bundle.

The teacher is a bundle trained with ``dermascan train`` (or assembled by ``combine``) on a
patient-grouped split that holds a calibration set out of every member. Each development image is
scored once by the members that did **not** train on it (the members of its own validation fold:
its out-of-fold teacher score, the mean of their test-time flips), and the calibration set is not
scored by the teacher at all. A student — the same NASNetMobile image branch + metadata branch,
one network — then learns on a blend of that soft score and the label::

    target = alpha * teacher + (1 - alpha) * label

Students are trained per fold (on the development rows outside fold k, validated on fold k: these
measure a recipe and give the out-of-fold scores the threshold rule reads) and once on every
development row (``final``: a fixed number of epochs with a cosine schedule, no validation, the
last weights kept) — the network that ships. The calibration patients stay out of teacher and
student alike, so the bundle's calibration map, threshold and gate are fitted on scores of
patients neither ever saw, exactly as for a trained ensemble.

Everything is resumable: ``work/teacher.npz`` is computed once; each student checkpoints every
epoch in ``work/fold<k>/`` or ``work/final/``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from model import metrics
from model.errors import ModelError
from model.inference.data import IsicDataset, size_label
from model.training.config import TrainConfig, split_rows
from model.training.folds import tta_predict, tta_views

log = logging.getLogger(__name__)

TEACHER_FILE = "teacher.npz"
GATE_RATE = 0.0075
FINAL = "final"


@dataclass
class DistillConfig(TrainConfig):
    """A student's training: :class:`TrainConfig` plus the blend of teacher and label."""

    alpha: float = 0.5  # weight of the teacher's soft score in the target (0: labels only)
    lr_schedule: str = "cosine"
    ema_momentum: float | None = 0.99
    label_smoothing: float = 0.0  # the teacher's soft score already softens the target
    # the student's gate: the feature distance and an explicit lesion check, 0.75 % of held-out
    # lesions each, so that together they flag no more held-out lesions than the ensemble's gate
    # did (1.6 %); the quality checks flag a few more
    gate_false_flag_rate: float = GATE_RATE
    lesion_check_rate: float | None = GATE_RATE
    teacher: dict = field(default_factory=dict)  # the teacher bundle's version and weights digest

    @classmethod
    def read(cls, path: Path) -> DistillConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in json.loads(Path(path).read_text()).items() if k in known})


def member_folds(labels: list[str]) -> list[int]:
    """The validation fold of each member, from its label (``<run>/fold<k>``)."""
    out = []
    for label in labels:
        name = label.rsplit("/", 1)[-1]
        if not (name.startswith("fold") and name[4:].isdigit()):
            raise ModelError(f"member {label!r}: its label names no fold, so its out-of-fold rows are unknown")
        out.append(int(name[4:]))
    return out


def teacher_scores(teacher_dir: Path, dataset: IsicDataset, work: Path) -> dict:
    """Out-of-fold teacher scores of every development row (NaN on the calibration set),
    computed once and kept in ``work/teacher.npz``. Returns ``{"soft", "split", "version"}``."""
    from model.inference.bundle import read_manifest
    from model.training.combine import open_source

    path = work / TEACHER_FILE
    manifest = read_manifest(teacher_dir, verify=False)
    if path.is_file():
        saved = np.load(path)
        if str(saved["version"]) == manifest["version"] and saved["soft"].shape == (len(dataset.ids),):
            return {"soft": saved["soft"], "split": saved["split"], "version": str(saved["version"])}
        raise ModelError(
            f"{path}: made by teacher {saved['version']}, not {manifest['version']}: use a new work folder"
        )
    source = open_source(Path(teacher_dir), dataset)
    split = source.split
    folds = member_folds(source.labels)
    if not (split < 0).any():
        raise ModelError(f"{teacher_dir}: its members hold out no calibration set; a student needs one")
    needed = sorted(set(np.unique(split[split >= 0]).tolist()))
    if sorted(set(folds)) != needed:
        raise ModelError(f"{teacher_dir}: members cover folds {sorted(set(folds))}, the split has {needed}")
    soft = np.full(len(dataset.ids), np.nan)
    meta = source.spec.transform(dataset.metadata)
    for k in needed:
        rows = np.flatnonzero(split == k)
        images = dataset.load_images(source.cfg.image_size, ids=[dataset.ids[i] for i in rows])
        scores = [
            tta_predict(model, images, meta[rows], tta=source.cfg.tta)[0]
            for model, fold in zip(source.models, folds, strict=True)
            if fold == k
        ]
        soft[rows] = np.mean(scores, axis=0)
        log.info(
            "teacher: fold %d scored by %d member(s), AUC %.4f", k, len(scores),
            metrics.auc(dataset.targets()[rows], soft[rows]),
        )  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    np.savez(path, soft=soft, split=split, version=np.array(manifest["version"]))
    return {"soft": soft, "split": split, "version": manifest["version"]}


def blend(y: np.ndarray, soft: np.ndarray, alpha: float) -> np.ndarray:
    """The student's target: the teacher's soft score and the label, weighted by ``alpha``; rows
    the teacher did not score (the calibration set) keep their label (and are never trained on)."""
    out = y.astype(np.float64).copy()
    known = ~np.isnan(soft)
    out[known] = alpha * soft[known] + (1.0 - alpha) * y[known]
    return out


def same_recipe(work: Path, cfg: DistillConfig) -> None:
    """Refuse to resume a work folder with another recipe than it was started with: its finished
    students were trained on the old one, so its report, and ``compare``, would name the wrong one."""
    path = work / "config.json"
    if not path.is_file():
        return
    before = DistillConfig.read(path)
    changed = [
        f"{f.name} {getattr(before, f.name)!r} → {getattr(cfg, f.name)!r}"
        for f in fields(DistillConfig)
        if f.name not in ("verbose", "teacher") and getattr(before, f.name) != getattr(cfg, f.name)
    ]
    if changed:
        raise ModelError(
            f"{work} was started with another recipe ({'; '.join(changed)}): resume it with the options it "
            "was started with, or give this recipe a new work folder"
        )


def distill(
    data_dir, teacher_dir, work_dir, cfg: DistillConfig, folds: list[int] | None = None, final: bool = True
) -> dict:
    """Train (or resume) the fold students ``folds`` and, with ``final``, the student on every
    development row. Returns a summary of the finished students."""
    from model.inference.features import FeatureSpec
    from model.training.folds import train_fold

    if final and cfg.lr_schedule != "cosine":  # said before the teacher is scored, not after
        raise ModelError(
            f"lr_schedule {cfg.lr_schedule!r}: the final student has no validation rows to plateau on "
            "(train fold students only, or use cosine)"
        )
    work = Path(work_dir)
    same_recipe(work, cfg)
    work.mkdir(parents=True, exist_ok=True)
    dataset = IsicDataset.open(data_dir, limit=cfg.limit)
    y = dataset.targets()
    teacher = teacher_scores(Path(teacher_dir), dataset, work)
    split = split_rows(y, dataset.groups(), cfg)
    if not np.array_equal(split, teacher["split"]):
        raise ModelError(
            "the student's split (seed, folds, calibration fraction) differs from the teacher's: "
            "the calibration patients would not stay out of both"
        )
    from model.inference.bundle import read_manifest

    manifest = read_manifest(teacher_dir, verify=False)
    cfg.teacher = {"version": manifest["version"], "weights_sha256": manifest["weights_sha256"]}
    (work / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    np.save(work / "split.npy", split)
    spec_path = work / "feature_spec.json"
    spec = FeatureSpec.from_json(spec_path.read_text()) if spec_path.exists() else FeatureSpec.fit(dataset.metadata)
    spec_path.write_text(spec.to_json())
    targets = blend(y, teacher["soft"], cfg.alpha)
    diagnosis = None
    if cfg.diagnosis_weight > 0:
        from model.inference.diagnosis import labels

        diagnosis = labels(dataset.metadata)
        if not (diagnosis[split >= 0] >= 0).any():
            raise ModelError(f"{data_dir}: no row has a diagnosis (diagnosis, iddx_3 or iddx_2) for the differential")
    todo = [k for k in (folds or []) if not (work / f"fold{k}" / "oof.npz").exists()]
    want_final = final and not (work / FINAL / "cal.npz").exists()
    if todo or want_final:
        t0 = time.time()
        x = {"image": dataset.load_images(cfg.image_size), "meta": spec.transform(dataset.metadata)}
        log.info("decoded %d images at %s in %.1f s", y.size, size_label(cfg.image_size), time.time() - t0)
        cal_idx = np.flatnonzero(split < 0)
        for k in todo:
            train_idx, val_idx = np.flatnonzero((split != k) & (split >= 0)), np.flatnonzero(split == k)
            model = train_fold(k, cfg, work, spec, x, y, train_idx, val_idx, targets=targets, diagnosis=diagnosis)
            views, classes = tta_views(model, x["image"][val_idx], x["meta"][val_idx], tta=cfg.tta)
            cal_views, cal_classes = tta_views(model, x["image"][cal_idx], x["meta"][cal_idx], tta=cfg.tta)
            extra = {} if classes is None else {"classes": classes, "cal_classes": cal_classes}
            np.savez(
                work / f"fold{k}" / "oof.npz", mean=views.mean(0), spread=views.std(0), plain=views[0], index=val_idx,
                cal_mean=cal_views.mean(0), cal_spread=cal_views.std(0), cal_plain=cal_views[0], cal_index=cal_idx,
                **extra,
            )  # fmt: skip
            del model
        if want_final:
            train_idx = np.flatnonzero(split >= 0)
            model = train_fold(
                -1, cfg, work, spec, x, y, train_idx, np.zeros(0, int), targets=targets, folder=FINAL,
                diagnosis=diagnosis,
            )  # fmt: skip
            views, classes = tta_views(model, x["image"][cal_idx], x["meta"][cal_idx], tta=cfg.tta)
            extra = {} if classes is None else {"classes": classes}
            np.savez(
                work / FINAL / "cal.npz", mean=views.mean(0), spread=views.std(0), plain=views[0], index=cal_idx,
                **extra,
            )  # fmt: skip
            del model
    return report(work, dataset, split, teacher["soft"])


def report(work: Path, dataset: IsicDataset, split: np.ndarray, soft: np.ndarray) -> dict:
    """Each finished student on its validation fold and on the calibration set, beside the
    teacher's out-of-fold scores of the same rows (``work/distill_report.json``)."""
    from model.training.folds import read_history

    y = dataset.targets()
    cal = np.flatnonzero(split < 0)
    out: dict = {"students": [], "teacher_oof_auc": metrics.auc(y[split >= 0], soft[split >= 0])}
    for k in sorted(int(p.name[4:]) for p in work.glob("fold*") if p.name[4:].isdigit()):
        path = work / f"fold{k}" / "oof.npz"
        if not path.is_file():
            continue
        saved = np.load(path)
        idx = saved["index"]
        history = read_history(work / f"fold{k}" / "history.csv")
        out["students"].append({
            "student": f"fold{k}",
            "validation_auc": metrics.auc(y[idx], saved["mean"]),
            "validation_pauc80": metrics.pauc_above_tpr(y[idx], saved["mean"]),
            "teacher_validation_auc": metrics.auc(y[idx], soft[idx]),
            "calibration_set_auc": metrics.auc(y[cal], saved["cal_mean"]),
            "calibration_set_pauc80": metrics.pauc_above_tpr(y[cal], saved["cal_mean"]),
            "epochs_run": len(history),
            "validation_auc_by_epoch": [round(h["val_auc"], 4) for h in history],
        })  # fmt: skip
    if (work / FINAL / "cal.npz").is_file():
        saved = np.load(work / FINAL / "cal.npz")
        out["students"].append({
            "student": FINAL,
            "calibration_set_auc": metrics.auc(y[cal], saved["mean"]),
            "calibration_set_pauc80": metrics.pauc_above_tpr(y[cal], saved["mean"]),
        })  # fmt: skip
    for row in out["students"]:
        log.info("student %s: %s", row["student"], {k: v for k, v in row.items() if k != "student"})
    (work / "distill_report.json").write_text(json.dumps(out, indent=2))
    return out


def compare(data_dir, work_dirs, fold: int = 0, n_boot: int = 2000) -> list[dict]:
    """The fold-``fold`` students of several distill runs (one recipe each), on the same rows: each
    one's validation and calibration-set AUC and pAUC80, and its paired difference from the first
    run's student (bootstrap over patients, the same resample for both), with the teacher's
    out-of-fold scores of the validation rows as the first line. A run whose split or rows differ
    is refused: its numbers would not be of the same patients."""
    works = [Path(w) for w in work_dirs]
    if not works:
        raise ModelError("no distill work folders to compare")
    saved, labels, configs = [], [], []
    for work in works:
        path = work / f"fold{fold}" / "oof.npz"
        if not path.is_file():
            raise ModelError(f"{work}: no finished fold-{fold} student ({path.relative_to(work)} is missing)")
        saved.append(np.load(path))
        cfg = DistillConfig.read(work / "config.json")
        configs.append(cfg)
        wb = cfg.augmentation.get("white_balance")
        augment = f"camera (white balance ±{wb:g})" if wb else "strong" if cfg.augmentation else "standard"
        ema = f"EMA {cfg.ema_momentum}" if cfg.ema_momentum else "no EMA"
        seed = "" if cfg.init_seed is None else f", init seed {cfg.init_seed}"
        seed += f", differential weight {cfg.diagnosis_weight:g}" if cfg.diagnosis_weight else ""
        seed += f", balance {cfg.diagnosis_balance:g}" if cfg.diagnosis_balance else ""
        labels.append(
            f"{work.name}: {size_label(cfg.image_size)}, {cfg.epochs} epochs, {augment}, {ema}, {cfg.lr_schedule}{seed}"
        )
    split = np.load(works[0] / "split.npy")
    for work, found in zip(works[1:], saved[1:]):
        if not np.array_equal(np.load(work / "split.npy"), split) or not (
            np.array_equal(found["index"], saved[0]["index"])
            and np.array_equal(found["cal_index"], saved[0]["cal_index"])
        ):
            raise ModelError(f"{work}: another split or other rows than {works[0]}: not comparable")
    dataset = IsicDataset.open(data_dir, limit=configs[0].limit)
    y, groups = dataset.targets(), dataset.groups()
    if y.size != split.size:
        raise ModelError(f"{data_dir}: {y.size} rows, the runs were made on {split.size}")
    val, cal = saved[0]["index"], saved[0]["cal_index"]
    teacher = np.load(works[0] / TEACHER_FILE)["soft"][val]
    rows = [{"student": "teacher (out-of-fold)", "validation_auc": metrics.auc(y[val], teacher),
             "validation_pauc80": metrics.pauc_above_tpr(y[val], teacher)}]  # fmt: skip
    for label, found in zip(labels, saved):
        row = {
            "student": label,
            "validation_auc": metrics.auc(y[val], found["mean"]),
            "validation_pauc80": metrics.pauc_above_tpr(y[val], found["mean"]),
            "calibration_set_auc": metrics.auc(y[cal], found["cal_mean"]),
            "calibration_set_pauc80": metrics.pauc_above_tpr(y[cal], found["cal_mean"]),
        }
        if found is not saved[0]:
            for part, idx, key in (("validation", val, "mean"), ("calibration_set", cal, "cal_mean")):
                for name, metric in (("auc", metrics.auc), ("pauc80", metrics.pauc_above_tpr)):
                    row[f"{part}_{name}_vs_first"] = metrics.paired_difference(
                        metric, y[idx], saved[0][key], found[key], groups[idx], n_boot
                    )
        rows.append(row)
    return rows


# Stronger colour and scale augmentation for a student (the "try" list): zoom ±20 %,
# brightness/contrast/saturation ±20 %; rotation, flips and cutout as standard.
STRONG_AUGMENTATION = {"zoom": 0.2, "brightness": 0.2, "contrast": 0.2, "saturation": 0.2}


def ruler_of(work: Path, split: np.ndarray, final: dict, y: np.ndarray, groups: np.ndarray):
    """The held-out scores the calibration and the threshold are fitted on: with the fold students
    of every development fold finished, each development image scored by the fold student that did
    not train on it (its TTA mean, its plain view, its class probabilities) and the calibration set
    by the final student; else the calibration set alone. Returns (rows, parts, TTA scores, plain
    scores, class probabilities or None, what it is in words)."""
    cal_idx = np.flatnonzero(split < 0)
    folds = sorted(set(split[split >= 0].tolist()))
    found = [np.load(work / f"fold{k}" / "oof.npz") for k in folds if (work / f"fold{k}" / "oof.npz").is_file()]
    classes_final = final["classes"] if "classes" in final.files else None
    if len(found) == len(folds) and folds:
        rows = np.concatenate([f["index"] for f in found] + [cal_idx])
        parts = np.concatenate(
            [np.full(len(f["index"]), k) for k, f in zip(folds, found, strict=True)] + [np.full(len(cal_idx), -1)]
        )
        mean = np.concatenate([f["mean"] for f in found] + [final["mean"]])
        plain = np.concatenate([f["plain"] for f in found] + [final["plain"]])
        classes = None
        if classes_final is not None and all("classes" in f.files for f in found):
            classes = np.concatenate([f["classes"] for f in found] + [classes_final])
        what = (f"each of the {len(rows) - len(cal_idx)} development images scored by the fold student that did not "
                f"train on it, and the {len(cal_idx)} calibration images by the final student")  # fmt: skip
        return rows, parts, mean, plain, classes, what
    from model.training.threshold import grouped_parts

    log.warning("%s: not every fold student has finished: the ruler is the calibration set alone", work)
    parts = grouped_parts(groups[cal_idx], y[cal_idx])
    return cal_idx, parts, final["mean"], final["plain"], classes_final, "the final student's held-out calibration set"


def tta_choice(y: np.ndarray, with_flips: np.ndarray, plain: np.ndarray, gain: float = 0.002) -> tuple[bool, dict]:
    """Keep the four flips only when they buy at least ``gain`` of AUC on the calibration set:
    they cost four forward passes instead of one."""
    auc_flips, auc_plain = metrics.auc(y, with_flips), metrics.auc(y, plain)
    keep = auc_flips - auc_plain >= gain
    return keep, {"auc_with_flips": auc_flips, "auc_plain": auc_plain, "required_gain": gain, "kept": keep}


def assemble(data_dir, out_dir, work_dir, version: str | None = None, teacher_dir=None) -> dict:
    """The student bundle: the final student's network; on the held-out calibration set its
    calibration map, the flips if they earn their cost, the referral threshold at the level that
    resampling shows lands on target for new patients (:mod:`model.training.threshold`), and the gate fitted
    on the student's own features."""
    import datetime as dt

    import keras

    from model.inference.features import FeatureSpec
    from model.training.assemble import Ruler, calibrate, data_fingerprint, save_bundle, with_calibration

    work = Path(work_dir)
    cfg = DistillConfig.read(work / "config.json")
    # the gate is fitted when the bundle is assembled: today's rates, whatever the run started with
    cfg.gate_false_flag_rate, cfg.lesion_check_rate = GATE_RATE, GATE_RATE
    if not (work / FINAL / "cal.npz").is_file():
        raise ModelError(f"{work}: the final student has not finished (no {FINAL}/cal.npz)")
    dataset = IsicDataset.open(data_dir, limit=cfg.limit)
    y, groups = dataset.targets(), dataset.groups()
    split = np.load(work / "split.npy")
    teacher = np.load(work / TEACHER_FILE)
    cal_idx = np.flatnonzero(split < 0)
    saved = np.load(work / FINAL / "cal.npz")
    ruler_rows, parts, with_flips, plain, classes, what = ruler_of(work, split, saved, y, groups)
    keep_flips, tta_report = tta_choice(y[ruler_rows], with_flips, plain)
    cfg.tta = keep_flips
    raw = with_flips if keep_flips else plain
    ruler = Ruler(y[ruler_rows], raw, parts, what)
    shipped = (y[cal_idx], saved["mean"] if keep_flips else saved["plain"])
    cal = calibrate(work, ruler, cfg, shipped=shipped)
    model = keras.saving.load_model(work / FINAL / "last.keras", compile=False)
    spec = FeatureSpec.from_json((work / "feature_spec.json").read_text())
    version = version or f"dermascan-student{size_label(cfg.image_size)}-{dt.datetime.now(dt.UTC):%Y%m%d%H%M}"
    teacher_cal = {}
    if teacher_dir is not None:
        from model.inference.bundle import read_manifest

        teacher_cal = read_manifest(teacher_dir, verify=False).get("metrics", {}).get("calibration_set", {})
    metrics_block = {
        "data": {
            **data_fingerprint(data_dir),
            "description": "one network distilled from the teacher's out-of-fold scores on every development row; "
            "the calibration set held out of teacher and student",
        },
        "teacher_on_calibration_set": {
            k: teacher_cal.get(k) for k in ("auc", "auc_ci95", "pauc80", "pauc80_ci95", "ece")
        },
        "tta": tta_report,
        "students": report(work, dataset, split, teacher["soft"])["students"],
    }
    extra = {"inference": {"tta": keep_flips}}
    with_calibration(metrics_block, extra, cal)
    if classes is not None:
        from model.inference import diagnosis

        extra["diagnosis"] = diagnosis.fit_block(diagnosis.labels(dataset.metadata)[ruler_rows], classes, parts)
    training = {"members": ["student"], "teacher": cfg.teacher, "distilled": True}
    manifest = save_bundle(model, spec, out_dir, data_dir, dataset, split, cfg, version, cal["threshold"], metrics_block, training, extra)  # fmt: skip
    from model.training.missing_fit import fit_bundle

    manifest["missing_metadata"] = fit_bundle(out_dir, data_dir)
    import shutil

    for picture in ("roc.png", "reliability.png"):
        if (work / picture).exists():
            shutil.copy(work / picture, Path(out_dir) / picture)
    return manifest
