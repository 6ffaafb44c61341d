"""Manifests: a CSV with ISIC-2024 column names (one row per lesion image) plus the images, as
a folder, a ZIP archive, or the ISIC-2024 layout (HDF5 of JPEG bytes + metadata CSV).

Row problems become row-level rejections (the other rows go ahead); a problem with the whole
input (no CSV, a required column missing, unknown columns, an unsafe ZIP) raises IngestError.
"""

from __future__ import annotations

import csv
import io
import posixpath
import zipfile
from pathlib import Path

from dermascan.ingest import follow_up
from dermascan.ingest.errors import IngestError, IngestTooLarge, Rejection
from dermascan.ingest.records import FIELD_ALIASES, PASSTHROUGH_NUMERIC, PASSTHROUGH_TEXT
from dermascan.ingest.types import StudyInput

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
ID_COLUMN = "isic_id"
TEMPLATE_COLUMNS = ["isic_id", "patient_id", "age_approx", "sex", "anatom_site_general", "lesion_id", "acquired_at"]
# Columns of the ISIC 2024 / HAM10000 metadata that are accepted and ignored (not model inputs).
INFORMATIONAL = {
    "image",
    "filename",
    "file",
    "lesion_id",
    "target",
    "localization",
    "diagnosis",
    "dx_type",
    "source",
    "image_width",
    "image_height",
    "attribution",
    "copyright_license",
    "iddx_full",
    "iddx_1",
    "iddx_2",
    "iddx_3",
    "iddx_4",
    "iddx_5",
    "mel_mitotic_index",
    "mel_thick_mm",
    "tbp_lv_dnn_lesion_confidence",
    "image_type",
    "external_id",
    "note",
    # lesion follow-up (ingest.follow_up)
    "acquired_at",
    "acquisition_date",
    "study_date",
    "visit_date",
}
KNOWN = set(TEMPLATE_COLUMNS) | set(FIELD_ALIASES) | set(PASSTHROUGH_NUMERIC) | set(PASSTHROUGH_TEXT) | INFORMATIONAL


def is_known_column(name: str) -> bool:
    return name in KNOWN or name.startswith("tbp_lv_") or name.startswith("tbp_")


def template_csv() -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(TEMPLATE_COLUMNS)
    writer.writerow(["ISIC_0000001", "PAT-0001", "55", "female", "posterior torso", "LES-0001", "2026-03-01"])
    return buffer.getvalue()


def read_csv(text: str) -> list[tuple[int, dict]]:
    """Parse a manifest CSV → [(line number, row)]. Checks the header as a whole."""
    text = text.lstrip("\ufeff")
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    if not header:
        raise IngestError("the manifest CSV is empty (expected a header row: " + ",".join(TEMPLATE_COLUMNS) + ")")
    reader.fieldnames = header
    if ID_COLUMN not in header and "image" not in header:
        raise IngestError(f"the manifest CSV has no {ID_COLUMN!r} column (its columns: {', '.join(header)})")
    duplicates = sorted({h for h in header if header.count(h) > 1})
    if duplicates:
        raise IngestError(f"the manifest CSV repeats column(s) {', '.join(duplicates)}")
    unknown = [h for h in header if not is_known_column(h)]
    if unknown:
        raise IngestError(
            f"the manifest CSV has unknown column(s) {', '.join(unknown)}; "
            f"use the ISIC-2024 names ({', '.join(TEMPLATE_COLUMNS)})"
        )
    rows = []
    for row in reader:
        line = reader.line_num
        if None in row:  # more cells than header columns
            rows.append(
                (line, {"__error__": f"has {len(header) + len(row[None])} cells but the header has {len(header)}"})
            )
            continue
        if all((v or "").strip() == "" for v in row.values()):
            continue
        rows.append((line, {k: (v.strip() if isinstance(v, str) else v) for k, v in row.items()}))
    return rows


def _image_name(row: dict) -> str | None:
    return row.get("image") or row.get(ID_COLUMN) or None


class AmbiguousImage(ValueError):
    """A manifest row names an image that more than one file of the upload could be."""


