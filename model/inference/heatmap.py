"""Heat maps as people see them: a map (H × W in [0, 1]) blended over the image with a
perceptual colour map, and the overlay as PNG bytes. The maps come from
``model.inference.gradcam`` (Grad-CAM × HiResCAM of NASNet's 1/8 cell). Occlusion (covering one square at a time with the skin's colour)
was measured beside it on the same lesions and pointed at the lesion far less often (docs/model.md,
heat maps), so it is not shipped.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


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
