"""Image checks at the door: a JPEG or PNG that decodes completely, within the size limits.

This runs in the web process, so it uses Pillow only (no Keras). JPEGs are decoded in draft
mode (DCT scaling) — cheap, yet the whole stream is read, so a truncated file is caught here
rather than in the worker.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

ALLOWED_FORMATS = {"JPEG": "jpeg", "PNG": "png"}


class ImageRejected(ValueError):
    pass


@dataclass
class ImageInfo:
    format: str
    width: int
    height: int


def inspect_image(data: bytes, max_bytes: int, max_pixels: int) -> ImageInfo:
    if not data:
        raise ImageRejected("the image is empty")
    if len(data) > max_bytes:
        raise ImageRejected(f"the image is {len(data):,} bytes, over the limit of {max_bytes:,}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                fmt = image.format
                if fmt not in ALLOWED_FORMATS:
                    raise ImageRejected(f"unsupported image format {fmt or 'unknown'} (JPEG or PNG expected)")
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageRejected(
                        f"the image is {width}x{height} pixels, over the limit of {max_pixels:,} pixels"
                    )
                if width < 16 or height < 16:
                    raise ImageRejected(f"the image is only {width}x{height} pixels (at least 16x16 needed)")
                if fmt == "JPEG":
                    image.draft("RGB", (max(64, width // 8), max(64, height // 8)))
                image.load()
    except ImageRejected:
        raise
    except UnidentifiedImageError:
        raise ImageRejected("not an image (JPEG or PNG expected)") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageRejected(f"the image is too large to decode safely ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        reason = str(exc)
        if "truncated" in reason.lower() or "premature" in reason.lower():
            reason = "the image file is truncated"
        raise ImageRejected(f"the image cannot be decoded: {reason}") from None
    return ImageInfo(ALLOWED_FORMATS[fmt], width, height)
