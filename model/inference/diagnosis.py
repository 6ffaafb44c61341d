"""The differential diagnosis: the seven classes of HAM10000 / ISIC 2018 Task 3.

Pure data and numpy (no Keras): the class list the network's second output follows, each class's
label and SNOMED CT concept, which count as malignant (the malignancy target's definition), and
how a dataset's columns map onto the classes — HAM10000's ``diagnosis`` (``dx``) codes directly,
ISIC 2024's ``iddx_*`` hierarchy by the names it uses (docs/model.md gives the table).
"""

from __future__ import annotations

import math

import numpy as np

# (code, label, SNOMED CT concept id, SNOMED CT display, malignant)
CLASSES = (
    ("mel", "Melanoma", "372244006", "Malignant melanoma", True),
    ("nv", "Melanocytic nevus", "400096001", "Melanocytic naevus", False),
    ("bcc", "Basal cell carcinoma", "254701007", "Basal cell carcinoma of skin", True),
    ("akiec", "Actinic keratosis / intraepithelial carcinoma", "201101007", "Actinic keratosis", True),
    ("bkl", "Benign keratosis (seborrhoeic keratosis, solar lentigo, LPLK)", "69640009", "Seborrheic keratosis", False),
    ("df", "Dermatofibroma", "302833002", "Dermatofibroma", False),
    ("vasc", "Vascular lesion (angioma, angiokeratoma, pyogenic granuloma)", "400210000", "Hemangioma of skin", False),
)
CODES = tuple(c[0] for c in CLASSES)
MALIGNANT = tuple(c[0] for c in CLASSES if c[4])

# ISIC 2024's iddx_3 (and, where iddx_3 is empty, iddx_2) names → a class; names not listed train
# only the malignancy output
ISIC_NAMES = {
    "melanoma invasive": "mel", "melanoma in situ": "mel", "melanoma, nos": "mel", "melanoma": "mel",
    "nevus": "nv", "nevus, nos": "nv", "blue nevus": "nv", "combined nevus": "nv", "congenital nevus": "nv",
    "dermal nevus": "nv", "junctional nevus": "nv", "compound nevus": "nv", "atypical melanocytic neoplasm": "nv",
    "basal cell carcinoma": "bcc",
    "solar or actinic keratosis": "akiec", "squamous cell carcinoma in situ": "akiec",
    "squamous cell carcinoma, nos": "akiec", "bowen's disease": "akiec",
    "seborrheic keratosis": "bkl", "solar lentigo": "bkl", "lichen planus like keratosis": "bkl",
    "pigmented benign keratosis": "bkl", "lentigo nos": "bkl", "benign keratosis": "bkl",
    "dermatofibroma": "df",
    "hemangioma": "vasc", "angioma": "vasc", "angiokeratoma": "vasc", "pyogenic granuloma": "vasc",
    "cherry angioma": "vasc", "benign soft tissue proliferations - vascular": "vasc",
}  # fmt: skip


def index_of(value) -> int:
    """The class index of a code or an ISIC 2024 name; -1 when unknown or missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return -1
    text = " ".join(str(value).strip().lower().split())
    if text in CODES:
        return CODES.index(text)
    code = ISIC_NAMES.get(text)
    return CODES.index(code) if code else -1


def labels(metadata) -> np.ndarray:
    """Class index per row of a DataFrame (-1: no diagnosis): ``diagnosis``, else ISIC 2024's
    ``iddx_3`` then ``iddx_2``."""
    n = len(metadata)
    out = np.full(n, -1, dtype=np.int64)
    for column in ("diagnosis", "iddx_3", "iddx_2"):
        if column not in metadata.columns:
            continue
        found = np.array([index_of(v) for v in metadata[column]], dtype=np.int64)
        fill = (out < 0) & (found >= 0)
        out[fill] = found[fill]
    return out


def manifest_block() -> dict:
    """The classes as a bundle's manifest lists them."""
    return {
        "classes": [
            {"code": code, "label": label, "snomed": snomed, "snomed_display": display, "malignant": malignant}
            for code, label, snomed, display, malignant in CLASSES
        ],
        "coding_system": "http://snomed.info/sct",
    }


def balanced_accuracy(truth: np.ndarray, probabilities: np.ndarray) -> float:
    """ISIC 2018 Task 3's metric: the mean per-class recall over the classes present."""
    truth = np.asarray(truth)
    predicted = np.asarray(probabilities).argmax(axis=1)
    recalls = [float((predicted[truth == k] == k).mean()) for k in range(len(CODES)) if (truth == k).any()]
    return float(np.mean(recalls)) if recalls else float("nan")


def per_class_recall(truth: np.ndarray, probabilities: np.ndarray) -> dict:
    predicted = np.asarray(probabilities).argmax(axis=1)
    return {code: float((predicted[truth == k] == k).mean()) for k, code in enumerate(CODES) if (truth == k).any()}


TAUS = (0.0, 0.25, 0.5, 0.75, 1.0)
# a re-weighting (tau > 0) is chosen only where it earns its place on the development rows: at least
# this much balanced accuracy over the head's own probabilities (differences between neighbouring
# taus below it are noise: the curve is not monotone), and costing the melanoma-against-rest AUC
# no more than this (the renormalisation reorders the melanoma probability across images)
TAU_MIN_GAIN, TAU_MAX_MELANOMA_COST = 0.005, 0.005


