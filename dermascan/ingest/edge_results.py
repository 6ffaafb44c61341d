"""A result the edge scorer (``dermascan-edge``) made offline, uploaded later with its study.

Field ``edge_result`` of a REST record (JSON): the scorer's own output —
``{"probability": 0.31 | null, "referred": true | false | null, "assessable": true, "reason": null,
"bundle_version": "ham10000-…", "runtime": "onnxruntime", "precision": "fp32",
"made_at": "2026-12-02T09:14:00+00:00"}``. It is checked (types, ranges, a timestamp with an
offset, at most 200 characters of text) and kept as given beside the server's own score, which
is computed as for any study; nothing of it decides anything on the server.
"""

from __future__ import annotations

import datetime as dt

from dermascan.ingest import numbers
from dermascan.ingest.errors import IngestError

TEXT = ("bundle_version", "runtime", "precision", "reason")
FIELDS = {"age_approx", "sex", "anatom_site_general"}
# what `dermascan-edge score` prints that the server does not keep: the image's local path
PRINTED_NOT_KEPT = {"image"}
EARLIEST = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)


def clean(value) -> dict | None:
    """The edge result as kept, or IngestError saying what is wrong with it."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise IngestError("edge_result must be an object (the output of dermascan-edge score)")
    known = {"probability", "referred", "assessable", "threshold", "made_at", "score", "missing_fields", "differential",
             *TEXT}  # fmt: skip
    unknown = sorted(set(value) - known - PRINTED_NOT_KEPT, key=str)
    if unknown:
        raise IngestError(f"edge_result: unknown field(s) {', '.join(str(k)[:40] for k in unknown[:5])}")
    out: dict = {}
    for name in ("probability", "score", "threshold"):
        number = value.get(name)
        if number is not None:
            try:  # the one rule for outside numbers: a 400-digit integer is this row's error, not a crash
                if isinstance(number, bool) or not isinstance(number, int | float):
                    raise numbers.NumberError(name, "not a number")
                out[name] = numbers.parse_float(number, f"edge_result.{name}", 0.0, 1.0)
            except numbers.NumberError:
                raise IngestError(f"edge_result.{name} must be a number from 0 to 1 (or null)") from None
    for name in ("referred", "assessable"):
        flag = value.get(name)
        if flag is not None and not isinstance(flag, bool):
            raise IngestError(f"edge_result.{name} must be true, false or null")
        out[name] = flag
    for name in TEXT:
        text = value.get(name)
        if text is not None:
            if not isinstance(text, str) or len(text) > 200 or "\x00" in text:
                raise IngestError(f"edge_result.{name} must be text of at most 200 characters")
            out[name] = text
    missing = value.get("missing_fields")
    if missing is not None:
        names = missing if isinstance(missing, list) else [None]
        if len(names) > len(FIELDS) or not all(isinstance(m, str) and m in FIELDS for m in names):
            raise IngestError(f"edge_result.missing_fields must be a list of {', '.join(sorted(FIELDS))}")
        out["missing_fields"] = list(names)
    differential = value.get("differential")
    if differential is not None:
        out["differential"] = _differential(differential)
    if not out.get("bundle_version"):
        raise IngestError("edge_result.bundle_version is needed: the version the result was made with")
    made = value.get("made_at")
    if made is not None:
        try:
            when = dt.datetime.fromisoformat(str(made)[:40])
        except ValueError:
            raise IngestError("edge_result.made_at must be an ISO 8601 time with its offset") from None
        if when.tzinfo is None:
            raise IngestError("edge_result.made_at needs its UTC offset (e.g. +00:00)")
        when = when.astimezone(dt.UTC)
        if not EARLIEST <= when <= dt.datetime.now(dt.UTC) + dt.timedelta(days=1):
            raise IngestError("edge_result.made_at is not a plausible time (2000 to today)")
        out["made_at"] = when.isoformat(timespec="seconds")
    return out


def _differential(value) -> list[dict]:
    """The scorer's differential: at most seven {diagnosis, label, snomed, probability} rows."""
    from model.inference.diagnosis import CODES

    if not isinstance(value, list) or len(value) > len(CODES):
        raise IngestError(f"edge_result.differential must be a list of at most {len(CODES)} classes")
    rows = []
    for row in value:
        if not isinstance(row, dict) or row.get("diagnosis") not in CODES:
            raise IngestError(f"edge_result.differential: each class one of {', '.join(CODES)}")
        try:
            probability = numbers.parse_float(row.get("probability"), "probability", 0.0, 1.0)
        except (numbers.NumberError, TypeError):
            raise IngestError("edge_result.differential: each probability a number from 0 to 1") from None
        rows.append({"diagnosis": row["diagnosis"], "probability": probability})
    return rows