class ImageIndex:
    """The images of an upload by their full path inside it, for pairing manifest rows.

    A name with a folder in it (``left/lesion.jpg``) is matched by its path — relative to the
    manifest's folder, then to the archive's root; exactly, then ignoring case, then without its
    extension. A bare file name (``lesion.jpg``, or an id like ``ISIC_0024306``) is matched by the
    files of that name in any folder: one is taken, two or more make the row ambiguous (one
    patient's result must never be computed on another's image that happens to share its name).
    """

    def __init__(self, entries: dict, base: str = ""):
        self.entries = entries  # path → bytes, or a callable that reads them
        self.base = base.strip("/") + "/" if base.strip("/") else ""

    @staticmethod
    def _stem(path: str) -> str:
        root, ext = posixpath.splitext(path)
        return root if ext.lower() in IMAGE_SUFFIXES else path

    def _unique(self, candidates: list[str], name: str) -> str | None:
        found = sorted(set(candidates))
        if len(found) > 1:
            shown = ", ".join(found[:4]) + (", …" if len(found) > 4 else "")
            raise AmbiguousImage(
                f"the image {name!r} matches several files in the upload ({shown}): name it by its path in the ZIP"
            )
        return found[0] if found else None

    def resolve(self, name: str) -> str | None:
        """The path of the image ``name`` names (None: no such image; AmbiguousImage: several)."""
        wanted = posixpath.normpath(name.replace("\\", "/").strip()).lstrip("/")
        if wanted in (".", "") or wanted.startswith("../"):
            return None
        paths = list(self.entries)
        if "/" in wanted:
            for candidate in (self.base + wanted, wanted):
                if candidate in self.entries:
                    return candidate
            for key in (str.lower, lambda p: self._stem(p).lower()):
                for candidate in (self.base + wanted, wanted):
                    hit = self._unique([p for p in paths if key(p) == key(candidate)], name)
                    if hit:
                        return hit
            return None
        lower = wanted.lower()
        by_name = [p for p in paths if posixpath.basename(p).lower() == lower]
        if by_name:
            return self._unique(by_name, name)
        return self._unique([p for p in paths if self._stem(posixpath.basename(p)).lower() == lower], name)

    def read(self, path: str) -> bytes:
        value = self.entries[path]
        return value() if callable(value) else value


def rows_to_inputs(rows, find_image) -> tuple[list, list[Rejection]]:
    """Pair manifest rows with images: ``find_image`` is an :class:`ImageIndex` or a function
    ``name -> bytes | None``. A row whose image another row already took is refused: two rows,
    one image, is a manifest mistake that would score one lesion twice under two names."""
    inputs, rejected, seen = [], [], set()
    taken: dict[str, int] = {}
    for line, row in rows:
        if "__error__" in row:
            rejected.append(Rejection(line, f"row {row['__error__']}"))
            continue
        name = _image_name(row)
        external_id = row.get(ID_COLUMN) or name
        if not name:
            rejected.append(Rejection(line, f"no {ID_COLUMN}", None, ID_COLUMN))
            continue
        if external_id in seen:
            rejected.append(
                Rejection(line, f"{ID_COLUMN} {external_id!r} appears twice in the manifest", external_id, ID_COLUMN)
            )
            continue
        seen.add(external_id)
        if isinstance(find_image, ImageIndex):
            try:
                path = find_image.resolve(name)
            except AmbiguousImage as exc:
                rejected.append(Rejection(line, f"row {line} is ambiguous: {exc}", external_id, "image"))
                continue
            if path is not None and path in taken:
                rejected.append(Rejection(
                    line, f"the image {path!r} is already the image of line {taken[path]}", external_id, "image"
                ))  # fmt: skip
                continue
            data = None if path is None else find_image.read(path)
            if path is not None:
                taken[path] = line
        else:
            data = find_image(name)
        if data is None:
            rejected.append(
                Rejection(line, f"no image named {name!r} (.jpg, .jpeg or .png) was found", external_id, "image")
            )
            continue
        lesion_id, acquired_at, date_field = follow_up.from_record(row)
        inputs.append(
            StudyInput(
                image=data, metadata=row, external_id=external_id, patient_id=row.get("patient_id"), row=line,
                lesion_id=lesion_id, acquired_at=acquired_at, acquired_at_field=date_field,
            )
        )  # fmt: skip
    return inputs, rejected


def from_folder(folder: Path, limit: int | None = None):
    """A folder of images with an optional ``manifest.csv`` (or ``metadata.csv``); without one,
    every image is a study with unknown metadata."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    index = ImageIndex({p.name: p.read_bytes for p in files})
    csv_path = next((folder / n for n in ("manifest.csv", "metadata.csv") if (folder / n).is_file()), None)
    if csv_path is None:
        rows = [(i + 1, {ID_COLUMN: p.stem, "image": p.name}) for i, p in enumerate(files)]
    else:
        rows = read_csv(csv_path.read_text(encoding="utf-8-sig"))
    return rows_to_inputs(rows[:limit] if limit else rows, index)


def isic_layout(folder: Path) -> bool:
    folder = Path(folder)
    return any((folder / n).is_file() for n in ("images.hdf5", "train-image.hdf5")) and any(
        (folder / n).is_file() for n in ("metadata.csv", "train-metadata.csv")
    )


def from_isic_layout(folder: Path, limit: int | None = None, offset: int = 0):
    """ISIC-2024 layout: rows of the metadata CSV paired with the HDF5's JPEG bytes."""
    import h5py

    folder = Path(folder)
    csv_path = next(folder / n for n in ("metadata.csv", "train-metadata.csv") if (folder / n).is_file())
    h5_path = next(folder / n for n in ("images.hdf5", "train-image.hdf5") if (folder / n).is_file())
    rows = read_csv(csv_path.read_text(encoding="utf-8-sig"))
    rows = rows[offset : offset + limit] if limit else rows[offset:]
    with h5py.File(h5_path, "r") as h5:

        def find(name: str):
            if name not in h5:
                return None
            value = h5[name][()]
            return value.tobytes() if hasattr(value, "tobytes") else bytes(value)

        return rows_to_inputs(rows, find)


