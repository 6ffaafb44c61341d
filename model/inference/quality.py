"""Image-quality checks run on every image before its score is trusted: exposure, contrast,
focus, noise and size — cheap, explainable measures, each with a reason a person understands.

The measures are taken on the model's own input (the whole image resized to the bundle's input
size) so that the thresholds fitted on the development images apply unchanged in production, plus
the original width and height. Thresholds live in the bundle (``manifest["gate"]["quality"]``):
they are fitted on the development data with a margin beyond the range real dermoscopy covers
(:func:`fit_thresholds`), so a clean lesion image passes and a blank, blown-out or smeared frame
does not. Pure numpy: no Keras.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# the measures, in the order the checks are tried (the first failing one is the reason given)
MEASURES = (
    "min_side", "aspect", "brightness", "dark_fraction", "bright_fraction", "contrast", "sharpness", "detail",
    "noise", "colourfulness",
)  # fmt: skip

REASONS = {
    "min_side": "image too small",
    "aspect": "image cropped or distorted (aspect ratio)",
    "brightness": "too dark",
    "brightness_high": "overexposed",
    "dark_fraction": "too dark",
    "bright_fraction": "overexposed",
    "contrast": "no contrast (blank or uniform image)",
    "sharpness": "blurred",
    "detail": "blurred",
    "noise": "too noisy",
    "colourfulness": "not a dermoscopic lesion image (no colour)",
}


def _luma(pixels: np.ndarray) -> np.ndarray:
    """(n, h, w, 3) uint8 → (n, h, w) float32 luma (ITU-R BT.601)."""
    rgb = pixels.astype(np.float32)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


def _laplacian(luma: np.ndarray) -> np.ndarray:
    """4-neighbour Laplacian of (n, h, w) images, on the interior pixels."""
    return luma[:, :-2, 1:-1] + luma[:, 2:, 1:-1] + luma[:, 1:-1, :-2] + luma[:, 1:-1, 2:] - 4.0 * luma[:, 1:-1, 1:-1]


_CHUNK = 8  # images measured together (each measure is per image: the chunking changes no bit)


def _half(luma: np.ndarray) -> np.ndarray:
    """The 2×2 block means of (n, h, w) images (odd last rows and columns dropped) — the same bits
    as ``reshape(n, h/2, 2, w/2, 2).mean(axis=(2, 4))``, whose strided reduction cost a third of
    the measures."""
    h, w = luma.shape[1] // 2 * 2, luma.shape[2] // 2 * 2
    top = luma[:, 0:h:2, 0:w:2] + luma[:, 0:h:2, 1:w:2]
    bottom = luma[:, 1:h:2, 0:w:2] + luma[:, 1:h:2, 1:w:2]
    return (top + bottom) / np.float32(4)


def measure(pixels: np.ndarray, sizes: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The quality measures of a batch of model-input images (n, s, s, 3) uint8.

    ``sizes`` holds the original (width, height) per image (unknown: the model size is assumed).
    - brightness: mean luma (0–255); dark_fraction / bright_fraction: share of pixels below 16 /
      above 247 luma; contrast: luma standard deviation;
    - sharpness: standard deviation of the Laplacian of a 2×-downsampled luma (fine detail that
      survives downsampling: low for a blurred frame);
    - detail: sharpness over contrast (a blurred frame keeps its contrast but loses its detail);
    - noise: the Laplacian's standard deviation at full size over that at half size (pixel-level
      noise dominates the full-size Laplacian, real structure both);
    - colourfulness: Hasler and Süsstrunk's measure (dermoscopy is always in colour; a grey-scale
      picture is something else);
    - min_side and aspect of the original image.
    """
    pixels = np.asarray(pixels)
    if len(pixels) > _CHUNK:  # a few images at a time: their float copies stay in the cache
        sizes = None if sizes is None else np.asarray(sizes, dtype=np.float32).reshape(len(pixels), 2)
        parts = [
            measure(pixels[i : i + _CHUNK], None if sizes is None else sizes[i : i + _CHUNK])
            for i in range(0, len(pixels), _CHUNK)
        ]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    n = len(pixels)
    luma = _luma(pixels)
    half = _half(luma)
    lap_full = _laplacian(luma).reshape(n, -1).std(axis=1)
    lap_half = _laplacian(half).reshape(n, -1).std(axis=1)
    if sizes is None:
        sizes = np.tile(np.array([pixels.shape[2], pixels.shape[1]], np.float32), (n, 1))  # (width, height)
    sizes = np.asarray(sizes, dtype=np.float32).reshape(n, 2)
    flat = luma.reshape(n, -1)
    rgb = pixels.reshape(n, -1, 3).astype(np.float32)
    rg, yb = rgb[..., 0] - rgb[..., 1], 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    colourfulness = np.sqrt(rg.std(axis=1) ** 2 + yb.std(axis=1) ** 2) + 0.3 * np.sqrt(
        rg.mean(axis=1) ** 2 + yb.mean(axis=1) ** 2
    )
    return {
        "colourfulness": colourfulness,
        "brightness": flat.mean(axis=1),
        "dark_fraction": (flat < 16).mean(axis=1),
        "bright_fraction": (flat > 247).mean(axis=1),
        "contrast": flat.std(axis=1),
        "sharpness": lap_half,
        "detail": lap_half / np.maximum(flat.std(axis=1), 1e-3),
        "noise": lap_full / np.maximum(lap_half, 1e-3),
        "min_side": sizes.min(axis=1),
        "aspect": sizes.max(axis=1) / np.maximum(sizes.min(axis=1), 1.0),
    }


