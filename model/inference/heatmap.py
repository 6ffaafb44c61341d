"""Heat maps by occlusion: where covering the image lowers the malignancy score.

The image is covered, one square at a time (a quarter of its shorter side, moved by half of
that), with the colour of its surrounding skin (the median colour of the image's border); each
covered view is scored by the bundle's own forward pass, and the drop of the score's log-odds
is the square's share of the evidence. A pixel's heat is the mean drop of the squares that cover
it (never below zero). The map therefore says what the network's score actually rests on — an
erased lesion lowers it, erased corners do not — and works on any runtime the predictor runs on
(ONNX Runtime included: no gradients, no TensorFlow), at the cost of one batch of forward passes
(49 views at 128 px) per map. Grad-CAM (``model.inference.gradcam``) lit the last 4 × 4 cell's
corners instead of the lesion (docs/model.md, heat maps).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

WINDOW = 0.25  # the covering square's side, as a share of the image's shorter side
STEP = 0.5  # how far it moves, as a share of its side


def squares(height: int, width: int, window: float = WINDOW, step: float = STEP) -> list[tuple[int, int, int]]:
    """(top, left, side) of every covering square: a grid that reaches every edge."""
    side = max(4, round(window * min(height, width)))
    stride = max(1, round(side * step))

    def starts(length: int) -> list[int]:
        out = list(range(0, max(1, length - side + 1), stride))
        if out[-1] != length - side:
            out.append(length - side)
        return out

    return [(top, left, side) for top in starts(height) for left in starts(width)]


def border_colour(image: np.ndarray, margin: float = 0.12) -> np.ndarray:
    """The median colour of the image's border (its skin, in a dermoscopic image)."""
    h, w, _ = image.shape
    m = max(1, round(margin * min(h, w)))
    ring = np.concatenate([image[:m].reshape(-1, 3), image[-m:].reshape(-1, 3), image[:, :m].reshape(-1, 3),
                           image[:, -m:].reshape(-1, 3)])  # fmt: skip
    return np.median(ring, axis=0).astype(image.dtype)


def covered_views(image: np.ndarray, boxes) -> np.ndarray:
    """The image itself, then one view per square with the square covered by the border colour."""
    fill = border_colour(image)
    views = np.repeat(image[None], len(boxes) + 1, axis=0)
    for k, (top, left, side) in enumerate(boxes, start=1):
        views[k, top : top + side, left : left + side] = fill
    return views


def occlusion_map(scores: np.ndarray, boxes, shape: tuple[int, int]) -> np.ndarray:
    """Heat (H, W) in [0, 1] from the scores of :func:`covered_views` (the image's first)."""
    p = np.clip(np.asarray(scores, np.float64), 1e-6, 1 - 1e-6)
    logit = np.log(p / (1 - p))
    drop = np.maximum(logit[0] - logit[1:], 0.0)
    heat, count = np.zeros(shape), np.zeros(shape)
    for d, (top, left, side) in zip(drop, boxes, strict=True):
        heat[top : top + side, left : left + side] += d
        count[top : top + side, left : left + side] += 1
    heat /= np.maximum(count, 1)
    return (heat / heat.max()).astype(np.float32) if heat.max() > 0 else heat.astype(np.float32)


class Occlusion:
    """Occlusion heat maps with a loaded predictor (``model.inference.predictor.Predictor``)."""

    def __init__(self, predictor, window: float = WINDOW, step: float = STEP):
        self.predictor = predictor
        self.boxes = squares(*predictor.image_shape, window, step)

    def heatmap(self, pixels: np.ndarray, meta: np.ndarray) -> np.ndarray:
        """pixels (1, H, W, 3) uint8, meta (1, d) → heat map (H, W) in [0, 1]."""
        views = covered_views(np.asarray(pixels[0]), self.boxes)
        raw, _ = self.predictor.predict_raw(views, np.repeat(np.asarray(meta)[:1], len(views), axis=0), tta=False)
        return occlusion_map(raw[0], self.boxes, views.shape[1:3])


def blend(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """A heat map (H, W in [0, 1]) blended over an RGB uint8 image with a perceptual colour map
    (float RGB in [0, 1])."""
    import matplotlib

    colours = matplotlib.colormaps["inferno"](heat)[..., :3]
    weight = alpha * heat[..., None] ** 0.5
    return np.clip((1 - weight) * (image.astype(np.float32) / 255.0) + weight * colours, 0, 1)


def overlay_png(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> bytes:
    """The overlay as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray((blend(image, heat, alpha) * 255).astype(np.uint8)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