def _wanted(name: str) -> bool:
    """Images and the manifest are read; anything else in a ZIP is skipped unread."""
    base = posixpath.basename(name.replace("\\", "/")).lower()
    return base.endswith((*IMAGE_SUFFIXES, ".csv")) and not base.startswith("._")


def read_zip(data: bytes, max_entries: int, max_total: int, max_ratio: int, max_entry: int) -> dict[str, bytes]:
    """Open a ZIP safely → {name: bytes} of its images and manifest: refuses path traversal,
    absolute names, links, too many entries, an entry over ``max_entry`` bytes, too much
    uncompressed data and suspicious compression ratios (ZIP bombs), checking the declared sizes
    first and the real ones while reading. Other entries are skipped without being read."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise IngestError("the upload is not a valid ZIP archive") from None
    infos = [i for i in archive.infolist() if not i.is_dir()]
    if len(infos) > max_entries:
        raise IngestError(f"the ZIP has {len(infos):,} files, over the limit of {max_entries:,}")
    infos = [i for i in infos if _wanted(i.filename)]
    for info in infos:
        if info.file_size > max_entry:
            raise IngestTooLarge(
                f"the ZIP entry {info.filename!r} is {info.file_size:,} bytes, over the limit of {max_entry:,} for one file",
            )
    declared = sum(i.file_size for i in infos)
    if declared > max_total:
        raise IngestTooLarge(f"the ZIP would unpack to {declared:,} bytes, over the limit of {max_total:,}")
    out: dict[str, bytes] = {}
    total = 0
    for info in infos:
        name = info.filename.replace("\\", "/")
        normal = posixpath.normpath(name)
        if (
            name.startswith("/")
            or normal.startswith("../")
            or normal == ".."
            or "/../" in f"/{name}/"
            or ":" in name.split("/")[0]
        ):
            raise IngestError(
                f"the ZIP entry {info.filename!r} points outside the archive (path traversal); refusing the archive"
            )
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise IngestError(f"the ZIP entry {info.filename!r} is a symbolic link; refusing the archive")
        if info.compress_size and info.file_size / info.compress_size > max_ratio:
            raise IngestError(
                f"the ZIP entry {info.filename!r} expands {info.file_size / info.compress_size:,.0f}-fold "
                f"(limit {max_ratio}); refusing a possible ZIP bomb"
            )
        with archive.open(info) as member:
            content = member.read(info.file_size + 1)
        if len(content) > info.file_size:
            raise IngestError(f"the ZIP entry {info.filename!r} is larger than it declares; refusing the archive")
        total += len(content)
        if total > max_total:
            raise IngestTooLarge(f"the ZIP unpacks to more than {max_total:,} bytes")
        if normal.startswith("__MACOSX/") or posixpath.basename(normal).startswith("._"):
            continue
        if normal in out:
            raise IngestError(
                f"the ZIP holds two entries named {normal!r}: which one is the image is not known; refusing the archive"
            )
        out[normal] = content
    return out


def from_zip(data: bytes, settings, csv_text: str | None = None):
    """A ZIP of images plus a manifest CSV (inside the ZIP, or given separately)."""
    files = read_zip(
        data, settings.max_zip_entries, settings.max_zip_uncompressed_bytes, settings.max_zip_ratio,
        settings.max_image_bytes,
    )  # fmt: skip
    csvs = [n for n in files if n.lower().endswith(".csv")]
    csv_text_from_zip = csv_text is None
    if csv_text is None:
        if not csvs:
            raise IngestError("the ZIP has no manifest CSV (download the template from the upload page)")
        if len(csvs) > 1:
            raise IngestError(
                f"the ZIP has several CSV files ({', '.join(sorted(csvs))}); put exactly one manifest in it"
            )
        try:
            csv_text = files[csvs[0]].decode("utf-8-sig")
        except UnicodeDecodeError:
            raise IngestError(f"{csvs[0]} is not UTF-8 text") from None
    images = {name: content for name, content in files.items() if name.lower().endswith(IMAGE_SUFFIXES)}
    base = posixpath.dirname(csvs[0]) if csvs and csv_text_from_zip else ""
    return rows_to_inputs(read_csv(csv_text), ImageIndex(images, base))
