"""What a deployed model is watched against: the development data's profile, and the drift
measure that compares a stream of studies with it.

The profile holds fixed-bin distributions of the patient metadata (age, sex, anatomic site) and
of four simple image statistics taken on the model's own input (brightness, contrast and
sharpness from :mod:`model.inference.quality`, and the original image's shorter side). Numeric bins are the
development data's deciles, so each bin holds a tenth of it and the comparison is equally
sensitive everywhere. The score's reference is the bundle's own held-out score histogram
(``manifest["metrics"]["score_histogram"]``).

Drift is the population stability index, PSI = Σ (a − e) · ln(a / e) over the bins of the
observed (a) and reference (e) shares: under 0.1 the stream looks like the reference, 0.1–0.25
it has moved, over 0.25 it is a different population (the usual credit-scoring reading, used
for model monitoring by Evidently, NannyML and SageMaker Model Monitor alike). Pure numpy.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

IMAGE_STATS = ("brightness", "contrast", "sharpness", "min_side")
NUMERIC = ("age_approx", *IMAGE_STATS)
CATEGORICAL = ("sex", "anatom_site_general")
UNKNOWN = "unknown"
DRIFT = 0.25  # PSI past which a feature is flagged as drifted
MOVED = 0.10
MIN_STUDIES = 30  # fewer than this in a window: no drift figure (too noisy to read)


def image_stats(
    pixels: np.ndarray, sizes: np.ndarray | None = None, measured: dict | None = None
) -> list[dict[str, float]]:
    """Per image, the statistics the profile tracks (from the quality measures; ``measured``: those
    already taken of these pixels)."""
    from model.inference.quality import measure

    measured = measure(pixels, sizes) if measured is None else measured
    return [{k: round(float(measured[k][i]), 3) for k in IMAGE_STATS} for i in range(len(pixels))]


def _deciles(values: np.ndarray) -> list[float]:
    edges = np.unique(np.quantile(values, np.linspace(0.1, 0.9, 9)))
    return [round(float(e), 4) for e in edges]


def _counts_numeric(values: Iterable, edges: Sequence[float]) -> list[int]:
    """Counts in the bins (−∞, e0], (e0, e1], …, (e_last, ∞) plus one bin for missing values."""
    known = [float(v) for v in values if v is not None and np.isfinite(_float(v))]
    missing = sum(1 for v in values if v is None or not np.isfinite(_float(v)))
    counts = np.bincount(np.searchsorted(np.asarray(edges), np.asarray(known), side="left"), minlength=len(edges) + 1)
    return [int(c) for c in counts] + [missing]


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _counts_categorical(values: Iterable, categories: Sequence[str]) -> list[int]:
    index = {c: i for i, c in enumerate(categories)}
    counts = [0] * (len(categories) + 1)  # the last: unknown / anything else
    for value in values:
        key = str(value).strip().lower() if value is not None else None
        counts[index.get(key, len(categories))] += 1
    return counts


def profile(columns: dict[str, Sequence]) -> dict:
    """The reference profile of a development set: ``columns`` maps each tracked feature to its
    values (numbers, or strings for the categorical ones; None where unknown)."""
    out: dict = {"n": len(next(iter(columns.values()))), "features": {}}
    for name in NUMERIC:
        values = [_float(v) for v in columns.get(name, [])]
        finite = np.asarray([v for v in values if np.isfinite(v)])
        if finite.size == 0:
            continue
        edges = _deciles(finite)
        out["features"][name] = {"kind": "numeric", "edges": edges, "counts": _counts_numeric(values, edges)}
    for name in CATEGORICAL:
        values = [v if isinstance(v, str) and v.strip() else None for v in columns.get(name, [])]
        categories = sorted({v.strip().lower() for v in values if v})
        if not categories:
            continue
        out["features"][name] = {
            "kind": "categorical",
            "categories": categories,
            "counts": _counts_categorical(values, categories),
        }
    return out


def counts_like(feature: dict, values: Sequence) -> list[int]:
    """A stream's counts in a reference feature's bins."""
    if feature["kind"] == "numeric":
        return _counts_numeric(values, feature["edges"])
    return _counts_categorical(values, feature["categories"])


def psi(reference: Sequence[float], observed: Sequence[float], floor: float = 1e-4) -> float:
    """Population stability index of two count (or share) vectors over the same bins."""
    e = np.asarray(reference, dtype=float)
    a = np.asarray(observed, dtype=float)
    if e.sum() <= 0 or a.sum() <= 0:
        return float("nan")
    e = np.maximum(e / e.sum(), floor)
    a = np.maximum(a / a.sum(), floor)
    return float(np.sum((a - e) * np.log(a / e)))


def drift(reference_profile: dict, stream: dict[str, Sequence]) -> dict[str, float]:
    """PSI per tracked feature of a stream of studies (None where the stream is too small)."""
    out: dict[str, float] = {}
    for name, feature in reference_profile.get("features", {}).items():
        values = stream.get(name)
        if values is None:
            continue
        if len(values) < MIN_STUDIES:
            out[name] = None
            continue
        if all(v is None or v == "" for v in values):
            out[name] = None  # the stream never says (e.g. no age given): nothing to compare
            continue
        out[name] = round(psi(feature["counts"], counts_like(feature, values)), 4)
    return out


def score_psi(histogram: dict, scores: Sequence[float]) -> float | None:
    """PSI of a stream's scores against the bundle's held-out score histogram."""
    if len(scores) < MIN_STUDIES or not histogram:
        return None
    edges = np.asarray(histogram["edges"], dtype=float)
    idx = np.clip(np.searchsorted(edges, np.asarray(scores, dtype=float), side="right") - 1, 0, len(edges) - 2)
    return round(psi(histogram["counts"], np.bincount(idx, minlength=len(edges) - 1)), 4)


REFERENCE_FILE = "reference.json"


def dataset_profile(data_dir, image_size, limit: int | None = None, progress=None) -> dict:
    """The profile of an ISIC-2024-layout development set, images at the bundle's input size."""
    from model.inference.data import IsicDataset

    data = IsicDataset.open(data_dir, limit=limit)
    meta = data.metadata
    sizes = np.zeros((len(meta), 2), dtype=np.float32)
    stats = image_stats(data.load_images(image_size, sizes=sizes, progress=progress), sizes)
    columns: dict[str, list] = {
        name: [None if v != v else v for v in meta[name].tolist()] if name in meta.columns else [None] * len(meta)
        for name in ("age_approx", *CATEGORICAL)
    }
    for name in IMAGE_STATS:
        columns[name] = [s[name] for s in stats]
    return {"data": str(data_dir), "image_size": image_size, **profile(columns)}


def write_profile(bundle_dir, data_dir, image_size, limit: int | None = None) -> dict:
    import json
    from pathlib import Path

    built = dataset_profile(data_dir, image_size, limit)
    (Path(bundle_dir) / REFERENCE_FILE).write_text(json.dumps(built, indent=1))
    return built
