"""DICOM → studies: VL Photographic and Dermoscopic Photography images, uncompressed or JPEG
baseline, with age, sex and anatomic site read from the header.

Used by STOW-RS (``web/dicomweb.py``) and the C-STORE receiver (``dermascan/intake/dicom_scp.py``).
A JPEG baseline frame is stored as is (it is a JPEG file); uncompressed pixels are stored as
lossless PNG. Rejections carry the DICOM failure status (PS3.4 / PS3.18) to answer with.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit

from dermascan.config import Settings
from dermascan.ingest import follow_up
from dermascan.ingest.records import SITE_ALIASES, SITES
from dermascan.ingest.types import StudyInput

VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"
DERMOSCOPIC_PHOTOGRAPHY = "1.2.840.10008.5.1.4.1.1.77.1.7"
SUPPORTED_SOP_CLASSES = {
    VL_PHOTOGRAPHIC: "VL Photographic Image Storage",
    DERMOSCOPIC_PHOTOGRAPHY: "Dermoscopic Photography Image Storage",
}
SUPPORTED_TRANSFER_SYNTAXES = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit}

# DICOM failure statuses (PS3.4 Annex B, used as FailureReason in STOW-RS responses)
SOP_CLASS_NOT_SUPPORTED = 0x0122
CANNOT_UNDERSTAND = 0xC000
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
PROCESSING_FAILURE = 0x0110
OUT_OF_RESOURCES = 0xA700

# SNOMED CT body structures (AnatomicRegionSequence, scheme SCT or SRT) → the model's sites.
SNOMED_SITES = {
    "22943007": "torso",  # trunk
    "77568009": "posterior torso",  # back
    "302551006": "anterior torso",  # entire thorax
    "51185008": "anterior torso",  # thorax
    "113345001": "anterior torso",  # abdomen structure
    "818983003": "anterior torso",  # abdomen
    "816094009": "anterior torso",  # abdomen and pelvis
    "774007": "head/neck",  # head and neck
    "69536005": "head/neck",  # head
    "89545001": "head/neck",  # face
    "45048000": "head/neck",  # neck
    "41695006": "head/neck",  # scalp
    "117590005": "head/neck",  # ear
    "53120007": "upper extremity",  # upper limb
    "40983000": "upper extremity",  # upper arm
    "14975008": "upper extremity",  # forearm
    "85562004": "upper extremity",  # hand
    "61685007": "lower extremity",  # lower limb
    "30021000": "lower extremity",  # lower leg
    "68367000": "lower extremity",  # thigh
    "56459004": "lower extremity",  # foot
    "21547004": "palms/soles",  # palm
    "57999000": "palms/soles",  # sole of foot
    "263767004": "oral/genital",  # genital structure
    "74262004": "oral/genital",  # oral cavity
}
BODY_PART_SITES = {
    "TRUNK": "torso", "BACK": "posterior torso", "CHEST": "anterior torso", "THORAX": "anterior torso",
    "ABDOMEN": "anterior torso", "HEAD": "head/neck", "NECK": "head/neck", "FACE": "head/neck",
    "HEADNECK": "head/neck", "SCALP": "head/neck", "EAR": "head/neck", "ARM": "upper extremity",
    "UPRARM": "upper extremity", "FOREARM": "upper extremity", "HAND": "upper extremity",
    "UPPEREXTREMITY": "upper extremity", "LEG": "lower extremity", "LOWERLEG": "lower extremity",
    "THIGH": "lower extremity", "FOOT": "lower extremity", "LOWEREXTREMITY": "lower extremity",
}  # fmt: skip


UID_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
UID_MAX = 64


def valid_uid(value) -> bool:
    """PS3.5 §9.1: digits and dots, no empty component, no leading zero in a component, at most
    64 characters."""
    text = str(value or "")
    return 0 < len(text) <= UID_MAX and UID_PATTERN.fullmatch(text) is not None


def uid_or_none(value) -> str | None:
    """A UID safe to echo back (in a failure item, a log line), or None."""
    return str(value) if valid_uid(value) else None


def _shown_uid(value) -> str:
    text = str(value)
    return repr(text if len(text) <= 70 else text[:69] + "…")


def check_uids(ds: Dataset, sop_class: str) -> None:
    """The instance's SOP Instance, Study and Series UIDs are UIDs (they are reused in the reports
    sent back to the PACS): anything else refuses the instance."""
    for keyword, label in (("SOPInstanceUID", "SOP Instance UID"), ("StudyInstanceUID", "Study Instance UID"),
                           ("SeriesInstanceUID", "Series Instance UID")):  # fmt: skip
        value = ds.get(keyword)
        if value in (None, ""):
            raise DicomRejected(
                f"the instance has no {label}", DATA_SET_DOES_NOT_MATCH_SOP_CLASS, sop_class,
                uid_or_none(ds.get("SOPInstanceUID")),
            )  # fmt: skip
        if not valid_uid(value):
            raise DicomRejected(
                f"the {label} {_shown_uid(value)} is not a valid UID (digits and dots, no leading zeros, "
                f"at most {UID_MAX} characters)",
                DATA_SET_DOES_NOT_MATCH_SOP_CLASS, sop_class, uid_or_none(ds.get("SOPInstanceUID")),
            )  # fmt: skip


class DicomRejected(ValueError):
    def __init__(
        self,
        reason: str,
        status: int = CANNOT_UNDERSTAND,
        sop_class_uid: str | None = None,
        sop_instance_uid: str | None = None,
    ):
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.sop_class_uid = sop_class_uid
        self.sop_instance_uid = sop_instance_uid


@dataclass
class ParsedInstance:
    study: StudyInput
    sop_class_uid: str
    sop_instance_uid: str


def read_part10(data: bytes) -> Dataset:
    """Parse DICOM Part-10 bytes; a truncated or non-DICOM body raises DicomRejected."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            # Part 10 with the 128-byte preamble and "DICM"; some clients (dicomweb-client) send
            # the File Meta group without them, which is accepted too
            bare_meta = data[128:132] != b"DICM" and data[:2] == b"\x02\x00"
            ds = pydicom.dcmread(io.BytesIO(data), force=bare_meta)
            if bare_meta and "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
                raise InvalidDicomError("no File Meta Information with a Transfer Syntax UID")
            ds.get("SOPClassUID")
            if "PixelData" in ds:
                ds.PixelData  # noqa: B018 - read it now, so a truncated body fails here
        except InvalidDicomError as exc:
            raise DicomRejected(f"not a DICOM Part-10 file: {exc}") from None
        except (EOFError, OSError, ValueError, KeyError, AttributeError, TypeError, NotImplementedError):
            raise DicomRejected("the DICOM file is truncated or malformed") from None
    if any("end of file" in str(w.message).lower() or "truncated" in str(w.message).lower() for w in caught):
        raise DicomRejected(
            "the DICOM file is truncated",
            CANNOT_UNDERSTAND,
            uid_or_none(ds.get("SOPClassUID")),
            uid_or_none(ds.get("SOPInstanceUID")),
        )
    return ds


