"""Another camera's exposure and colour cast, moved back to the edge of what the network knows.

HAM10000's two sites photographed every lesion with much the same exposure and colour; a network
trained there scores a darker or a cooler picture of the same lesion lower (the shipped v4.1 on the
calibration set: exposure −20 % sensitivity 0.938 → 0.914, a cooler white balance 0.909). A full
colour constancy at inference undoes the shift but costs the pictures as taken (the network reads
the colour it would take away: docs/model.md "Another camera"). This is milder: each image's
exposure (the median of its brightest channel) and colour cast (Shades of Gray, p = 6, as
log R/G and log B/G) are measured, and an image **outside** the development images' central range
is moved to its edge by one gain per channel; an image inside it is left exactly as it is. No gain
exceeds the camera augmentation's ±25 %, so a frame far too dark stays dark — and the quality
checks see every image as it came (the Predictor measures before this step). A colour cast that
would need more than that is not a dermatoscope's white balance but another kind of picture (a
photograph, a chart): it is left as it is, so that the gate's features see it as it came (moving
it towards a lesion's colours, capped at 25 %, made the gate pass 7 more of its 490 made-up negatives).

A bundle asks for it in its manifest (``preprocessing.camera``: the ranges, fitted on the
development images by ``dermascan camera-fit``); the Predictor, the workers' heat maps and the
edge scorer apply it alike, after the circular field's fill (model.inference.field), before the
network. numpy and Pillow only (the edge scorer's distribution has no scipy).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from model.inference import field

MAX_GAIN = 1.25  # no channel moved by more than the camera augmentation's ±25 %
SOG_POWER = 6  # Shades of Gray's Minkowski norm (Finlayson and Trezzi, 2004)
MANIFEST_NOTE = (
    "an image whose exposure (median of the brightest channel) or colour cast (Shades of Gray, p = 6: "
    "log R/G, log B/G) lies outside the development images' range moved to its edge, at most ±25 % a channel; "
    "a colour cast further out than that left as it is"
)
_POWER = (np.arange(256, dtype=np.float64) / 255.0) ** SOG_POWER  # a table: uint8 → its sixth power


def statistics(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``pixels`` (n, h, w, 3) uint8 → (exposure (n,): the median of each pixel's brightest channel,
    0–255; colour cast (n, 2): Shades of Gray's log R/G and log B/G). Both from histograms (Pillow
    counts the values per channel), so exact and cheap on a worker's batch."""
    pixels = np.asarray(pixels, dtype=np.uint8)
    n = len(pixels)
    exposure, norm = np.zeros(n, np.float32), np.zeros((n, 3), np.float64)
    count = pixels.shape[1] * pixels.shape[2] if n else 0
    for i in range(n):
        image = np.ascontiguousarray(pixels[i])
        brightest = np.maximum(np.maximum(image[..., 0], image[..., 1]), image[..., 2])
        cumulative = np.cumsum(Image.fromarray(brightest, "L").histogram())
        # np.median's two middle values (the same one for an odd count), from the cumulative counts
        lower, upper = np.searchsorted(cumulative, [(count - 1) // 2 + 1, count // 2 + 1])
        exposure[i] = (lower + upper) / 2
        norm[i] = np.asarray(Image.fromarray(image, "RGB").histogram(), np.float64).reshape(3, 256) @ _POWER
    norm = np.maximum((norm / max(count, 1)) ** (1.0 / SOG_POWER) * 255.0, 1.0)
    cast = np.log(norm[:, [0, 2]] / norm[:, [1]]).astype(np.float32)
    return exposure, cast


def fit(pixels: np.ndarray, exposure_percentile, colour_percentile: float) -> dict:
    """The manifest's ``preprocessing.camera`` block from the development images (their pixels as
    the network gets them, after the field's fill): each measure's P-th..(100−P)-th percentiles.
    ``exposure_percentile`` may be a pair (P below, P above; 0 leaves that side open: e.g. (20, 0)
    brightens the darkest images and leaves the brightest alone). A percentile of 0 (both) leaves
    that measure alone."""
    exposure, cast = statistics(pixels)
    block: dict = {"method": MANIFEST_NOTE, "max_gain": MAX_GAIN, "fitted_on": int(len(pixels))}
    below, above = np.broadcast_to(np.asarray(exposure_percentile or 0, np.float64), 2)
    if below or above:
        low, high = np.percentile(exposure, [below, 100 - above])
        block["exposure"] = {
            "percentile": [float(below), float(above)],
            "range": [float(low) if below else None, float(high) if above else None],  # None: that side open
        }
    if colour_percentile:
        low, high = np.percentile(cast, [colour_percentile, 100 - colour_percentile], axis=0)
        block["colour_cast"] = {
            "percentile": float(colour_percentile),
            "range": [[float(v) for v in low], [float(v) for v in high]],  # [log R/G, log B/G] low, high
        }
    return block


class CameraClamp:
    """The step itself: callable on (n, h, w, 3) uint8 pixels; a copy only where something moves."""

    def __init__(self, block: dict):
        self.max_gain = float(block.get("max_gain", MAX_GAIN))
        if not 1.0 <= self.max_gain <= 4.0:
            raise ValueError(f"preprocessing.camera.max_gain {self.max_gain}: expected 1–4")
        exposure = block.get("exposure")
        self.exposure = None
        if exposure is not None:  # a side given as None is open
            low, high = exposure["range"]
            self.exposure = np.array([-np.inf if low is None else low, np.inf if high is None else high], np.float32)
        colour = block.get("colour_cast")
        self.colour = None if colour is None else np.asarray(colour["range"], np.float32).reshape(2, 2)
        for name, value in (("exposure", self.exposure), ("colour_cast", self.colour)):
            if value is not None and (np.any(np.isnan(value)) or np.any(value[0] > value[1])):
                raise ValueError(f"preprocessing.camera.{name}: a range whose low end is above its high end")

    def gains(self, pixels: np.ndarray) -> np.ndarray:
        """Per image, the gain of each channel (n, 3): 1 where the image is inside the ranges."""
        exposure, cast = statistics(pixels)
        gains = np.ones((len(exposure), 3), np.float64)
        if self.colour is not None:
            moved = np.clip(cast, self.colour[0], self.colour[1]) - cast  # log R/G and log B/G
            # a cast further out than the largest gain is no dermatoscope's white balance: left as it
            # is, for the gate to judge (moved, a photograph's or a chart's features look like a lesion's)
            moved[np.abs(moved).max(axis=1) > np.log(self.max_gain)] = 0.0
            gains[:, 0] *= np.exp(moved[:, 0])
            gains[:, 2] *= np.exp(moved[:, 1])
        if self.exposure is not None:
            target = np.clip(exposure, self.exposure[0], self.exposure[1])
            gains *= (target / np.maximum(exposure, 1.0))[:, None]
        return np.clip(gains, 1.0 / self.max_gain, self.max_gain)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        pixels = np.asarray(pixels)
        if pixels.ndim != 4 or not len(pixels):
            return pixels
        gains = self.gains(pixels)
        moved = np.flatnonzero(np.any(np.abs(gains - 1.0) > 1e-6, axis=1))
        if not len(moved):
            return pixels
        out = pixels.copy()
        levels = np.arange(256, dtype=np.float32)
        for i in moved:  # one table per channel (Pillow applies it): value → rint(value × gain), a float32 product
            tables = np.clip(np.rint(levels[None, :] * gains[i, :, None].astype(np.float32)), 0, 255).astype(np.uint8)
            out[i] = np.asarray(Image.fromarray(np.ascontiguousarray(pixels[i]), "RGB").point(tables.ravel().tolist()))
        return out


def _as_taken(pixels: np.ndarray) -> np.ndarray:
    return pixels


def for_manifest(manifest: dict):
    """The step a bundle's (or an edge package's) manifest asks for after the field's fill:
    the clamp where ``preprocessing.camera`` holds ranges, else the pixels as they are."""
    block = (manifest.get("preprocessing") or {}).get("camera")
    if not isinstance(block, dict) or not (block.get("exposure") or block.get("colour_cast")):
        return _as_taken
    return CameraClamp(block)


def steps(manifest: dict):
    """Both steps a bundle's (or an edge package's) manifest asks for between resizing and the
    network, in order: (the circular field's fill, before the quality measures; this clamp, after
    them). Every scorer takes them from here, so none applies one without the other."""
    return field.for_manifest(manifest), for_manifest(manifest)