def adjust(probabilities: np.ndarray, block: dict | None) -> np.ndarray:
    """The network's class probabilities re-weighted to equal class priors by the bundle's
    ``prior_adjustment`` (p / prior**tau, renormalised): the differential a specialist reads, in
    which a rare class is not outvoted by the common ones (ISIC 2018 scores by balanced accuracy)."""
    p = np.asarray(probabilities, np.float64)
    adjustment = (block or {}).get("prior_adjustment") or {}
    tau = float(adjustment.get("tau", 0.0))
    if tau:
        p = p / np.power(np.asarray(adjustment["prior"], np.float64), tau)
    return p / np.maximum(p.sum(axis=-1, keepdims=True), 1e-12)


def figures(truth: np.ndarray, probabilities: np.ndarray) -> dict:
    """Balanced accuracy, per-class recall and melanoma-against-rest AUC of labelled rows."""
    from model import metrics

    known = truth >= 0
    truth, probabilities = truth[known], probabilities[known]
    mel = (truth == CODES.index("mel")).astype(int)
    return {
        "n": int(known.sum()),
        "balanced_accuracy": balanced_accuracy(truth, probabilities),
        "recall": per_class_recall(truth, probabilities),
        "melanoma_auc": metrics.auc(mel, probabilities[:, CODES.index("mel")]) if 0 < mel.sum() < mel.size else None,
    }


def mix(probabilities: np.ndarray) -> dict[str, float]:
    """The share of rows whose most likely class is each class."""
    probabilities = np.asarray(probabilities)
    if not probabilities.size:
        return {code: 0.0 for code in CODES}
    counts = np.bincount(probabilities.argmax(axis=1), minlength=len(CODES))
    return {code: round(float(n) / len(probabilities), 4) for code, n in zip(CODES, counts, strict=True)}


def choose_tau(balanced: dict, melanoma: dict) -> float:
    """The prior re-weighting: the tau of the best balanced accuracy among those that gain at
    least ``TAU_MIN_GAIN`` over tau = 0 and cost the melanoma AUC at most ``TAU_MAX_MELANOMA_COST``
    (an AUC that cannot be measured — no melanoma among the rows — costs nothing); else 0."""
    base_auc = melanoma.get(0.0)
    eligible = [
        t for t in balanced
        if t == 0.0 or (
            balanced[t] >= balanced[0.0] + TAU_MIN_GAIN
            and (base_auc is None or melanoma[t] is None or melanoma[t] >= base_auc - TAU_MAX_MELANOMA_COST)
        )
    ]  # fmt: skip
    return max(eligible, key=lambda t: (round(balanced[t], 4), -t))


def fit_block(truth: np.ndarray, probabilities: np.ndarray, parts: np.ndarray) -> dict:
    """The manifest's ``diagnosis`` block: the classes, and the prior adjustment chosen on the
    ruler's development rows (``parts >= 0``: :func:`choose_tau`), reported there and on the
    calibration rows (``parts == -1``), which chose nothing."""
    truth, parts = np.asarray(truth), np.asarray(parts)
    dev = (parts >= 0) & (truth >= 0)
    fit_rows = dev if dev.any() else truth >= 0
    prior = np.bincount(truth[fit_rows], minlength=len(CODES)) / max(int(fit_rows.sum()), 1)
    prior = np.maximum(prior, 1e-4)
    scores, melanoma = {}, {}
    for tau in TAUS:
        block = {"prior_adjustment": {"tau": tau, "prior": prior.tolist()}}
        found = figures(truth[fit_rows], adjust(probabilities[fit_rows], block))
        scores[tau], melanoma[tau] = found["balanced_accuracy"], found["melanoma_auc"]
    tau = choose_tau(scores, melanoma)
    block = {**manifest_block(), "prior_adjustment": {"tau": tau, "prior": [round(float(v), 6) for v in prior]}}
    report = {"tau_balanced_accuracy": {str(t): round(v, 4) for t, v in scores.items()},
              "tau_melanoma_auc": {str(t): None if v is None else round(v, 4) for t, v in melanoma.items()}}  # fmt: skip
    # what monitoring compares a program's stream with: the suspected (most likely) diagnosis's
    # share of each class on the development rows, as served (adjusted)
    report["predicted_mix"] = mix(adjust(probabilities[fit_rows], block))
    for name, rows in (("development_out_of_fold", parts >= 0), ("calibration_set", parts == -1)):
        if rows.any():
            report[name] = figures(truth[rows], adjust(probabilities[rows], block))
            report[name + "_unadjusted"] = figures(truth[rows], probabilities[rows])
    block["report"] = report
    return block


def as_list(probabilities) -> list[dict]:
    """A differential as people read it: every class with its label, SNOMED CT code and
    probability, most likely first."""
    rows = [
        {"diagnosis": code, "label": label, "snomed": snomed, "probability": round(float(p), 4)}
        for (code, label, snomed, _, _), p in zip(CLASSES, probabilities, strict=True)
    ]
    return sorted(rows, key=lambda r: -r["probability"])