def parse_age(value) -> float | None:
    """PatientAge (AS: nnnD/W/M/Y) → years."""
    if not value:
        return None
    match = re.fullmatch(r"(\d{3})([DWMY])", str(value).strip().upper())
    if not match:
        return None
    n = int(match.group(1))
    return round({"D": n / 365.25, "W": n / 52.18, "M": n / 12.0, "Y": float(n)}[match.group(2)], 2)


def parse_sex(value) -> str | None:
    return {"M": "male", "F": "female"}.get(str(value or "").strip().upper())


def parse_site(ds: Dataset) -> str | None:
    for item in ds.get("AnatomicRegionSequence", []) or []:
        code = str(item.get("CodeValue", "")).strip()
        if code in SNOMED_SITES:
            return SNOMED_SITES[code]
        meaning = " ".join(str(item.get("CodeMeaning", "")).lower().split())
        meaning = SITE_ALIASES.get(meaning, meaning)
        if meaning in SITES:
            return meaning
    body_part = re.sub(r"[^A-Z]", "", str(ds.get("BodyPartExamined", "")).upper())
    return BODY_PART_SITES.get(body_part)


def _header_int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    try:
        value = ds.get(keyword, default)
        return int(value if value not in (None, "") else default)
    except (TypeError, ValueError):
        raise DicomRejected(f"{keyword} is missing or not a number", DATA_SET_DOES_NOT_MATCH_SOP_CLASS) from None


