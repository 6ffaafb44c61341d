"""Reading images and the ISIC-2024 data layout.

The layout (as in the ISIC 2024 Kaggle challenge): ``images.hdf5`` (or ``train-image.hdf5``)
holding one scalar byte-string dataset of JPEG bytes per ``isic_id``, plus ``metadata.csv``
(or ``train-metadata.csv``). Images are decoded with Pillow into uint8 numpy arrays in a thread
pool, so the reader works the same on the TensorFlow and the JAX backend.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from model.errors import ImageDecodeError, ModelError

IMAGE_FILES = ("images.hdf5", "train-image.hdf5", "image.hdf5")
METADATA_FILES = ("metadata.csv", "train-metadata.csv")
# Decompression-bomb guard: refuse images with more pixels than this before decoding them.
MAX_PIXELS = 40_000_000

Image.MAX_IMAGE_PIXELS = MAX_PIXELS

# A network's input size: an int for a square input, or [height, width] (the order of the pixel
# arrays) for a rectangular one — as written in a training config and a bundle's manifest.
Size = int | Sequence[int]


def image_shape(size: Size) -> tuple[int, int]:
    """The (height, width) of an input size: ``128`` → (128, 128), ``[144, 192]`` → (144, 192)."""
    if isinstance(size, (int, np.integer)):
        shape = (int(size), int(size))
    else:
        values = list(size)
        if len(values) != 2:
            raise ModelError(f"image size {size!r}: one side, or [height, width]")
        shape = (int(values[0]), int(values[1]))
    if min(shape) < 1:
        raise ModelError(f"image size {size!r}: each side at least one pixel")
    return shape


def canonical_size(size: Size) -> int | list[int]:
    """The form a config and a manifest keep: an int when square, else [height, width]."""
    height, width = image_shape(size)
    return height if height == width else [height, width]


def parse_size(text: str) -> int | list[int]:
    """A size as a person writes it: ``160`` (square) or ``192x144`` (WIDTHxHEIGHT, as image
    sizes are usually written: HAM10000's own 600x450 is landscape) → :func:`canonical_size`."""
    parts = str(text).lower().replace("×", "x").split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise ModelError(f"image size {text!r}: a number of pixels (160) or WIDTHxHEIGHT (192x144)")
    values = [int(p) for p in parts]
    if min(values) < 32 or max(values) > 1024:
        raise ModelError(f"image size {text!r}: each side must be 32-1024 pixels")
    return canonical_size(values[0] if len(values) == 1 else [values[1], values[0]])


def size_label(size: Size) -> str:
    """``128px`` or ``192x144px`` (width x height), for versions and titles."""
    height, width = image_shape(size)
    return f"{width}px" if height == width else f"{width}x{height}px"


def decode_image(data: bytes, size: Size, key=None, max_pixels: int = MAX_PIXELS, original: list | None = None):
    """JPEG/PNG bytes → uint8 array (height, width, 3) of ``size``, RGB. Raises ImageDecodeError
    naming ``key``. ``original``, when given, receives the image's own (width, height)."""
    target = image_shape(size)
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if original is not None:
                original[:] = [width, height]
            if width * height > max_pixels:
                raise ImageDecodeError(key, f"image of {width}x{height} pixels is over the limit of {max_pixels}")
            image.draft("RGB", target[::-1])  # JPEG: let the decoder downscale by 2/4/8 first
            image = image.convert("RGB")
            image.load()
            return resize(np.asarray(image), size)
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = "not a readable JPEG or PNG image" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise ImageDecodeError(key, reason) from exc


def resize(array: np.ndarray, size: Size) -> np.ndarray:
    """Resize an RGB uint8 array to ``size`` (the whole image, aspect not kept)."""
    height, width = image_shape(size)
    if array.shape[:2] == (height, width):
        return np.ascontiguousarray(array, dtype=np.uint8)
    image = Image.fromarray(np.asarray(array, dtype=np.uint8))
    return np.asarray(image.resize((width, height), Image.BILINEAR, reducing_gap=2.0), dtype=np.uint8)


def decode_many(
    items: Sequence[tuple[object, bytes]], size: Size, workers: int | None = None, sizes: np.ndarray | None = None
):
    """Decode (key, bytes) pairs in parallel → (array (n, height, width, 3), {index: error}).
    ``sizes``, an (n, 2) array when given, receives each image's own (width, height)."""
    out = np.zeros((len(items), *image_shape(size), 3), dtype=np.uint8)
    errors: dict[int, ImageDecodeError] = {}

    def one(i):
        key, data = items[i]
        original: list = []
        try:
            out[i] = decode_image(data, size, key, original=original)
            if sizes is not None:
                sizes[i] = original
        except ImageDecodeError as exc:
            errors[i] = exc

    workers = workers or min(8, (os.cpu_count() or 2) * 2)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(len(items))))
    return out, errors


