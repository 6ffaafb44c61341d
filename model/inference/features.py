"""The declarative metadata feature spec.

A :class:`FeatureSpec` is fitted once on training metadata and saved as JSON inside the model
bundle. The same spec turns an ISIC-2024 CSV row, a portal form, an API record or a DICOM header
(all expressed with ISIC-2024 column names) into the same float32 vector. Missing and unknown
values are encoded (a missing flag, an unknown bucket); they never raise.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

# The columns the ISIC 2024 KerasCV starter feeds its metadata branch. A dataset that lacks a
# column simply leaves it out of the fitted spec (HAM10000, the portal and DICOM give only age,
# sex and anatomic site).
ISIC_NUMERIC = (
    "age_approx",
    "tbp_lv_nevi_confidence",
    "clin_size_long_diam_mm",
    "tbp_lv_areaMM2",
    "tbp_lv_area_perim_ratio",
    "tbp_lv_color_std_mean",
    "tbp_lv_deltaLBnorm",
    "tbp_lv_minorAxisMM",
)
ISIC_CATEGORICAL = ("sex", "anatom_site_general", "tbp_tile_type", "tbp_lv_location")

# Optional binning for numeric columns (edges, right-open); age gets clinically readable bands.
DEFAULT_BINS = {"age_approx": [30.0, 45.0, 60.0, 75.0]}

# Spelling variants mapped onto the training vocabulary, per column.
DEFAULT_ALIASES = {
    "sex": {"m": "male", "f": "female", "man": "male", "woman": "female"},
    "anatom_site_general": {
        "head neck": "head/neck",
        "head and neck": "head/neck",
        "palms soles": "palms/soles",
        "oral genital": "oral/genital",
        "trunk": "torso",
    },
}

MISSING_TEXT = {"", "nan", "none", "null", "unknown", "na", "n/a"}
# the plausible range of a numeric field a person gives (what the server's ingest accepts too)
PLAUSIBLE = {"age_approx": (0.0, 120.0)}


def _as_float(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = value.strip()
        if value.lower() in MISSING_TEXT:
            return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _as_text(value) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = " ".join(str(value).strip().lower().replace("_", " ").split())
    return None if text in MISSING_TEXT else text


@dataclass
class NumericFeature:
    name: str
    mean: float
    std: float
    bins: list[float] | None = None

    @property
    def width(self) -> int:
        return 2 + (len(self.bins) + 1 if self.bins else 0)

    def output_names(self) -> list[str]:
        names = [self.name, f"{self.name}__missing"]
        if self.bins:
            edges = [-math.inf, *self.bins, math.inf]
            names += [f"{self.name}__[{lo:g},{hi:g})" for lo, hi in zip(edges, edges[1:])]
        return names

    def encode(self, value, out: np.ndarray) -> None:
        number = _as_float(value)
        if number is None:
            out[1] = 1.0
            return
        out[0] = float(np.clip((number - self.mean) / self.std, -5.0, 5.0))
        if self.bins:
            out[2 + int(np.searchsorted(self.bins, number, side="right"))] = 1.0


@dataclass
class CategoricalFeature:
    name: str
    vocabulary: list[str]
    aliases: dict[str, str] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return len(self.vocabulary) + 1  # slot 0: unknown or missing

    def output_names(self) -> list[str]:
        return [f"{self.name}=<unknown>"] + [f"{self.name}={v}" for v in self.vocabulary]

    def normalise(self, value) -> str | None:
        text = _as_text(value)
        if text is None:
            return None
        return self.aliases.get(text, text)

    def encode(self, value, out: np.ndarray) -> None:
        text = self.normalise(value)
        try:
            out[1 + self.vocabulary.index(text)] = 1.0
        except ValueError:
            out[0] = 1.0


@dataclass
class FeatureSpec:
    """Numeric and categorical metadata columns, fitted on training data."""

    numeric: list[NumericFeature] = field(default_factory=list)
    categorical: list[CategoricalFeature] = field(default_factory=list)
    format_version: int = 1

    # -- fitting -----------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        rows,
        numeric: Iterable[str] = ISIC_NUMERIC,
        categorical: Iterable[str] = ISIC_CATEGORICAL,
        bins: Mapping[str, list[float]] | None = None,
        min_count: int = 5,
    ) -> FeatureSpec:
        """Fit on a pandas DataFrame (or anything with ``.columns`` and ``[col]`` lists).

        Columns the data lacks, or has no value in, are left out. Categories seen fewer than
        ``min_count`` times fall into the unknown bucket.
        """
        bins = DEFAULT_BINS if bins is None else bins
        columns = set(rows.columns)
        spec = cls()
        for name in numeric:
            if name not in columns:
                continue
            values = np.array([v for v in map(_as_float, rows[name]) if v is not None])
            if values.size == 0:
                continue
            std = float(values.std()) or 1.0
            spec.numeric.append(
                NumericFeature(name, float(values.mean()), std, list(bins[name]) if name in bins else None)
            )
        for name in categorical:
            if name not in columns:
                continue
            feature = CategoricalFeature(name, [], dict(DEFAULT_ALIASES.get(name, {})))
            counts: dict[str, int] = {}
            for value in rows[name]:
                text = feature.normalise(value)
                if text is not None:
                    counts[text] = counts.get(text, 0) + 1
            feature.vocabulary = sorted(v for v, c in counts.items() if c >= min_count)
            if feature.vocabulary:
                spec.categorical.append(feature)
        return spec

    # -- encoding ----------------------------------------------------------------------------
    @property
    def columns(self) -> list[str]:
        return [f.name for f in self.numeric] + [f.name for f in self.categorical]

    @property
    def dim(self) -> int:
        return sum(f.width for f in self.numeric) + sum(f.width for f in self.categorical)

    def output_names(self) -> list[str]:
        return [n for f in (*self.numeric, *self.categorical) for n in f.output_names()]

    def groups(self) -> list[tuple[str, int, int]]:
        """Each field's (name, start, stop) in the encoded vector."""
        out, start = [], 0
        for feature in (*self.numeric, *self.categorical):
            out.append((feature.name, start, start + feature.width))
            start += feature.width
        return out

    def missing_vector(self) -> np.ndarray:
        """The encoding of a record in which every field is missing."""
        return self.transform([{}])[0]

    def check(self, record) -> dict:
        """``record`` with each of the spec's fields normalised, or ValueError naming the first
        field whose value the spec cannot take: a numeric field that is not a finite number in its
        plausible range (ages 0–120), a category outside its vocabulary (aliases count). Missing
        values stay missing. What the edge scorer asks of its input; the server's ingest has the
        same vocabulary and refuses the same values."""
        record = record or {}
        out = {}
        for feature in self.numeric:
            value = record.get(feature.name)
            if _as_text(value) is None:
                continue
            number = _as_float(value)
            low, high = PLAUSIBLE.get(feature.name, (-math.inf, math.inf))
            if number is None or not low <= number <= high:
                raise ValueError(f"{feature.name}: {value!r} is not a number from {low:g} to {high:g}")
            out[feature.name] = number
        for feature in self.categorical:
            value = record.get(feature.name)
            if feature.normalise(value) is None:
                continue
            if feature.normalise(value) not in feature.vocabulary:
                raise ValueError(f"{feature.name}: {value!r} is not one of {', '.join(feature.vocabulary)}")
            out[feature.name] = feature.normalise(value)
        return out

    def missing_fields(self, record) -> list[str]:
        """The fields of ``record`` the spec cannot use: absent, empty, or a value outside its
        vocabulary (an unknown site or sex is as good as none to the network)."""
        record = record or {}
        out = [f.name for f in self.numeric if _as_float(record.get(f.name)) is None]
        for feature in self.categorical:
            if feature.normalise(record.get(feature.name)) not in feature.vocabulary:
                out.append(feature.name)
        return out

    def transform(self, records) -> np.ndarray:
        """Encode records (dicts, or a DataFrame) → float32 array of shape (n, dim)."""
        if hasattr(records, "to_dict") and hasattr(records, "columns"):
            records = records.to_dict("records")
        records = list(records)
        out = np.zeros((len(records), self.dim), dtype=np.float32)
        for i, record in enumerate(records):
            record = record or {}
            start = 0
            for feature in (*self.numeric, *self.categorical):
                feature.encode(record.get(feature.name), out[i, start : start + feature.width])
                start += feature.width
        return out

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "numeric": [asdict(f) for f in self.numeric],
            "categorical": [asdict(f) for f in self.categorical],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> FeatureSpec:
        if data.get("format_version", 1) != 1:
            raise ValueError(f"unsupported feature spec format {data.get('format_version')!r}")
        return cls(
            numeric=[NumericFeature(**f) for f in data.get("numeric", [])],
            categorical=[CategoricalFeature(**f) for f in data.get("categorical", [])],
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FeatureSpec:
        return cls.from_dict(json.loads(text))