@dataclass(frozen=True)
class QualityThresholds:
    """The defaults hold for any bundle made before the gate existed: only the checks that do not
    depend on the input resolution (exposure, contrast, colour, size), set just outside what
    HAM10000 dermoscopy covers at 128 px. Blur and noise need thresholds fitted at the bundle's
    own size (:func:`fit_thresholds`); by default they are off."""

    min_side: float = 64.0
    max_aspect: float = 3.0
    min_brightness: float = 40.0
    max_brightness: float = 240.0
    max_dark_fraction: float = 0.6
    max_bright_fraction: float = 0.55
    min_contrast: float = 3.0
    min_sharpness: float = 0.0
    min_detail: float = 0.0
    max_noise: float = float("inf")
    min_colourfulness: float = 4.0

    def to_dict(self) -> dict:
        return {k: round(float(v), 4) for k, v in asdict(self).items() if np.isfinite(v)}

    @classmethod
    def from_dict(cls, data: dict | None) -> QualityThresholds:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: float(v) for k, v in (data or {}).items() if k in known})

    def failures(self, m: dict[str, np.ndarray]) -> list[str | None]:
        """The first failing check's reason per image, or None when every check passes."""
        checks = (
            ("min_side", m["min_side"] < self.min_side),
            ("aspect", m["aspect"] > self.max_aspect),
            ("brightness", m["brightness"] < self.min_brightness),
            ("brightness_high", m["brightness"] > self.max_brightness),
            ("dark_fraction", m["dark_fraction"] > self.max_dark_fraction),
            ("bright_fraction", m["bright_fraction"] > self.max_bright_fraction),
            ("contrast", m["contrast"] < self.min_contrast),
            ("sharpness", m["sharpness"] < self.min_sharpness),
            ("detail", m["detail"] < self.min_detail),
            ("noise", m["noise"] > self.max_noise),
            ("colourfulness", m["colourfulness"] < self.min_colourfulness),
        )
        out: list[str | None] = [None] * len(m["brightness"])
        for name, failed in checks:
            for i in np.flatnonzero(failed):
                if out[i] is None:
                    out[i] = REASONS[name]
        return out


def fit_thresholds(m: dict[str, np.ndarray], margin: float = 0.5) -> QualityThresholds:
    """Thresholds beyond the range of the development images: a lower bound at the measure's
    0.1st percentile less ``margin`` of it, an upper bound at its 99.9th percentile plus ``margin``
    of the way to the measure's limit (noise: 1 + ``margin`` times its 99.9th percentile). Size and
    aspect keep their fixed limits (development images all have one size)."""

    def low(name):
        return float(np.percentile(m[name], 0.1) * (1 - margin))

    def high(name, limit):
        top = float(np.percentile(m[name], 99.9))
        return top + margin * (limit - top)

    return QualityThresholds(
        min_brightness=low("brightness"),
        max_brightness=high("brightness", 255.0),
        max_dark_fraction=high("dark_fraction", 1.0),
        max_bright_fraction=high("bright_fraction", 1.0),
        min_contrast=low("contrast"),
        min_sharpness=low("sharpness"),
        min_detail=low("detail"),
        max_noise=float(np.percentile(m["noise"], 99.9)) * (1 + margin),
        min_colourfulness=low("colourfulness"),
    )
