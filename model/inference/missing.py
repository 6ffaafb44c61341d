"""Studies sent without some of their metadata: which fields were missing, and a calibration map
for each pattern of missing fields.

The development data's missing values are not missing at random: in HAM10000 the rows without a
sex are all benign and those without an age 96 % benign, so a network trained on them learns
"unknown" as a sign of a benign lesion, and a study sent without age, sex and site scores near
zero whatever its image shows. In practice fields go missing for reasons of workflow (a PACS that
sends no PatientAge, a program that sends images only), not of biology.

The remedy here: for each pattern of missing fields, the network's score with those fields
encoded as missing is mapped to a probability by its own calibration map (Platt scaling), fitted
on held-out lesions whose fields were hidden **on purpose** — every kind of lesion, so the map
learns what the score means when a field is missing for no reason. The ranking within a pattern
is the network's (image and the fields that were given); the map restores the level. Marginalising
over the missing fields (the network's output averaged over the development data's distribution of
them) was measured too and ranked worse (docs/model.md).

Pure numpy: the predictor, the worker and the edge scorer apply it without Keras.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from model.inference.calibration import Calibrator
from model.inference.features import FeatureSpec

# with more fields than this, only each field alone and all of them together get their own map
ALL_SUBSETS_UP_TO = 4


def key(fields) -> str:
    """A pattern's name in the manifest: its fields, sorted, joined by '+'."""
    return "+".join(sorted(fields))


def patterns(fields: list[str]) -> list[tuple[str, ...]]:
    """The patterns of missing fields that get a map of their own."""
    if len(fields) <= ALL_SUBSETS_UP_TO:
        return [c for r in range(1, len(fields) + 1) for c in combinations(fields, r)]
    return [(f,) for f in fields] + [tuple(fields)]


def missing_slots(spec: FeatureSpec) -> list[tuple[str, int]]:
    """Each field with the slot of the encoded vector that is 1 when it is missing (a numeric
    field's missing flag, a categorical field's unknown bucket)."""
    out, start = [], 0
    for feature in spec.numeric:
        out.append((feature.name, start + 1))
        start += feature.width
    for feature in spec.categorical:
        out.append((feature.name, start))
        start += feature.width
    return out


def missing_fields(spec: FeatureSpec, meta: np.ndarray) -> list[list[str]]:
    """Per encoded row, the fields the network was told nothing about."""
    slots = missing_slots(spec)
    flags = np.asarray(meta)[:, [slot for _, slot in slots]] > 0.5 if len(meta) else np.zeros((0, len(slots)), bool)
    return [[name for (name, _), hidden in zip(slots, row) if hidden] for row in flags]


def hide(spec: FeatureSpec, meta: np.ndarray, fields) -> np.ndarray:
    """The encoded rows with ``fields`` set to missing (the encoding of an absent value)."""
    out = np.array(meta, dtype=np.float32, copy=True)
    absent = spec.missing_vector()
    for name, start, stop in spec.groups():
        if name in fields:
            out[:, start:stop] = absent[start:stop]
    return out


@dataclass
class MissingMetadata:
    """The calibration maps per pattern of missing fields (``manifest["missing_metadata"]``)."""

    fields: list[str]
    calibrators: dict[str, Calibrator] = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    def calibrator_for(self, missing: list[str], base: Calibrator) -> Calibrator:
        """The map of this pattern; for a pattern without one (many fields), the fitted pattern
        nearest to it (fewest fields differing, the larger on a tie); none missing: ``base``."""
        if not missing:
            return base
        wanted = set(missing)
        if key(wanted) in self.calibrators:
            return self.calibrators[key(wanted)]
        nearest = min(
            self.calibrators,
            key=lambda k: (len(set(k.split("+")) ^ wanted), -len(k.split("+"))),
            default=None,
        )
        return base if nearest is None else self.calibrators[nearest]

    def calibrate(self, views: np.ndarray, missing: list[list[str]], base: Calibrator):
        """Raw scores (views × n) → calibrated probability (the mean of the views) and the views'
        calibrated spread, each row through its pattern's map."""
        probability = np.zeros(views.shape[1], np.float64)
        spread = np.zeros(views.shape[1], np.float64)
        by_pattern: dict[str, list[int]] = {}
        for i, fields in enumerate(missing):
            by_pattern.setdefault(key(fields), []).append(i)
        for pattern, rows in by_pattern.items():
            calibrator = self.calibrator_for(pattern.split("+") if pattern else [], base)
            probability[rows] = calibrator(views[:, rows].mean(axis=0))
            spread[rows] = calibrator(views[:, rows]).std(axis=0)
        return probability, spread

    def to_dict(self) -> dict:
        return {
            "method": "a Platt map per pattern of missing fields, fitted on held-out lesions with those fields hidden",
            "fields": self.fields,
            "patterns": {k: c.to_dict() for k, c in self.calibrators.items()},
            "report": self.report,
        }

    @classmethod
    def from_dict(cls, data: dict | None) -> MissingMetadata | None:
        if not data:
            return None
        calibrators = {k: Calibrator.from_dict(v) for k, v in (data.get("patterns") or {}).items()}
        return cls(list(data.get("fields") or []), calibrators, dict(data.get("report") or {}))


def fit(
    y: np.ndarray, views_by_pattern: dict[tuple[str, ...], np.ndarray], fields: list[str], threshold: float,
    base: Calibrator,
) -> MissingMetadata:  # fmt: skip
    """Fit a Platt map per pattern on held-out raw scores (views × n) with the pattern's fields
    hidden; report, per pattern and with nothing hidden (``()``), AUC, ECE and sensitivity and
    specificity at ``threshold`` (the maps' own figures cross-validated, five folds)."""
    from sklearn.model_selection import StratifiedKFold

    from model import metrics
    from model.inference import calibration

    y = np.asarray(y).astype(int)
    out = MissingMetadata(list(fields))
    folds = StratifiedKFold(max(2, min(5, int(y.sum()), int((1 - y).sum()))), shuffle=True, random_state=0)
    for pattern, views in views_by_pattern.items():
        raw = np.asarray(views, np.float64).mean(axis=0)
        if pattern:
            mapped = np.zeros(y.size)
            for train, test in folds.split(raw, y):
                mapped[test] = Calibrator.fit("platt", y[train], raw[train])(raw[test])
            out.calibrators[key(pattern)] = Calibrator.fit("platt", y, raw)
        else:
            mapped = base(raw)
        unmapped = base(raw)
        op, before = metrics.at_threshold(y, mapped, threshold), metrics.at_threshold(y, unmapped, threshold)
        out.report[key(pattern) or "none missing"] = {
            "n": int(y.size),
            "malignant": int(y.sum()),
            "auc": metrics.auc(y, mapped),
            "ece": calibration.ece(y, mapped),
            "sensitivity": op.sensitivity,
            "specificity": op.specificity,
            "without_its_map": {"sensitivity": before.sensitivity, "specificity": before.specificity},
        }
    return out