def find_file(directory: Path, names: Sequence[str]) -> Path:
    for name in names:
        if (directory / name).is_file():
            return directory / name
    raise ModelError(f"{directory}: no {' or '.join(names)} (expected the ISIC-2024 layout)")


@dataclass
class IsicDataset:
    """An ISIC-2024-layout folder: metadata as a DataFrame plus lazy access to image bytes."""

    directory: Path
    metadata: object  # pandas.DataFrame
    image_path: Path

    @classmethod
    def open(cls, directory, limit: int | None = None) -> IsicDataset:
        import pandas as pd

        directory = Path(directory)
        if not directory.is_dir():
            raise ModelError(f"{directory}: not a folder")
        csv = find_file(directory, METADATA_FILES)
        metadata = pd.read_csv(csv, low_memory=False)
        missing = {"isic_id"} - set(metadata.columns)
        if missing:
            raise ModelError(f"{csv}: missing column(s) {', '.join(sorted(missing))}")
        if limit:
            metadata = metadata.iloc[:limit].copy()
        return cls(directory, metadata.reset_index(drop=True), find_file(directory, IMAGE_FILES))

    @property
    def ids(self) -> list[str]:
        return [str(v) for v in self.metadata["isic_id"]]

    def read_bytes(self, ids: Sequence[str]) -> list[bytes]:
        import h5py

        out = []
        with h5py.File(self.image_path, "r") as h5:
            for isic_id in ids:
                if isic_id not in h5:
                    raise ImageDecodeError(isic_id, f"not found in {self.image_path.name}")
                value = h5[isic_id][()]
                out.append(value.tobytes() if isinstance(value, np.ndarray) else bytes(value))
        return out

    def load_images(
        self, size: Size, ids: Sequence[str] | None = None, progress=None, sizes: np.ndarray | None = None
    ) -> np.ndarray:
        """Decode and resize images (all, or ``ids``) → uint8 (n, height, width, 3); ``sizes``, an
        (n, 2) array when given, receives each image's own (width, height).

        A corrupt or missing image raises :class:`ImageDecodeError` naming its ``isic_id``.
        """
        ids = list(self.ids if ids is None else ids)
        out = np.zeros((len(ids), *image_shape(size), 3), dtype=np.uint8)
        step = 512
        for start in range(0, len(ids), step):
            chunk = ids[start : start + step]
            found = None if sizes is None else sizes[start : start + len(chunk)]
            arrays, errors = decode_many(list(zip(chunk, self.read_bytes(chunk))), size, sizes=found)
            if errors:
                raise next(iter(errors.values()))
            out[start : start + len(chunk)] = arrays
            if progress:
                progress(len(chunk))
        return out

    def targets(self) -> np.ndarray:
        if "target" not in self.metadata.columns:
            raise ModelError(f"{self.directory}: metadata has no 'target' column")
        return self.metadata["target"].astype(int).to_numpy()

    def groups(self) -> np.ndarray:
        for column in ("patient_id", "lesion_id", "isic_id"):
            if column in self.metadata.columns:
                return self.metadata[column].fillna("").astype(str).to_numpy()
        raise AssertionError("unreachable: isic_id is required")
