"""Heat maps at an eighth of the input's resolution: Grad-CAM times HiResCAM, averaged over the four flips.

Grad-CAM (Selvaraju et al., 2017) weights each channel of a layer's feature maps by the mean
gradient of the malignancy score's log-odds with respect to it. The layer is NASNet's last cell
at an eighth of the input's side (16 × 16 at 128 px; ``cell_layer``), not its last cell (4 × 4):
measured on held-out malignant lesions with automatic lesion masks, the last cell's map lit the
corners (its peak on the lesion for 10 % of them with the student of 2026-12-02), the 1/8 cell's
map, averaged over the four flips (each map flipped back), points at the lesion — and follows it
when the image is shifted sideways, which a map of the middle cannot (docs/model.md, heat maps).
The log-odds' gradient does not vanish where the probability saturates. For an ensemble bundle
the members' maps are averaged.

The map shown is that Grad-CAM times HiResCAM of the same cell (Draelos and Carin, 2020: each
position's activations times their own gradient, summed over the channels), each flip-averaged,
blurred by one cell's width: hot where the channels the score leans on are active **and** the
position's own gradient agrees. From the same activations and gradients, it put the peak on the
lesion more often than Grad-CAM alone on both sets of held-out lesions, as they are and shifted
sideways, with more of the heat on the lesion (2.6–2.8× its share against 2.1–2.3×), and it still
differs from the map of a network with random weights — less than Grad-CAM alone does (rank
correlation 0.06–0.68 over five random networks, median 0.39, against Grad-CAM's median 0.06): part
of its gain is the image's own structure, which ``dermascan heatmap-check``'s control measures
(docs/model.md, heat maps; :func:`lesion_map`).

Two implementations of the same map: :class:`OnnxGradCam` on ONNX Runtime, from the bundle's ONNX
file extended backwards (``model.inference.backprop``; what serving processes use, no TensorFlow
or Keras), and :class:`GradCam` on the Keras network (TensorFlow or JAX; training's checks, and a
bundle without an ONNX package). :func:`for_predictor` picks the one a predictor can run.
"""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)
STRIDE = 8  # the feature maps used: an eighth of the input's side


def _members(network) -> list:
    import keras

    nested = [layer for layer in network.layers if isinstance(layer, keras.Model)]
    return nested or [network]


def cell_layer(member, stride: int = STRIDE):
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
    if found is None:
        from model.inference.network import last_cell_layer

        return last_cell_layer(member)
    return found


def _views(pixels: np.ndarray) -> np.ndarray:
    image = np.asarray(pixels)[0]
    return np.stack([image, image[:, ::-1], image[::-1], image[::-1, ::-1]])


