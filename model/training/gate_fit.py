"""Fitting a bundle's not-assessable gate (quality bounds, feature distance, lesion check) and its
lesion change measure on the development images, checked on held-out lesions and negatives."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from model.errors import ModelError
from model.inference.data import IsicDataset
from model.training.config import TrainConfig, split_rows

log = logging.getLogger(__name__)


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
    from model.inference import quality
    from model.inference.data import resize
    from model.inference.gate import Gate
    from model.inference.ood import FeatureDistance, LesionCheck, feature_network
    from model.training import gate_data

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
    gate.report = {"held_out_lesions": flag_summary(["lesion"] * len(reasons), reasons)}
    kinds, negatives = reported_negatives(dataset, [dataset.ids[i] for i in np.flatnonzero(held)], cfg.seed)
    neg_pixels = np.stack([resize(img, cfg.image_size) for img in negatives])
    neg_sizes = np.array([[img.shape[1], img.shape[0]] for img in negatives], np.float32)
    neg_reasons, _ = gate.reasons(neg_pixels, neg_sizes, features_of(neg_pixels))
    gate.report["negatives"] = flag_summary(kinds, neg_reasons)
    log.info(
        "gate: quality %s; feature distance threshold %.3f; flags %.2f%% of held-out lesions, %.1f%% of %d negatives",
        thresholds.to_dict(), distance.threshold, 100 * gate.report["held_out_lesions"]["flagged_share"],
        100 * gate.report["negatives"]["flagged_share"], len(negatives),
    )  # fmt: skip
    return gate


def fit_change(network, dataset: IsicDataset, fold: np.ndarray, cfg: TrainConfig, feature_members, out_dir: Path,
               features: np.ndarray | None = None) -> dict | None:  # fmt: skip
    """The bundle's change measure (:mod:`model.inference.change`), fitted on the development patients'
    same-lesion pairs and reported on the calibration set's; None when the data names too few
    lesions imaged twice (then the bundle compares visits by probability only)."""
    from model.errors import BundleError
    from model.inference import change
    from model.inference.ood import feature_network

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

    from model.inference import bundle as bundle_lib
    from model.inference.gate import Gate
    from model.inference.ood import feature_network
    from model.training.config import read_config

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
    """The image-branch features of a feature network (see ``model.inference.ood.feature_network``);
    the metadata input does not reach them, so it is left at zero."""
    meta_dim = net.get_layer("meta").output.shape[-1]
    out = []
    for i in range(0, len(pixels), batch):
        x = pixels[i : i + batch]
        out.append(np.asarray(net.predict_on_batch({"image": x, "meta": np.zeros((len(x), meta_dim), np.float32)})[1]))
    return np.concatenate(out)


def reported_negatives(dataset: IsicDataset, held_ids: list[str], seed: int) -> tuple[list[str], list[np.ndarray]]:
    """The made-up negatives a gate is reported on (kinds, RGB images of their own sizes): degraded
    copies of the first 160 held-out lesions, synthetic images and charts, and the reporting half
    of the photographs, scenes and other medical images (none of them fitted anything)."""
    from model.training import gate_data

    originals = [decode_original(b) for b in dataset.read_bytes(held_ids[:160])]
    kinds, negatives = gate_data.negatives(originals, seed=seed)
    world_kinds, world_images = gate_data.world(seed=seed, part="report")
    return kinds + world_kinds, negatives + world_images


def decode_original(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def flag_summary(kinds: list[str], reasons: list) -> dict:
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
