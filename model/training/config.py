"""A training run's settings and the patient-grouped split: stratified folds grouped by patient,
and the calibration set held out of every fold network."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from model.errors import ModelError
from model.inference.data import canonical_size

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
    # the explicit is-this-dermoscopy check (model.inference.ood.LesionCheck): its false-flag rate on held-out
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
    # the differential's classes weighted by (count)^-power in its loss (0: every row alike; 1:
    # balanced, ISIC 2018's metric), normalised so that the training rows' mean weight is 1
    diagnosis_balance: float = 0.0
    colour_constancy: bool = False
    metadata_dropout: float = 0.0
    metadata_dropout_all: float = 0.0
    keep: str = "best"
    # where a network starts (model.training.warm_start): checkpoint folder ("fold0", "final") →
    # a bundle, "bundle#member" or .keras file whose weights it begins from; absent: from scratch
    warm_start: dict = field(default_factory=dict)

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


def _config(values: dict) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in known})


def read_config(path: Path) -> TrainConfig:
    if (path / "manifest.json").is_file():
        return _config(json.loads((path / "manifest.json").read_text()).get("training", {}).get("config", {}))
    if (path / "config.json").is_file():
        return _config(json.loads((path / "config.json").read_text()))
    raise ModelError(f"{path}: neither a bundle (manifest.json) nor a training work folder (config.json)")
