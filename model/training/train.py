"""Training on the ISIC-2024 layout: patient-grouped stratified folds, augmentation, ReduceLROnPlateau
on validation AUC, per-epoch checkpoints (a stopped run resumes), out-of-fold predictions, a
threshold chosen on them, a report (metrics JSON + ROC PNG) and the model bundle.

The deployed model is the average of the fold models (an ensemble in one Keras graph), so every
development image is scored out-of-fold by exactly one member; the referral threshold is picked
on those out-of-fold scores at the target sensitivity.
"""

from __future__ import annotations

import logging
import time

from model.training.assemble import assemble
from model.training.config import TrainConfig
from model.training.folds import cross_validate

log = logging.getLogger(__name__)


def train(
    data_dir, out_dir, work_dir, cfg: TrainConfig, version: str | None = None, train_folds: list[int] | None = None
) -> dict:
    """Cross-validate (resumable; all folds, or only ``train_folds``), then assemble the bundle
    from the folds that are done."""
    t0 = time.time()
    report = cross_validate(data_dir, work_dir, cfg, train_folds)
    return assemble(data_dir, out_dir, work_dir, cfg, report, version, seconds=time.time() - t0)
