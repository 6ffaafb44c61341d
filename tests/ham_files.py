"""Building upload payloads (ZIP + manifest CSV, JSON records) from HAM10000 images."""

from __future__ import annotations

import base64
import csv
import io
import zipfile
from pathlib import Path

import h5py
import pandas as pd

COLUMNS = ["isic_id", "patient_id", "age_approx", "sex", "anatom_site_general"]


def ham_rows(ham: Path, n: int, offset: int = 0) -> pd.DataFrame:
    return pd.read_csv(ham / "metadata.csv").iloc[offset : offset + n]


def ham_images(ham: Path, ids) -> dict[str, bytes]:
    with h5py.File(ham / "images.hdf5", "r") as h5:
        return {i: h5[i][()].tobytes() if hasattr(h5[i][()], "tobytes") else bytes(h5[i][()]) for i in ids}


def manifest_csv(rows: pd.DataFrame, columns=COLUMNS) -> str:
    buffer = io.StringIO()
    rows[columns].to_csv(buffer, index=False)
    return buffer.getvalue()


def zip_bytes(files: dict[str, bytes], compression=zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def ham_zip(ham: Path, n: int, offset: int = 0, with_manifest: bool = True) -> tuple[bytes, pd.DataFrame]:
    rows = ham_rows(ham, n, offset)
    files = {f"images/{i}.jpg": data for i, data in ham_images(ham, rows.isic_id).items()}
    if with_manifest:
        files["manifest.csv"] = manifest_csv(rows).encode()
    return zip_bytes(files), rows


def json_records(ham: Path, n: int, offset: int = 0) -> list[dict]:
    rows = ham_rows(ham, n, offset)
    images = ham_images(ham, rows.isic_id)
    out = []
    for row in rows.itertuples():
        out.append(
            {
                "external_id": row.isic_id,
                "patient_id": row.patient_id,
                "age_approx": None if pd.isna(row.age_approx) else float(row.age_approx),
                "sex": None if pd.isna(row.sex) else row.sex,
                "anatom_site_general": None if pd.isna(row.anatom_site_general) else row.anatom_site_general,
                "image_base64": base64.b64encode(images[row.isic_id]).decode(),
            }
        )
    return out


def read_csv_text(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))
