"""A contact dermatoscope's circular field of view: black outside a disc.

HAM10000's two sites rarely show it (about 2 % of its images have three or four black corners), so a
network trained there reads a black surround as information it never learned: the shipped v4 kept
its AUC on a circular field (0.876 against 0.882 on the calibration set) but its scores fell, and its
sensitivity at the threshold with them (0.938 → 0.880). Filling the surround with the colour of the
field's own rim gives the network the image it knows: sensitivity 0.933, specificity 0.645 (0.649
as taken), while the images as taken hardly move (27 of 1,073 changed, AUC 0.8815 → 0.8817).
docs/model.md "Another camera" has the table and the command.

A bundle asks for it in its manifest (``preprocessing.field_of_view``); the Predictor, the worker's
heat maps and the edge scorer apply it after decoding and resizing, before the network.
"""

from __future__ import annotations

import numpy as np

DARK = 40  # the brightest channel below this: outside the field (JPEG keeps a black surround near 0)
CORNERS = 3  # of the four corners, at least this many dark
SHARE = (0.03, 0.60)  # the surround's share of the image: less is a vignette's corner, more is no field
MANIFEST_NOTE = "a dark surround outside a circular field of view filled with the field rim's median colour"


def fill_outside_field(pixels: np.ndarray) -> np.ndarray:
    """``pixels`` (n, h, w, 3) uint8 → the same, each image with a dark surround (near-black pixels
    connected to its border, holding at least three of its corners and 3–60 % of the image) filled
    with the median colour of a thin rim just inside it. Images without one are left as they are;
    a copy is made only when something changes."""
    pixels = np.asarray(pixels)
    if pixels.ndim != 4 or not len(pixels):
        return pixels
    height, width = pixels.shape[1:3]
    k = max(2, min(height, width) // 32)
    corners = [pixels[:, :k, :k], pixels[:, :k, -k:], pixels[:, -k:, :k], pixels[:, -k:, -k:]]
    dark_corners = np.stack([(c.max(axis=-1) < DARK).mean(axis=(1, 2)) > 0.5 for c in corners], axis=1)
    candidates = np.flatnonzero(dark_corners.sum(axis=1) >= CORNERS)  # the corners first: cheap
    out = pixels
    for i in candidates:
        filled = _fill(pixels[i], pixels[i].max(axis=-1) < DARK)
        if filled is not None:
            out = pixels.copy() if out is pixels else out
            out[i] = filled
    return out


def _fill(image: np.ndarray, dark: np.ndarray) -> np.ndarray | None:
    outside = _reached_from_border(dark)
    if not SHARE[0] <= outside.mean() <= SHARE[1]:
        return None
    outside = _grown(outside, 2)  # the field's soft, resized edge with it
    rim = _grown(outside, 3) & ~outside
    if not rim.any():
        return None
    out = image.copy()
    out[outside] = np.median(image[rim], axis=0).astype(np.uint8)
    return out


# numpy only (the edge scorer's distribution has no scipy): 4-neighbour growth, as
# scipy.ndimage's default structure


def _grown(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    for _ in range(steps):
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        mask = grown
    return mask


def _reached_from_border(dark: np.ndarray) -> np.ndarray:
    """The dark pixels connected (4-neighbour) to the image's border through dark pixels."""
    reached = np.zeros_like(dark)
    for edge in (np.s_[0, :], np.s_[-1, :], np.s_[:, 0], np.s_[:, -1]):
        reached[edge] = dark[edge]
    while True:
        grown = _grown(reached) & dark
        if np.array_equal(grown, reached):
            return reached
        reached = grown


def _as_taken(pixels: np.ndarray) -> np.ndarray:
    return pixels


def for_manifest(manifest: dict):
    """The step between resizing and the network that a bundle's (or an edge package's) manifest
    asks for: the fill where ``preprocessing.field_of_view`` is set, else the pixels as they are."""
    return fill_outside_field if (manifest.get("preprocessing") or {}).get("field_of_view") else _as_taken
