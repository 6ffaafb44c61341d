"""Grad-CAM heat maps at an eighth of the input's resolution, averaged over the four flips.

Grad-CAM (Selvaraju et al., 2017) weights each channel of a layer's feature maps by the mean
gradient of the malignancy score's log-odds with respect to it. The layer is NASNet's last cell
at an eighth of the input's side (16 × 16 at 128 px; ``cell_layer``), not its last cell (4 × 4):
measured on held-out malignant lesions with automatic lesion masks, the last cell's map lit the
corners (its peak on the lesion for 10 % of them with the student of 2026-12-02), the 1/8 cell's
map, averaged over the four flips (each map flipped back), points at the lesion — and follows it
when the image is shifted sideways, which a map of the middle cannot (docs/model.md, heat maps).
The log-odds' gradient does not vanish where the probability saturates. For an ensemble bundle
the members' maps are averaged.
"""

from __future__ import annotations

import keras
import numpy as np
from PIL import Image

from model.inference.network import last_cell_layer

STRIDE = 8  # the feature maps used: an eighth of the input's side


def _members(network: keras.Model) -> list[keras.Model]:
    nested = [layer for layer in network.layers if isinstance(layer, keras.Model)]
    return nested or [network]


def cell_layer(member: keras.Model, stride: int = STRIDE) -> keras.layers.Layer:
    """The last layer whose feature maps are ``1/stride`` of the input's side (a NASNet cell's
    concatenation); a backbone without one (the tests' tiny network) uses its last feature maps."""
    height = member.get_layer("image").output.shape[1]
    found = None
    for layer in member.layers:
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):
            continue
        if len(shape) == 4 and shape[1] == height // stride and "concat" in layer.name:
            found = layer
    return found or last_cell_layer(member)


class GradCam:
    def __init__(self, network: keras.Model):
        self.parts, self.heads = [], []
        jax = keras.backend.backend() == "jax"
        for member in _members(network):
            # TensorFlow takes the gradient at any layer in the same forward pass; JAX needs a model
            # that starts at the layer, which NASNet allows only after its last cell
            cell = (last_cell_layer(member) if jax else cell_layer(member)).output
            self.parts.append(keras.Model(member.inputs, [cell, member.outputs[0]]))
            if jax:
                self.heads.append(keras.Model([cell, member.get_layer("meta").output], member.outputs[0]))
        self._traced = None

    def _features_and_gradients(self, pixels: np.ndarray, meta: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """(feature maps, d log-odds / d feature maps) of every member."""
        backend = keras.backend.backend()
        if backend == "tensorflow":
            # one traced graph for all members: eager NASNet runs layer by layer, ~0.3 s a member
            if self._traced is None:
                import tensorflow as tf

                def run(image, meta):
                    out = []
                    for part in self.parts:
                        with tf.GradientTape() as tape:
                            features, prob = part({"image": image, "meta": meta}, training=False)
                            prob = tf.clip_by_value(prob, 1e-7, 1 - 1e-7)
                            logit = tf.math.log(prob / (1 - prob))
                        out.append((features, tape.gradient(logit, features)))
                    return out

                self._traced = tf.function(run, reduce_retracing=True)
            return [(np.asarray(f, np.float32), np.asarray(g, np.float32)) for f, g in self._traced(pixels, meta)]
        if backend == "jax":
            import jax

            meta_tensor = keras.ops.convert_to_tensor(meta)
            out = []
            for part, head in zip(self.parts, self.heads, strict=True):
                features = np.asarray(part({"image": pixels, "meta": meta}, training=False)[0], dtype=np.float32)

                def logit(f, head=head):
                    p = keras.ops.clip(head([f, meta_tensor], training=False), 1e-7, 1 - 1e-7)
                    return keras.ops.sum(keras.ops.log(p / (1 - p)))

                out.append((features, np.asarray(jax.grad(logit)(features))))
            return out
        raise NotImplementedError(f"Grad-CAM needs the TensorFlow or JAX backend, not {backend}")

    def heatmap(self, pixels: np.ndarray, meta: np.ndarray) -> np.ndarray:
        """pixels (1, H, W, 3) uint8, meta (1, d) → heat map (H, W) in [0, 1]: the map of each of
        the four flips, flipped back, averaged (over the members of an ensemble too)."""
        image = np.asarray(pixels)[0]
        views = np.stack([image, image[:, ::-1], image[::-1], image[::-1, ::-1]])
        height, width = image.shape[:2]
        total = np.zeros((height, width), np.float64)
        for features, grads in self._features_and_gradients(views, np.repeat(np.asarray(meta)[:1], 4, axis=0)):
            cams = np.maximum((features * grads.mean(axis=(1, 2), keepdims=True)).sum(axis=-1), 0.0)
            for v, cam in enumerate(cams):
                up = np.asarray(Image.fromarray(cam.astype(np.float32)).resize((width, height), Image.BILINEAR))
                total += up[:, ::-1] if v == 1 else up[::-1] if v == 2 else up[::-1, ::-1] if v == 3 else up
        return (total / total.max()).astype(np.float32) if total.max() > 0 else total.astype(np.float32)
