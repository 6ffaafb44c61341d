"""Metadata records → validated ISIC-2024 metadata.

Every ingest path (portal form, manifest CSV, API JSON, DICOM header) produces a plain dict;
:func:`clean_metadata` checks it and returns the metadata in the model's column names (the
names of the ISIC 2024 challenge), or raises :class:`FieldError` naming the field.
"""

from __future__ import annotations

import math

from dermascan.ingest import numbers
from model.inference.features import ISIC_CATEGORICAL, ISIC_NUMERIC

# The anatomic sites the model's feature spec knows (ISIC 2024 words, plus the three ISIC 2020
# words HAM10000 needs).
SITES = (
    "anterior torso",
    "posterior torso",
    "torso",
    "head/neck",
    "upper extremity",
    "lower extremity",
    "palms/soles",
    "oral/genital",
)
SITE_ALIASES = {
    "head neck": "head/neck",
    "head and neck": "head/neck",
    "face": "head/neck",
    "scalp": "head/neck",
    "neck": "head/neck",
    "ear": "head/neck",
    "trunk": "torso",
    "back": "posterior torso",
    "chest": "anterior torso",
    "abdomen": "anterior torso",
    "upper limb": "upper extremity",
    "arm": "upper extremity",
    "hand": "upper extremity",
    "lower limb": "lower extremity",
    "leg": "lower extremity",
    "foot": "lower extremity",
    "acral": "palms/soles",
    "palms soles": "palms/soles",
    "genital": "oral/genital",
    "oral genital": "oral/genital",
}
SEXES = {"male": "male", "m": "male", "female": "female", "f": "female"}
MISSING = {"", "unknown", "na", "n/a", "none", "null", "nan"}

# Accepted names for each field → the ISIC 2024 column name.
FIELD_ALIASES = {
    "age_approx": "age_approx",
    "age": "age_approx",
    "sex": "sex",
    "anatom_site_general": "anatom_site_general",
    "anatom_site": "anatom_site_general",
    "site": "anatom_site_general",
}
# The other ISIC 2024 columns of the model's feature spec, passed through when present.
PASSTHROUGH_NUMERIC = tuple(c for c in ISIC_NUMERIC if c != "age_approx")
PASSTHROUGH_TEXT = tuple(c for c in ISIC_CATEGORICAL if c not in ("sex", "anatom_site_general"))


class FieldError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def _blank(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in MISSING


def shown(value, most: int = 40) -> str:
    """A value as an error message may quote it: short, and safe for any input (an int of
    thousands of digits cannot even be turned into text)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**30:
        return f"a number of about {value.bit_length() * 0.30103:.0f} digits"
    if isinstance(value, dict | list):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    text = repr(value)
    return text if len(text) <= most else text[: most - 1] + "…"


def clean_age(value) -> float | None:
    if _blank(value):
        return None
    try:
        age = numbers.parse_float(value, "age_approx")
    except numbers.NumberError:
        raise FieldError("age_approx", f"{shown(value)} is not a number of years") from None
    if age < 0 or age > 120:
        raise FieldError("age_approx", f"{shown(value)} is outside 0–120 years")
    return age


def clean_sex(value) -> str | None:
    if _blank(value):
        return None
    text = str(value).strip().lower() if isinstance(value, str) else ""
    if text not in SEXES:
        raise FieldError("sex", f"{shown(value)} is not one of male, female (or empty when unknown)")
    return SEXES[text]


def clean_site(value) -> str | None:
    if _blank(value):
        return None
    text = " ".join(value.strip().lower().replace("_", " ").split()) if isinstance(value, str) else ""
    text = SITE_ALIASES.get(text, text)
    if text not in SITES:
        raise FieldError("anatom_site_general", f"{shown(value)} is not a known site ({', '.join(SITES)})")
    return text


def clean_metadata(record: dict) -> dict:
    """Validate and normalise → {age_approx, sex, anatom_site_general, + ISIC extras present}."""
    values: dict = {}
    for key, value in record.items():
        name = FIELD_ALIASES.get(str(key).strip().lower())
        if name and not _blank(value):
            values[name] = value
    out = {
        "age_approx": clean_age(values.get("age_approx")),
        "sex": clean_sex(values.get("sex")),
        "anatom_site_general": clean_site(values.get("anatom_site_general")),
    }
    for name in PASSTHROUGH_NUMERIC:
        if not _blank(record.get(name)):
            try:
                out[name] = numbers.parse_float(record[name], name)
            except numbers.NumberError:
                raise FieldError(name, f"{shown(record[name])} is not a number") from None
    for name in PASSTHROUGH_TEXT:
        value = record.get(name)
        if not _blank(value):
            if not isinstance(value, str | int | float):
                raise FieldError(name, f"{shown(value)} is not text")
            out[name] = str(value).strip()[:200]
    return out