def check_pixel_header(ds: Dataset, syntax, limits: Settings) -> None:
    """The pixel and byte limits, applied to what the header says before anything is decoded:
    rows × columns against the pixel limit, rows × columns × samples × bytes per sample against
    the instance limit, and (uncompressed) the Pixel Data length against the header."""
    rows, columns = _header_int(ds, "Rows"), _header_int(ds, "Columns")
    samples, bits = _header_int(ds, "SamplesPerPixel", 1), _header_int(ds, "BitsAllocated", 8)
    if rows <= 0 or columns <= 0 or samples not in (1, 3) or bits not in (8, 16):
        raise DicomRejected(
            f"unsupported pixel module: {rows} × {columns}, {samples} samples, {bits} bits allocated",
            DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
        )
    if rows * columns > limits.max_image_pixels:
        raise DicomRejected(
            f"the image has {rows * columns:,} pixels ({columns} × {rows}); the limit is {limits.max_image_pixels:,}",
            OUT_OF_RESOURCES,
        )
    expected = rows * columns * samples * (bits // 8)
    if expected > limits.max_dicom_bytes:
        raise DicomRejected(
            f"the decoded image would take {expected:,} bytes; the limit is {limits.max_dicom_bytes:,}",
            OUT_OF_RESOURCES,
        )
    if syntax != JPEGBaseline8Bit:
        length = len(ds.get("PixelData") or b"")
        if length not in (expected, expected + 1):  # one padding byte to an even length
            raise DicomRejected(
                f"Pixel Data holds {length:,} bytes where the header ({columns} × {rows} × {samples} × {bits} bits) "
                f"says {expected:,}",
                DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
            )


def _image_bytes(ds: Dataset, limits: Settings) -> bytes:
    if "PixelData" not in ds:
        raise DicomRejected("the instance has no pixel data", DATA_SET_DOES_NOT_MATCH_SOP_CLASS)
    frames = _header_int(ds, "NumberOfFrames", 1)
    if frames != 1:
        raise DicomRejected(
            f"multi-frame instances ({frames} frames) are not supported", DATA_SET_DOES_NOT_MATCH_SOP_CLASS
        )
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax not in SUPPORTED_TRANSFER_SYNTAXES:
        raise DicomRejected(
            f"transfer syntax {syntax} is not supported (uncompressed or JPEG baseline)", CANNOT_UNDERSTAND
        )
    check_pixel_header(ds, syntax, limits)
    if syntax == JPEGBaseline8Bit:
        from pydicom.encaps import generate_frames

        try:
            frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        except (StopIteration, ValueError) as exc:
            raise DicomRejected(f"the encapsulated JPEG frame cannot be read: {exc}") from None
        if len(frame) > limits.max_image_bytes:
            raise DicomRejected(
                f"the JPEG frame has {len(frame):,} bytes; the limit is {limits.max_image_bytes:,}", OUT_OF_RESOURCES
            )
        return frame
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises several kinds for inconsistent pixel modules
        raise DicomRejected(f"the pixel data cannot be decoded: {exc}") from None
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if pixels.ndim == 2:
        if photometric == "MONOCHROME1":
            pixels = pixels.max() - pixels
        if pixels.dtype != np.uint8:  # scaled in integers: no float64 copy of a large image
            low, high = int(pixels.min()), int(pixels.max())
            pixels = ((pixels.astype(np.uint32) - low) * 255 // max(1, high - low)).astype(np.uint8)
        pixels = np.stack([pixels] * 3, axis=-1)
    elif photometric.startswith("YBR"):
        from pydicom.pixels import convert_color_space

        pixels = convert_color_space(pixels, photometric, "RGB")
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise DicomRejected(f"unexpected pixel array shape {pixels.shape}")
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


PIXEL_TAGS = {Tag("PixelData"), Tag("FloatPixelData"), Tag("DoubleFloatPixelData")}


def header_bytes(ds: Dataset) -> bytes:
    """The instance as received without its pixel data (Part 10): what a report sent back to the
    PACS copies its patient and study modules from. ``ds`` itself is left as it was."""
    header = Dataset({tag: element for tag, element in ds.items() if tag not in PIXEL_TAGS})
    header.file_meta = ds.file_meta
    buffer = io.BytesIO()
    header.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def parse_dataset(ds: Dataset, limits: Settings | None = None) -> ParsedInstance:
    sop_class = str(ds.get("SOPClassUID", "") or "")
    sop_instance = str(ds.get("SOPInstanceUID", "") or "")
    if sop_class not in SUPPORTED_SOP_CLASSES:
        raise DicomRejected(
            f"SOP class {_shown_uid(sop_class) if sop_class else '(none)'} is not supported (accepted: "
            + ", ".join(f"{name} {uid}" for uid, name in SUPPORTED_SOP_CLASSES.items()) + ")",
            SOP_CLASS_NOT_SUPPORTED, uid_or_none(sop_class), uid_or_none(sop_instance),
        )  # fmt: skip
    check_uids(ds, sop_class)
    try:
        image = _image_bytes(ds, limits or Settings())
    except DicomRejected as exc:
        exc.sop_class_uid, exc.sop_instance_uid = sop_class, sop_instance
        raise
    lesion_id, acquired_at = follow_up.from_dicom(ds)
    study = StudyInput(
        lesion_id=lesion_id,
        acquired_at=acquired_at,
        image=image,
        metadata={
            "age_approx": parse_age(ds.get("PatientAge")),
            "sex": parse_sex(ds.get("PatientSex")),
            "anatom_site_general": parse_site(ds),
        },
        # the reference is the SOP Instance UID; the AccessionNumber identifies a person's order, so
        # like the PatientID it is kept only as a keyed pseudonym
        external_id=sop_instance,
        accession_number=str(ds.get("AccessionNumber", "") or "") or None,
        dicom_header=header_bytes(ds),
        patient_id=str(ds.get("PatientID", "") or "") or None,
        study_instance_uid=str(ds.get("StudyInstanceUID", "") or "") or None,
        series_instance_uid=str(ds.get("SeriesInstanceUID", "") or "") or None,
        sop_instance_uid=sop_instance,
    )
    return ParsedInstance(study, sop_class, sop_instance)


def parse_part10(data: bytes, limits: Settings | None = None) -> ParsedInstance:
    return parse_dataset(read_part10(data), limits)
