"""What changed between two visits of the same lesion, from the network's own image features.

Each scored image gets an *embedding*: its image-branch features (those the gate reads),
standardised and projected on their 32 main directions (fitted on the development images). The
*change measure* between two visits is the distance between their embeddings in units of the
median distance between two images of the same lesion that did **not** change (1.0: a typical
unchanged pair), with its *percentile* among those unchanged pairs. A lesion is "changed since
last visit" above the threshold, chosen on the development patients' unchanged same-lesion
pairs and reported on other patients' (``report`` in the manifest; docs/model.md).

The unchanged pairs are HAM10000's lesions imaged two to six times (the same lesion, a different
image: another day, angle, magnification or lighting). No public data of lesions that did evolve
was at hand, so what the measure catches in real evolution is not validated: it finds images
unlike the earlier one (two different lesions exceed it most of the time), which is what the
specialist is then asked to look at.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.errors import BundleError
from model.metrics import wilson

CHANGE_FILE = "change.npz"
COMPONENTS = 32
# the share of the development patients' unchanged pairs above the threshold: well under the 5 % the
# referral rule allows, so that new patients (a sample's spread) stay under it too
FIT_FALSE_ALARM = 0.025
METHOD = (
    "Euclidean distance between the two images' standardised image features projected on their 32 main "
    "directions, over the median distance of unchanged same-lesion pairs"
)


@dataclass
class ChangeMeasure:
    mean: np.ndarray  # (d,)
    scale: np.ndarray  # (d,)
    components: np.ndarray  # (k, d)
    unit: float  # the median distance of unchanged same-lesion pairs
    quantiles: np.ndarray  # (101,) the unchanged pairs' measures at 0 %, 1 %, … 100 %
    threshold: float = float("inf")  # in units; above it: "changed since last visit"

    def embed(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, np.float64) - self.mean) / self.scale
        return (z @ self.components.T).astype(np.float32)

    def measure(self, earlier, later) -> float:
        a, b = np.asarray(earlier, np.float64), np.asarray(later, np.float64)
        if a.shape != b.shape or a.shape != (len(self.components),):
            raise ValueError("the embeddings are not of this change measure")
        return float(np.linalg.norm(a - b) / self.unit)

    def percentile(self, measure: float) -> float:
        """The share of unchanged same-lesion pairs whose measure is below ``measure`` (0–1)."""
        return float(np.interp(measure, self.quantiles, np.linspace(0.0, 1.0, len(self.quantiles))))

    def changed(self, measure: float) -> bool:
        return measure > self.threshold

    def save(self, path: Path) -> None:
        np.savez(path, mean=self.mean.astype(np.float32), scale=self.scale.astype(np.float32),
                 components=self.components.astype(np.float32), unit=np.float64(self.unit),
                 quantiles=self.quantiles.astype(np.float64), threshold=np.float64(self.threshold))  # fmt: skip

    @classmethod
    def load(cls, path: Path) -> ChangeMeasure:
        with np.load(path) as data:
            return cls(data["mean"].astype(np.float64), data["scale"].astype(np.float64),
                       data["components"].astype(np.float64), float(data["unit"]),
                       data["quantiles"].astype(np.float64), float(data["threshold"]))  # fmt: skip


def same_lesion_pairs(lesion_ids, rows) -> np.ndarray:
    """Every pair of rows (of ``rows``) that image the same lesion, (n, 2)."""
    by: dict = defaultdict(list)
    for i in rows:
        if lesion_ids[i] is not None and lesion_ids[i] == lesion_ids[i]:  # not None, not NaN
            by[lesion_ids[i]].append(int(i))
    pairs = [p for members in by.values() for p in itertools.combinations(members, 2)]
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def _distances(embedded: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    return np.linalg.norm(embedded[pairs[:, 0]] - embedded[pairs[:, 1]], axis=1)


def fit(
    features: np.ndarray,
    lesion_ids,
    fit_rows,
    report_rows,
    false_alarm: float = FIT_FALSE_ALARM,
    components: int = COMPONENTS,
    seed: int = 0,
) -> tuple[ChangeMeasure, dict]:
    """The change measure fitted on ``fit_rows`` (their features; their unchanged same-lesion
    pairs set the unit and the threshold), reported on ``report_rows`` (other patients)."""
    fit_rows, report_rows = np.asarray(fit_rows), np.asarray(report_rows)
    x = np.asarray(features, np.float64)
    mean, scale = x[fit_rows].mean(axis=0), x[fit_rows].std(axis=0) + 1e-6
    z = (x[fit_rows] - mean) / scale
    k = int(min(components, len(fit_rows) - 1, z.shape[1]))
    _, _, vt = np.linalg.svd(z - z.mean(axis=0), full_matrices=False)
    fit_pairs = same_lesion_pairs(lesion_ids, fit_rows)
    if len(fit_pairs) < 10:
        raise BundleError(f"only {len(fit_pairs)} same-lesion pairs to fit the change measure on (10 at least)")
    measure = ChangeMeasure(mean, scale, vt[:k], 1.0, np.zeros(101))
    embedded = measure.embed(x)
    fit_d = _distances(embedded, fit_pairs)
    measure.unit = float(np.median(fit_d)) or 1.0
    measure.quantiles = np.quantile(fit_d / measure.unit, np.linspace(0.0, 1.0, 101))
    measure.threshold = float(np.quantile(fit_d / measure.unit, 1.0 - false_alarm))
    report_pairs = same_lesion_pairs(lesion_ids, report_rows)
    report_d = _distances(embedded, report_pairs) / measure.unit if len(report_pairs) else np.zeros(0)
    flagged = int((report_d > measure.threshold).sum())
    # two different lesions (of the report patients) as a stand-in for a large change
    rng = np.random.default_rng(seed)
    draws = rng.choice(report_rows, (4000, 2)) if len(report_rows) > 1 else np.zeros((0, 2), np.int64)
    draws = np.array([d for d in draws if lesion_ids[d[0]] != lesion_ids[d[1]]]).reshape(-1, 2)
    different = _distances(embedded, draws) / measure.unit if len(draws) else np.zeros(0)
    lesions = len({lesion_ids[i] for i in np.unique(report_pairs)}) if len(report_pairs) else 0
    report = {
        "fit": {"pairs": len(fit_pairs), "lesions": len({lesion_ids[i] for i in np.unique(fit_pairs)}),
                "flagged_share": float(np.mean(fit_d / measure.unit > measure.threshold))},
        "report": {"pairs": len(report_pairs), "lesions": lesions, "flagged": flagged,
                   "flagged_share": flagged / len(report_pairs) if len(report_pairs) else None,
                   "flagged_share_ci95": wilson(flagged, len(report_pairs)),
                   "different_lesions_flagged_share": float(np.mean(different > measure.threshold)) if len(different) else None},
        "threshold": measure.threshold,
        "fit_false_alarm": false_alarm,
    }  # fmt: skip
    return measure, report


def manifest_block(measure: ChangeMeasure, report: dict, directory: Path, described: str) -> dict:
    from model.inference.bundle import file_sha256

    path = Path(directory) / CHANGE_FILE
    measure.save(path)
    return {"file": CHANGE_FILE, "sha256": file_sha256(path), "threshold": measure.threshold,
            "components": len(measure.components), "method": METHOD, "pairs": described, "report": report}  # fmt: skip


def from_bundle(directory: Path, manifest: dict) -> ChangeMeasure | None:
    """The bundle's change measure, or None for a bundle made without one (no follow-up change)."""
    block = manifest.get("change")
    if not block:
        return None
    from model.inference.bundle import file_sha256

    path = Path(directory) / block["file"]
    if not path.is_file() or file_sha256(path) != block["sha256"]:
        raise BundleError(f"{path}: missing, or its checksum does not match the manifest")
    return ChangeMeasure.load(path)
