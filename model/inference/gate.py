"""The not-assessable gate: an image is scored only when it passes the quality checks
(:mod:`model.inference.quality`) and its features lie near the development lesions' (:mod:`model.inference.ood`).
An image that fails gets a reason a person understands and no probability-based decision.

The gate belongs to the bundle: ``manifest["gate"]`` holds the quality thresholds and the
out-of-distribution threshold, ``gate.npz`` (sha256 in the manifest) the fitted feature
distribution. A bundle made before the gate existed still gets the quality checks at their
default thresholds, and no feature check.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.errors import BundleError
from model.inference.ood import FeatureDistance, LesionCheck
from model.inference.quality import QualityThresholds, measure

GATE_FILE = "gate.npz"
LESION_CHECK_FILE = "lesion_check.npz"
NOT_A_LESION = "not a dermoscopic lesion image"


@dataclass
class Gate:
    quality: QualityThresholds
    features: FeatureDistance | None = None
    false_flag_rate: float | None = None
    report: dict | None = None  # how often it flagged held-out lesions and the negatives, when fitted
    # the ensemble members (by position) whose features the distance reads; None: all of them
    feature_members: list[int] | None = None
    lesion_check: LesionCheck | None = None  # the explicit is-this-dermoscopy signal, when fitted

    def reasons(
        self, pixels: np.ndarray, sizes: np.ndarray | None, features: np.ndarray | None, measured: dict | None = None
    ):
        """Per image: None (assessable) or the reason it is not; and the feature distances.
        ``measured``: the quality measures already taken of these pixels (:func:`measure`)."""
        if measured is None and len(pixels):
            measured = measure(pixels, sizes)
        found = self.quality.failures(measured) if len(pixels) else []
        distance = None
        if self.features is not None and features is not None and len(pixels):
            distance = self.features.score(features)
            for i in np.flatnonzero(distance > self.features.threshold):
                if found[i] is None:
                    found[i] = NOT_A_LESION
        if self.lesion_check is not None and features is not None and len(pixels):
            for i in np.flatnonzero(self.lesion_check.score(features) < self.lesion_check.threshold):
                if found[i] is None:
                    found[i] = NOT_A_LESION
        return found, distance

    def manifest_block(self, directory: Path) -> dict:
        """Write ``gate.npz`` into the bundle folder; the manifest's ``gate`` entry."""
        from model.inference.bundle import file_sha256

        block: dict = {"quality": self.quality.to_dict()}
        if self.report:
            block["report"] = self.report
        if self.features is not None:
            path = Path(directory) / GATE_FILE
            self.features.save(path)
            block["ood"] = {
                "file": GATE_FILE,
                "sha256": file_sha256(path),
                "threshold": self.features.threshold,
                "components": int(len(self.features.variances)),
                "false_flag_rate": self.false_flag_rate,
                "method": "Mahalanobis distance (PCA, whitened) + residual energy on the members' image features",
            }
            if self.feature_members is not None:
                block["ood"]["members"] = list(self.feature_members)
        if self.lesion_check is not None:
            path = Path(directory) / LESION_CHECK_FILE
            self.lesion_check.save(path)
            block["lesion_check"] = {
                "file": LESION_CHECK_FILE, "sha256": file_sha256(path), "threshold": self.lesion_check.threshold,
                "method": "logistic regression of development lesions against photographs and other medical images, "
                "on the PCA-reduced image features; flagged below the threshold",
            }  # fmt: skip
        return block

    @classmethod
    def from_bundle(cls, directory: Path, manifest: dict) -> Gate:
        block = manifest.get("gate") or {}
        gate = cls(QualityThresholds.from_dict(block.get("quality")))
        ood = block.get("ood")
        if ood:
            from model.inference.bundle import file_sha256

            path = Path(directory) / ood["file"]
            if not path.is_file() or file_sha256(path) != ood["sha256"]:
                raise BundleError(f"{path}: missing, or its checksum does not match the manifest")
            gate.features = FeatureDistance.load(path)
            gate.false_flag_rate = ood.get("false_flag_rate")
            gate.feature_members = ood.get("members")
        check = block.get("lesion_check")
        if check:
            from model.inference.bundle import file_sha256

            path = Path(directory) / check["file"]
            if not path.is_file() or file_sha256(path) != check["sha256"]:
                raise BundleError(f"{path}: missing, or its checksum does not match the manifest")
            gate.lesion_check = LesionCheck.load(path)
        return gate