def grad_cam(features: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Grad-CAM of (n, h, w, C) feature maps and gradients: each channel weighted by its mean
    gradient, summed, negative evidence dropped → (n, h, w)."""
    return np.maximum((features * grads.mean(axis=(1, 2), keepdims=True)).sum(axis=-1), 0.0)


def hires_cam(features: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """HiResCAM of (n, h, w, C) feature maps and gradients: each position's activations times their
    own gradient, summed over the channels (negative gradients kept), the negative sum dropped."""
    return np.maximum((features * grads).sum(axis=-1), 0.0)


def lesion_map(height: int, width: int, maps) -> np.ndarray:
    """The map shown: the flip-averaged Grad-CAM times the flip-averaged HiResCAM of the same
    (feature maps, gradients), blurred by a Gaussian as wide as one cell of the feature maps (their
    own resolution: the product of two maps is hot on single cells, and a cell is 8 pixels of a 128 px
    input), scaled to [0, 1] (all zero where either map is)."""
    maps = list(maps)
    channel, position = flip_averaged(height, width, maps, grad_cam), flip_averaged(height, width, maps, hires_cam)
    return blurred_product(channel, position, maps[0][0].shape[1:3])


def blurred_product(channel_map: np.ndarray, position_map: np.ndarray, cells: tuple[int, int]) -> np.ndarray:
    """:func:`lesion_map`'s last step: two (H, W) maps multiplied, blurred by a Gaussian one cell of
    ``cells`` (the feature maps' height and width) wide, scaled to [0, 1] (all zero where either is).
    The heat-map check's control passes the HiResCAM factor of a network with random weights, to see
    what that factor owes to the image alone."""
    height, width = channel_map.shape
    both = gaussian_blur((channel_map * position_map).astype(np.float64), (height / cells[0], width / cells[1]))
    return (both / both.max()).astype(np.float32) if both.max() > 0 else np.zeros((height, width), np.float32)


def gaussian_blur(image: np.ndarray, sigma: tuple[float, float], truncate: float = 4.0) -> np.ndarray:
    """A 2-D image blurred by a Gaussian of ``sigma`` (rows, columns) pixels, its edges extended
    (``scipy.ndimage.gaussian_filter(..., mode="nearest")``, which serving installs need not have)."""
    out = np.asarray(image, np.float64)
    for axis, s in enumerate(sigma):
        radius = int(truncate * s + 0.5)
        if s <= 0 or radius < 1:
            continue
        x = np.arange(-radius, radius + 1, dtype=np.float64)
        kernel = np.exp(-0.5 * (x / s) ** 2)
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        windows = np.lib.stride_tricks.sliding_window_view(np.pad(out, pad, mode="edge"), len(x), axis=axis)
        out = windows @ (kernel / kernel.sum())
    return out


def unflip(image: np.ndarray, view: int) -> np.ndarray:
    """A map of view ``view`` of :func:`_views` (0 as is, 1 mirrored, 2 upside down, 3 both) turned
    back to the image as it is."""
    return image[:, ::-1] if view == 1 else image[::-1] if view == 2 else image[::-1, ::-1] if view == 3 else image


def flip_averaged(height: int, width: int, maps, cam=grad_cam) -> np.ndarray:
    """``cam`` of the four flips, each flipped back, averaged over the views and the members:
    ``maps`` yields (feature maps, gradients) of the four views with channels last, per member."""
    total = np.zeros((height, width), np.float64)
    for features, grads in maps:
        for v, view in enumerate(cam(features, grads)):
            up = np.asarray(Image.fromarray(view.astype(np.float32)).resize((width, height), Image.BILINEAR))
            total += unflip(up, v)
    return (total / total.max()).astype(np.float32) if total.max() > 0 else total.astype(np.float32)


class _FlipAveraged:
    """The heat map of one image from ``features_and_gradients`` of its four flips."""

    def flip_maps(self, pixels: np.ndarray, meta: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """pixels (1, H, W, 3) uint8, meta (1, d) → (feature maps, gradients) of the image's four
        flips, per member (what :func:`flip_averaged` and :func:`lesion_map` read)."""
        meta4 = np.repeat(np.asarray(meta, np.float32)[:1], 4, axis=0)
        return list(self.features_and_gradients(_views(pixels), meta4))

    def heatmap(self, pixels: np.ndarray, meta: np.ndarray) -> np.ndarray:
        """pixels (1, H, W, 3) uint8, meta (1, d) → heat map (H, W) in [0, 1] (:func:`lesion_map`):
        the maps of the four flips, flipped back, averaged (over the members of an ensemble too)."""
        return lesion_map(*np.asarray(pixels).shape[1:3], self.flip_maps(pixels, meta))


class OnnxGradCam(_FlipAveraged):
    """Grad-CAM on ONNX Runtime: the bundle's ONNX file with the log-odds' gradient added
    (``model.inference.backprop``), built in memory when the object is made."""

    def __init__(self, onnx_file, threads: int | None = None):
        import onnx

        from model.inference.backprop import gradcam_graph
        from model.inference.runtimes import ort_session

        graph = gradcam_graph(onnx.load(str(onnx_file)))
        self.session = ort_session(graph.SerializeToString(), threads)
        self.members = sum(1 for o in self.session.get_outputs() if o.name.startswith("cell_grad_"))

    def features_and_gradients(self, pixels: np.ndarray, meta: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """(feature maps, d log-odds / d feature maps) of every member, channels last."""
        wanted = [n for k in range(self.members) for n in (f"cell_{k}", f"cell_grad_{k}")]
        out = self.session.run(wanted, {"image": np.ascontiguousarray(pixels), "meta": np.asarray(meta, np.float32)})
        return [(out[2 * k].transpose(0, 2, 3, 1), out[2 * k + 1].transpose(0, 2, 3, 1)) for k in range(self.members)]


def for_predictor(predictor):
    """The Grad-CAM a predictor can run: on ONNX Runtime from the bundle's ONNX file — the one it
    scores with, or the package shipped in the bundle where it scores with Keras (a GPU worker on
    JAX draws the same maps as the CPU workers) — else on its Keras network."""
    from model.errors import installed
    from model.inference.loader import onnx_file

    path = predictor.onnx_file
    if path is None and installed("onnxruntime"):
        path = onnx_file(predictor.bundle.directory, predictor.bundle.manifest)
    if path is not None and installed("onnx"):
        return OnnxGradCam(path, predictor.threads)
    if path is not None:
        log.warning("the onnx package is not installed (pip install onnx): Grad-CAM runs on the Keras network")
    else:
        log.info("bundle %s has no ONNX package: Grad-CAM runs on the Keras network", predictor.version)
    return GradCam(predictor.network)


class GradCam(_FlipAveraged):
    """Grad-CAM on the Keras network (TensorFlow, or JAX after its last cell)."""

    def __init__(self, network):
        import keras

        from model.inference.network import last_cell_layer

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

    def features_and_gradients(self, pixels: np.ndarray, meta: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """(feature maps, d log-odds / d feature maps) of every member."""
        import keras

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
