"""One bundle from the members of several training runs on the same split.

Runs of ``dermascan train`` on the same data with the same seed, number of folds and calibration
fraction hold the same patients out of every member (the calibration set). Their members can
therefore be averaged in one ensemble whose calibration-set scores are still held out: the
calibration map, the referral threshold and the not-assessable gate are fitted on them exactly as
``train`` fits them for one run. This is how two runs that differ in one setting (say, with and
without an average of the weights) become one stronger ensemble without training again.

A source is a training work folder (its finished folds' ``best.keras``) or a bundle folder (its
members). Every source must agree on the split, the metadata encoding and the image size; the
split is compared row by row, so a source trained on other data, or with another seed, is refused.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from model import metrics
from model.errors import ModelError
from model.inference.data import IsicDataset
from model.inference.features import FeatureSpec
from model.training.assemble import Ruler, calibrate, data_fingerprint, ensemble, save_bundle, with_calibration
from model.training.config import TrainConfig, read_config, split_rows
from model.training.folds import fold_scores, tta_predict

log = logging.getLogger(__name__)


@dataclass
class Source:
    path: Path
    cfg: TrainConfig
    spec: FeatureSpec
    labels: list[str]  # one per member: "<source>/fold<k>"
    models: list  # keras models, in member order
    folds: list[dict]  # each member's fold report (its own validation fold)
    oof: dict | None  # the run's pooled out-of-fold metrics, when known
    split: np.ndarray | None = None
    cal_scores: list | None = None  # each member's TTA scores on the calibration set, when saved
    validation_positives: list | None = None  # each member's scores of its validation fold's malignant lesions


def _fold_number(name: str) -> int:
    return int(name[4:]) if name.startswith("fold") and name[4:].isdigit() else 0


def _is_bundle(path: Path) -> bool:
    return (path / "manifest.json").is_file()


def open_source(path: Path, dataset: IsicDataset) -> Source:
    """The members of a bundle or of a training work folder, with their split."""
    import keras

    cfg = read_config(path)
    if _is_bundle(path):
        from model.inference import bundle

        loaded = bundle.load(path)
        manifest = loaded.manifest
        nested = [layer for layer in loaded.network.layers if isinstance(layer, keras.Model)] or [loaded.network]
        # the network holds its members in fold order (see ``model.training.assemble.assemble``)
        names = sorted(manifest.get("training", {}).get("members") or [], key=_fold_number)
        names = names if len(names) == len(nested) else [f"member{k}" for k in range(len(nested))]
        by_name = {f"fold{f['fold']}": f for f in manifest.get("metrics", {}).get("folds", [])}
        split = split_rows(dataset.targets(), dataset.groups(), cfg)
        return Source(
            path, cfg, loaded.spec, [f"{manifest['version']}/{n}" for n in names], nested,
            [by_name.get(n, {}) for n in names], manifest.get("metrics", {}).get("oof"), split,
        )  # fmt: skip
    if not (path / "split.npy").is_file() or not (path / "feature_spec.json").is_file():
        raise ModelError(f"{path}: not a training work folder with a split (split.npy, feature_spec.json)")
    split = np.load(path / "split.npy")
    y = dataset.targets()
    folds, finished = [], []
    for k in range(cfg.folds):  # the finished folds: a run still training the next one can join
        saved = fold_scores(path, k, split)
        if saved is not None and (path / f"fold{k}" / "best.keras").is_file():
            folds.append({"fold": k, "n_val": int(saved.index.size), "auc": metrics.auc(y[saved.index], saved.scores),
                          "pauc80": metrics.pauc_above_tpr(y[saved.index], saved.scores)})  # fmt: skip
            finished.append(saved)
    if not folds:
        raise ModelError(f"{path}: no finished fold")
    models = [keras.saving.load_model(path / f"fold{f['fold']}" / "best.keras", compile=False) for f in folds]
    spec = FeatureSpec.from_json((path / "feature_spec.json").read_text())
    labels = [f"{path.name}/fold{f['fold']}" for f in folds]
    oof = None
    if (path / "cv_report.json").is_file():
        oof = json.loads((path / "cv_report.json").read_text()).get("oof")
    cal_scores = [f.cal_scores for f in finished]
    return Source(
        path, cfg, spec, labels, models, folds, oof, split, cal_scores, [f.validation_positives(y) for f in finished]
    )


def combine(data_dir, out_dir, paths: list[Path], version: str, gate_members: list[int] | None = None) -> dict:
    """Average the members of ``paths`` (bundles or work folders) into one bundle at ``out_dir``.

    The calibration set is scored once by every member (with the test-time flips); the map,
    the threshold and the gate are fitted as in training. ``gate_members``: the members (by
    position in the combined ensemble) whose features the gate reads — all of them by default.
    """
    paths = [Path(p) for p in paths]
    out = Path(out_dir).resolve()
    if len(paths) < 2:
        raise ModelError("combine needs at least two sources")
    if any(p.resolve() == out for p in paths):
        raise ModelError(f"{out_dir}: the output folder is one of the sources")
    configs = [read_config(p) for p in paths]
    cfg = configs[0]
    for p, c in zip(paths[1:], configs[1:], strict=True):
        for name in ("image_size", "folds", "seed", "calibration_fraction", "limit", "tta"):
            if getattr(c, name) != getattr(cfg, name):
                raise ModelError(f"{p}: {name} is {getattr(c, name)!r}, the first source's is {getattr(cfg, name)!r}")
    dataset = IsicDataset.open(data_dir, limit=cfg.limit)
    y = dataset.targets()
    sources = []
    for p in paths:
        src = open_source(p, dataset)
        if src.split is None or src.split.shape != y.shape:
            raise ModelError(f"{p}: its split does not cover this data ({len(y)} rows)")
        if sources and not np.array_equal(src.split, sources[0].split):
            raise ModelError(f"{p}: trained on another split than {paths[0]} (other data, seed or folds)")
        if sources and src.spec != sources[0].spec:
            raise ModelError(f"{p}: encodes the metadata differently from {paths[0]}")
        sources.append(src)
        log.info("%s: %d members", p, len(src.models))
    fold = sources[0].split
    cal_idx = np.flatnonzero(fold < 0)
    if not cal_idx.size:
        raise ModelError("the sources hold out no calibration set (trained with --calibration-fraction 0)")
    models = [m for s in sources for m in s.models]
    labels = [label for s in sources for label in s.labels]
    saved = [c for s in sources for c in (s.cal_scores or [None] * len(s.models))]
    if gate_members is not None and not set(gate_members) <= set(range(len(models))):
        raise ModelError(f"gate members {gate_members}: the ensemble has members 0..{len(models) - 1}")
    images = meta = None
    per_member, on_cal = [], []
    for label, model, scores in zip(labels, models, saved, strict=True):
        if scores is None:  # scored here, with the same flips as training scores them
            if images is None:
                images = dataset.load_images(cfg.image_size, ids=[dataset.ids[i] for i in cal_idx])
                meta = sources[0].spec.transform(dataset.metadata.iloc[cal_idx])
            scores = tta_predict(model, images, meta, tta=cfg.tta)[0]
        per_member.append(scores)
        on_cal.append({"member": label, "auc": metrics.auc(y[cal_idx], scores),
                       "pauc80": metrics.pauc_above_tpr(y[cal_idx], scores)})  # fmt: skip
        log.info("%s on the calibration set: AUC %.4f", label, on_cal[-1]["auc"])
    network = ensemble(models, name="dermascan_ensemble")
    out.mkdir(parents=True, exist_ok=True)
    metrics_block = {
        "data": {
            **data_fingerprint(data_dir),
            "description": f"members of {len(sources)} training runs on one patient-grouped split; "
            "the calibration set is held out of every member",
        },
        "folds": [{**f, "member": label} for s in sources for label, f in zip(s.labels, s.folds, strict=True)],
        "members_on_calibration_set": on_cal,
        "sources": [
            {
                "path": str(s.path),
                "members": s.labels,
                "oof": s.oof,
                "ema_momentum": s.cfg.ema_momentum,
                "epochs": s.cfg.epochs,
            }
            for s in sources
        ],  # fmt: skip
    }
    extra = {"inference": {"tta": cfg.tta}}
    ruler = Ruler.calibration_set(
        y, dataset.groups(), fold, np.mean(per_member, axis=0), "the ensemble's held-out calibration set"
    )
    threshold = with_calibration(metrics_block, extra, calibrate(out, ruler, cfg))
    training = {"members": labels, "combined_from": [str(p) for p in paths]}
    return save_bundle(
        network, sources[0].spec, out, data_dir, dataset, fold, cfg, version, threshold, metrics_block, training, extra,
        gate_members=gate_members,
    )  # fmt: skip


def unpack(bundle_dir, data_dir, work_dir) -> Path:
    """Re-create a training work folder from a bundle: its members as the fold checkpoints, their
    scores of their own validation folds and of the calibration set computed again, the split,
    metadata encoding and configuration it was trained with. ``dermascan train --work-dir`` on
    that folder then trains nothing and assembles the bundle again — with today's calibration,
    threshold rule and gate — which is how a bundle made before a rule changed gets the new rule."""
    from model.inference.bundle import file_sha256, read_manifest
    from model.inference.data import METADATA_FILES, find_file

    bundle_dir, work = Path(bundle_dir), Path(work_dir)
    trained_on = read_manifest(bundle_dir, verify=False).get("metrics", {}).get("data", {}).get("metadata", {})
    if trained_on.get("sha256") != file_sha256(find_file(Path(data_dir), METADATA_FILES)):
        raise ModelError(f"{data_dir}: not the data {bundle_dir} was trained on (metadata digest differs)")
    cfg = read_config(bundle_dir)
    dataset = IsicDataset.open(data_dir, limit=cfg.limit)
    source = open_source(bundle_dir, dataset)
    folds = [_fold_number(label.rsplit("/", 1)[-1]) for label in source.labels]
    if sorted(folds) != sorted(set(folds)):
        raise ModelError(f"{bundle_dir}: its members do not name distinct folds")
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    (work / "feature_spec.json").write_text(source.spec.to_json())
    np.save(work / "split.npy", source.split)
    images = dataset.load_images(cfg.image_size)
    meta = source.spec.transform(dataset.metadata)
    cal_idx = np.flatnonzero(source.split < 0)
    for k, model in zip(folds, source.models, strict=True):
        val_idx = np.flatnonzero(source.split == k)
        (work / f"fold{k}").mkdir(exist_ok=True)
        model.save(work / f"fold{k}" / "best.keras")
        mean, spread, plain = tta_predict(model, images[val_idx], meta[val_idx], tta=cfg.tta)
        cal = tta_predict(model, images[cal_idx], meta[cal_idx], tta=cfg.tta)
        np.savez(
            work / f"fold{k}" / "oof.npz", mean=mean, spread=spread, plain=plain, index=val_idx,
            cal_mean=cal[0], cal_spread=cal[1], cal_plain=cal[2], cal_index=cal_idx,
        )  # fmt: skip
        log.info(
            "fold %d: AUC %.4f on its validation fold (scored again)", k, metrics.auc(dataset.targets()[val_idx], mean)
        )
    return work
