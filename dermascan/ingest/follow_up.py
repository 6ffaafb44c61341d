"""Lesion follow-up fields of a study, as every ingest path reads them: the lesion it images and
when it was imaged.

- ``lesion_id`` (the ISIC-2024 column name; the REST records' and the manifest's field): the
  sender's identifier of the lesion, text. It names the same lesion in every later visit of the
  same patient in the same program; it is stored only as a keyed pseudonym.
- DICOM: the Lesion Number attribute (0018,3105, IS — a number per patient, the standard's own
  lesion numbering), or, for an identifier that is not a number (ISIC's "IL_…", HAM10000's
  "HAM_…"), the text element of DermaScan's private block (group 0011, private creator
  ``DERMASCAN 1.0``, element xx10, LO). See docs/architecture.md, "Lesion follow-up".
- ``acquired_at`` (aliases ``acquisition_date``, ``study_date``, ``visit_date``): the visit's date
  or date and time, ISO 8601 (``2026-03-01``, ``2026-03-01T09:30:00+01:00``) or DICOM's
  ``YYYYMMDD``; DICOM reads AcquisitionDateTime (with its offset), else ContentDate/Time, else
  StudyDate/Time (with Timezone Offset From UTC when the data set gives one). Kept as an instant in
  UTC on every database (a time without an offset is taken as UTC). A
  lesion's visits are ordered by it (a study without one: by when it was received), so a visit
  sent late with an earlier date takes its place in time, not the newest place.
"""

from __future__ import annotations

import datetime as dt
import re

from dermascan.ingest.records import FieldError, shown

LESION_FIELD = "lesion_id"
DATE_FIELDS = ("acquired_at", "acquisition_date", "study_date", "visit_date")
PRIVATE_CREATOR = "DERMASCAN 1.0"
PRIVATE_GROUP = 0x0011
PRIVATE_LESION_ELEMENT = 0x10
LESION_ID_MAX = 64
# "#3": a lesion number (the patient's own numbering, ASCII digits only); otherwise the sender's text
_LESION_ID = re.compile(r"^(#[0-9]{1,12}|[A-Za-z0-9][A-Za-z0-9 ._:/#-]*)$", re.ASCII)
EARLIEST = dt.datetime(1900, 1, 1, tzinfo=dt.UTC)
_DICOM_DT = re.compile(r"(?P<wall>\d{10}(?:\d{2}){0,2})(?:\.\d{1,6})?(?P<offset>[+-]\d{4})?")


def clean_lesion_id(value) -> str | None:
    """The lesion identifier as text, or None when absent; FieldError for a bad one."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):  # NaN too: a number is no lesion id
        raise FieldError(LESION_FIELD, f"{shown(value)} is not a lesion identifier (text)")
    text = str(value).strip()
    if len(text) > LESION_ID_MAX or not _LESION_ID.match(text):
        raise FieldError(
            LESION_FIELD,
            f"{shown(text)} is not a lesion identifier (at most {LESION_ID_MAX} letters, digits and . _ : / # - "
            "or spaces, starting with a letter or a digit)",
        )
    return text


def parse_visit_date(value, field: str = "acquired_at", now: dt.datetime | None = None) -> dt.datetime | None:
    """A visit's date → an aware datetime (UTC when no offset is given; a date alone is its
    midnight), or None when absent. FieldError for text that is no date, or a date before 1900
    or more than a day in the future."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, dt.datetime):
        when = value
    elif isinstance(value, dt.date):
        when = dt.datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        text = value.strip()
        try:
            dicom = _DICOM_DT.fullmatch(text)
            if re.fullmatch(r"\d{8}", text):
                when = dt.datetime.strptime(text, "%Y%m%d")
            elif dicom:  # DICOM DT: YYYYMMDDHH[MM[SS]][.F…][&ZZXX]
                when = dt.datetime.strptime(dicom["wall"].ljust(14, "0"), "%Y%m%d%H%M%S")
                if dicom["offset"]:
                    sign = -1 if dicom["offset"][0] == "-" else 1
                    hours, minutes = int(dicom["offset"][1:3]), int(dicom["offset"][3:5])
                    if hours > 14 or minutes > 59:
                        raise ValueError(dicom["offset"])
                    when = when.replace(tzinfo=dt.timezone(sign * dt.timedelta(hours=hours, minutes=minutes)))
            else:
                when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise FieldError(field, f"{shown(text)} is not a date (ISO 8601, e.g. 2026-03-01 or 2026-03-01T09:30:00Z)") from None  # fmt: skip
    else:
        raise FieldError(field, f"{shown(value)} is not a date")
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    when = when.astimezone(dt.UTC)  # an instant: every database compares and orders it as one
    now = now or dt.datetime.now(dt.UTC)
    if when < EARLIEST or when > now + dt.timedelta(days=1):
        raise FieldError(field, f"{when.date().isoformat()} is not a plausible visit date (1900 to today)")
    return when


def from_record(record: dict) -> tuple[object, object, str]:
    """The raw lesion id and visit date of a manifest row or REST record (validated at submission,
    so that a bad one rejects only its own row), and the date's field name."""
    for name in DATE_FIELDS:
        if record.get(name) not in (None, ""):
            return record.get(LESION_FIELD), record.get(name), name
    return record.get(LESION_FIELD), None, "acquired_at"


def from_dicom(ds) -> tuple[str | None, str | None]:
    """(lesion key, visit date text) of a DICOM data set. The key of a Lesion Number is scoped to
    the patient ("#3": this patient's lesion 3); the private text identifier is the sender's own."""
    lesion = None
    try:
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
        element = block[PRIVATE_LESION_ELEMENT]
        lesion = str(element.value).strip() or None if element.value is not None else None
    except (KeyError, ValueError):
        lesion = None
    number = ds.get("LesionNumber")
    if lesion is None and number not in (None, ""):
        text = str(number).strip()
        # IS: ASCII digits; anything else is refused at submission, with its value
        lesion = f"#{int(text)}" if re.fullmatch(r"[+]?[0-9]{1,12}", text) else f"Lesion Number {text}"[:80]
    when = None
    if ds.get("AcquisitionDateTime"):
        when = str(ds.AcquisitionDateTime)
    else:
        for date, time in (("ContentDate", "ContentTime"), ("StudyDate", "StudyTime")):
            if ds.get(date):
                when = str(ds.get(date)) + str(ds.get(time) or "").split(".")[0]
                break
    # a date and time with no offset of their own take the data set's (Timezone Offset From UTC)
    offset = str(ds.get("TimezoneOffsetFromUTC") or "").strip()
    if when and re.fullmatch(r"\d{10,14}", when) and re.fullmatch(r"[+-]\d{4}", offset):
        when += offset
    return lesion, when
