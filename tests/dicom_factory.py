"""Test DICOM instances made with pydicom from HAM10000 images, with realistic headers:
VL Photographic / Dermoscopic Photography, JPEG baseline (the JPEG stored as is) or
uncompressed RGB, PatientAge like "055Y", PatientSex, a SNOMED AnatomicRegionSequence."""

from __future__ import annotations

import datetime as dt
import io

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from dermascan.ingest.dicom import DERMOSCOPIC_PHOTOGRAPHY

SITE_CODES = {
    "posterior torso": ("77568009", "Back"),
    "anterior torso": ("51185008", "Thorax"),
    "torso": ("22943007", "Trunk"),
    "head/neck": ("774007", "Head and neck"),
    "upper extremity": ("53120007", "Upper limb"),
    "lower extremity": ("61685007", "Lower limb"),
    "palms/soles": ("21547004", "Palm"),
    "oral/genital": ("263767004", "Genital structure"),
}
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def make_instance(
    jpeg: bytes,
    *,
    age: float | None = 55,
    sex: str | None = "female",
    site: str | None = "posterior torso",
    patient_id: str = "PAT-001",
    sop_class: str = DERMOSCOPIC_PHOTOGRAPHY,
    compressed: bool = True,
    study_uid: str | None = None,
    sop_uid: str | None = None,
    with_pixels: bool = True,
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit if compressed else ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    now = dt.datetime.now()
    ds.StudyDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.Modality = "DMS" if sop_class == DERMOSCOPIC_PHOTOGRAPHY else "XC"
    ds.Manufacturer = "DermaScan test factory"
    ds.AccessionNumber = "ACC" + ds.SOPInstanceUID[-8:]
    ds.PatientName = "Test^Patient"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    if age is not None:
        ds.PatientAge = f"{int(age):03d}Y"
    ds.PatientSex = {"female": "F", "male": "M"}.get(sex or "", "O")
    if site:
        code, meaning = SITE_CODES[site]
        region = Dataset()
        region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = code, "SCT", meaning
        ds.AnatomicRegionSequence = [region]
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
    with Image.open(io.BytesIO(jpeg)) as image:
        rgb = np.asarray(image.convert("RGB"))
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 3, 8, 8, 7
    ds.PixelRepresentation, ds.PlanarConfiguration = 0, 0
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.LossyImageCompression = "01" if compressed else "00"
    if with_pixels:
        if compressed:
            ds.PhotometricInterpretation = "YBR_FULL_422"
            ds.PixelData = encapsulate([jpeg])
            ds["PixelData"].VR = "OB"
        else:
            ds.PhotometricInterpretation = "RGB"
            ds.PixelData = rgb.tobytes()
    else:
        ds.PhotometricInterpretation = "RGB"
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write(ds: Dataset, path) -> None:
    ds.save_as(path, enforce_file_format=True)


def stow(
    base_url: str, token: str, parts: list[bytes], boundary: str = "dermascan-test-boundary", cut: int | None = None
):
    """POST Part-10 byte strings to STOW-RS as one multipart/related body (``cut``: only the
    first ``cut`` bytes of it, a body that breaks off)."""
    import requests

    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in parts
    )
    body += b"--" + boundary.encode() + b"--\r\n"
    return requests.post(
        f"{base_url}/dicomweb/studies",
        data=body if cut is None else body[:cut],
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        },
        timeout=60,
    )


def monochrome_uncompressed(jpeg: bytes, rows: int, columns: int) -> Dataset:
    """An uncompressed 8-bit monochrome VL Photographic instance of rows × columns random pixels
    (for the size limits: 7,000 × 7,000 is the 49 MB instance of the security review)."""
    import numpy as np

    from dermascan.ingest.dicom import VL_PHOTOGRAPHIC

    ds = make_instance(jpeg, sop_class=VL_PHOTOGRAPHIC, compressed=False)
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = rows, columns, 1, 8, 8, 7
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 0
    if "PlanarConfiguration" in ds:
        del ds.PlanarConfiguration
    ds.PixelData = np.random.default_rng(0).integers(0, 255, rows * columns, dtype=np.uint8).tobytes()
    return ds


def dciodvfy_errors(path) -> list[str]:
    """The errors dciodvfy (Debian's dicom3tools, the DICOM standard editor's validator) finds."""
    import shutil
    import subprocess

    tool = shutil.which("dciodvfy", path="/usr/bin:/usr/local/bin")
    assert tool, "dciodvfy is needed (Debian package dicom3tools; .ci/run installs it)"
    checked = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]


def content_items(dataset):
    """Every content item of a structured report, depth first."""
    for item in dataset.get("ContentSequence", []):
        yield item
        yield from content_items(item)
