"""Grad-CAM heat maps from the last NASNet cell, as a PNG overlay.

The network is split at the last cell's output: ``body`` maps the inputs to the cell's feature
maps, ``head`` maps (feature maps, metadata) to the probability. The gradient of the
probability with respect to the feature maps weights each channel (Selvaraju et al., 2017). For
an ensemble bundle, the members' maps are averaged.
"""

from __future__ import annotations

import keras
import numpy as np
from PIL import Image

from model.inference.network import last_cell_layer


def _members(network: keras.Model) -> list[keras.Model]:
    nested = [layer for layer in network.layers if isinstance(layer, keras.Model)]
    return nested or [network]


class GradCam:
    def __init__(self, network: keras.Model):
        self.parts = []
        for member in _members(network):
            cell = last_cell_layer(member).output
            meta_in = member.get_layer("meta").output
            body = keras.Model(member.inputs, cell)
            head = keras.Model([cell, meta_in], member.output)
            self.parts.append((body, head))
        self._traced = None

    def _features_and_gradients(self, pixels: np.ndarray, meta: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """(feature maps, d probability / d feature maps) of every member."""
        backend = keras.backend.backend()
        if backend == "tensorflow":
            # one traced graph for all members: eager NASNet runs layer by layer, ~0.3 s a member
            if self._traced is None:
                import tensorflow as tf

                def run(image, meta):
                    out = []
                    for body, head in self.parts:
                        features = body({"image": image, "meta": meta}, training=False)
                        with tf.GradientTape() as tape:
                            tape.watch(features)
                            prob = head([features, meta], training=False)
                        out.append((features, tape.gradient(prob, features)))
                    return out

                self._traced = tf.function(run, reduce_retracing=True)
            return [(np.asarray(f, np.float32), np.asarray(g, np.float32)) for f, g in self._traced(pixels, meta)]
        if backend == "jax":
            import jax

            meta_tensor = keras.ops.convert_to_tensor(meta)
            out = []
            for body, head in self.parts:
                features = np.asarray(body({"image": pixels, "meta": meta}, training=False), dtype=np.float32)
                grads = jax.grad(lambda f, head=head: head([f, meta_tensor], training=False).sum())(features)
                out.append((features, np.asarray(grads)))
            return out
        raise NotImplementedError(f"Grad-CAM needs the TensorFlow or JAX backend, not {backend}")

    def heatmap(self, pixels: np.ndarray, meta: np.ndarray) -> np.ndarray:
        """pixels (1, H, W, 3) uint8, meta (1, d) → heat map (H, W) in [0, 1]."""
        maps = []
        for features, grads in self._features_and_gradients(pixels, meta):
            weights = grads.mean(axis=(1, 2), keepdims=True)
            cam = np.maximum((features * weights).sum(axis=-1)[0], 0.0)
            maps.append(cam)
        cam = np.mean(maps, axis=0)
        if cam.max() > 0:
            cam = cam / cam.max()
        size = pixels.shape[1:3]
        resized = Image.fromarray((cam * 255).astype(np.uint8)).resize((size[1], size[0]), Image.BICUBIC)
        return np.asarray(resized, dtype=np.float32) / 255.0
