"""Batched prediction with a loaded bundle: pre_process → predict → post_process.

The bundle is loaded once (in the constructor). Batches are padded to a few fixed shapes, so a
JAX backend compiles each shape once (and TensorFlow traces each once); optional test-time
augmentation (the four flips) returns the mean and the spread of the predictions. The bundle's
calibration map turns the ensemble's raw score into the probability of malignancy, and its
not-assessable gate (quality checks and the feature distance, computed in the same forward pass)
says which images cannot be assessed at all (:mod:`model.inference.gate`).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from model.errors import ImageDecodeError
from model.inference import bundle as bundle_lib
from model.inference import camera, change
from model.inference.calibration import Calibrator
from model.inference.data import decode_many
from model.inference.gate import Gate
from model.inference.missing import MissingMetadata, missing_fields
from model.inference.quality import measure

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = (1, 8, 32, 64)


@dataclass
class Score:
    probability: float
    spread: float | None
    referred: bool
    assessable: bool = True
    reason: str | None = None  # why the image is not assessable
    distance: float | None = None  # feature distance from the development lesions
    stats: dict | None = None  # the image statistics monitoring tracks (model.inference.reference)
    embedding: list[float] | None = (
        None  # for the lesion change measure (model.inference.change), when the bundle has one
    )
    # the metadata fields the score was made without (it rests on the image and the other fields)
    missing_fields: list[str] | None = None
    # the differential: a probability per class of model.inference.diagnosis.CODES (None without)
    differential: list[float] | None = None


class Prepared(NamedTuple):
    """Decoded model inputs of the rows that could be decoded (``ok``), with the others' errors."""

    pixels: np.ndarray
    meta: np.ndarray
    errors: dict
    ok: list
    sizes: np.ndarray  # each kept image's own (width, height)
    # the quality measures of the kept pixels, taken while decoding (in the worker that is a thread
    # beside the network's work on the previous piece): the gate and the image statistics read them
    measured: dict | None = None


class Predicted(NamedTuple):
    probability: np.ndarray  # calibrated, TTA mean
    spread: np.ndarray | None  # TTA spread of the calibrated views
    features: np.ndarray | None  # image-branch features (plain view), when the gate uses them
    missing: list[list[str]] | None = None  # per row, the metadata fields it was scored without
    classes: np.ndarray | None = None  # the differential's class probabilities (mean of the views)


def plan_batches(n: int, sizes: Sequence[int]) -> list[tuple[int, int, int]]:
    """Split ``n`` rows into (start, stop, padded_size) pieces using only the fixed ``sizes``.

    Full pieces of the largest size first; the rest goes into the smallest size that holds it
    (or is split further when padding would waste more than half of a piece).
    """
    sizes = sorted(set(int(s) for s in sizes))
    out, start = [], 0
    while start < n:
        left = n - start
        fits = [s for s in sizes if s >= left]
        if left >= sizes[-1]:
            size = take = sizes[-1]
        elif fits and fits[0] <= 2 * left:
            size, take = fits[0], left
        else:
            size = take = max(s for s in sizes if s <= left)
        out.append((start, start + take, size))
        start += take
    return out


def flips(images: np.ndarray) -> list[np.ndarray]:
    return [images, images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1]]


def to_mixed_precision(network, policy: str = "mixed_bfloat16"):
    """The same network computing in bfloat16 (float32 variables and float32 output): rebuilt
    from its config with every float32 layer policy switched, then given the same weights."""
    import keras

    def switch(node, keep: bool = False):
        if isinstance(node, dict):
            keep = keep or node.get("class_name") == "InputLayer" or node.get("name") == "classification_head"
            is_policy = node.get("class_name") in ("DTypePolicy", "FloatDTypePolicy")
            if is_policy and not keep and node.get("config", {}).get("name") == "float32":
                node["config"]["name"] = policy
            for key, value in node.items():
                switch(
                    value,
                    keep
                    or (key == "config" and isinstance(value, dict) and value.get("name") == "classification_head"),
                )
        elif isinstance(node, list):
            for value in node:
                switch(value, keep)

    config = keras.saving.serialize_keras_object(network)
    switch(config)
    clone = keras.saving.deserialize_keras_object(config)
    clone.set_weights(network.get_weights())
    return clone


class Predictor:
    def __init__(
        self,
        bundle_dir=None,
        *,
        bundle: bundle_lib.Bundle | None = None,
        batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
        tta: bool = False,
        threshold: float | None = None,
        decode_workers: int | None = None,
        mixed_precision: bool = False,
        onnx_package=None,
        onnx_runtime: str = "onnxruntime",
        threads: int | None = None,
    ):
        # on an ONNX package the Keras network is never loaded (nor Keras imported)
        self.bundle = bundle or bundle_lib.load(bundle_dir, network=onnx_package is None)
        self.mixed_precision = mixed_precision
        self._network = self._forward_network = None
        self.calibrator = Calibrator.from_dict(self.bundle.manifest.get("calibration"))
        self.missing = MissingMetadata.from_dict(self.bundle.manifest.get("missing_metadata"))
        if self.missing is None:
            log.warning(
                "bundle %s has no maps for missing metadata: a study sent without some fields is scored as the "
                "network scores 'unknown' (fit them: dermascan missing-fit)", self.bundle.version,
            )  # fmt: skip
        self.gate = Gate.from_bundle(self.bundle.directory, self.bundle.manifest)
        self.change = change.from_bundle(self.bundle.directory, self.bundle.manifest)
        self.spec = self.bundle.spec
        # after resizing, before the quality measures: a circular field's dark surround filled
        # (model.inference.field); after the measures, before the network: an exposure or colour cast
        # outside the development images' range moved to its edge (model.inference.camera)
        self.fill, self.correct = camera.steps(self.bundle.manifest)
        self.batch_sizes = tuple(sorted(set(batch_sizes)))
        self.tta = tta
        self.threshold = self.bundle.threshold if threshold is None else float(threshold)
        self.decode_workers = decode_workers
        self.threads = threads  # of one ONNX call (the forward pass, Grad-CAM); None: every core
        # an ONNX edge package of this bundle: the forward pass runs on ONNX Runtime, and so does
        # Grad-CAM (model.inference.backprop extends the same file backwards)
        # (``onnx_runtime``: ONNX Runtime, OpenVINO, or ``auto``: OpenVINO where it is exact,
        # model.inference.runtimes)
        self._onnx, self._onnx_runtime, self.onnx_file = None, None, None
        if onnx_package is None:
            self._forward_pass()  # Keras: loaded and built now, so a bad bundle fails at load
        else:
            import json

            from model.inference.runtimes import open_session

            package = json.loads((Path(onnx_package) / "manifest.json").read_text())
            if package["source"]["weights_sha256"] != self.bundle.manifest["weights_sha256"]:
                raise bundle_lib.BundleError(f"{onnx_package}: exported from another bundle than {self.version}")
            self.onnx_file = Path(onnx_package) / package["file"]
            self._onnx, self._onnx_runtime = open_session(
                self.onnx_file, onnx_runtime, self.image_shape, self.spec.dim, threads
            )
            names = set(self._onnx.output_names)
            self._onnx_outputs = ["probability", "features", *(["diagnosis"] if "diagnosis" in names else [])]

    @property
    def network(self):
        """The bundle's Keras network (in bfloat16 where asked), loaded when first needed."""
        if self._network is None:
            network = self.bundle.network
            self._network = to_mixed_precision(network) if self.mixed_precision else network
        return self._network

    def _forward_pass(self):
        """The Keras model the forward pass runs: the network, with the gate's features beside
        its probability where the gate reads them."""
        if self._forward_network is None:
            if self.gate.features is not None:
                from model.inference.ood import feature_network

                self._forward_network = feature_network(self.network, self.gate.feature_members)
            else:
                self._forward_network = self.network
        return self._forward_network

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def image_size(self) -> int | list[int]:
        """The bundle's input size: one side (square), or [height, width]."""
        return self.bundle.image_size

    @property
    def image_shape(self) -> tuple[int, int]:
        return self.bundle.image_shape

    # -- the three steps ------------------------------------------------------------------------
    def pre_process(self, images: Sequence, metadata: Sequence[dict], keys: Sequence | None = None) -> Prepared:
        """Bytes (JPEG/PNG) or uint8 arrays + metadata dicts → :class:`Prepared`.

        A row whose image cannot be decoded is reported in ``errors`` (an ImageDecodeError naming
        its key) and left out of the arrays; ``ok`` lists the rows that were kept.
        """
        keys = list(range(len(images))) if keys is None else list(keys)
        to_decode = [(i, (keys[i], img)) for i, img in enumerate(images) if isinstance(img, bytes | bytearray)]
        pixels = np.zeros((len(images), *self.image_shape, 3), dtype=np.uint8)
        sizes = np.zeros((len(images), 2), dtype=np.float32)
        errors: dict[int, ImageDecodeError] = {}
        if to_decode:
            found = np.zeros((len(to_decode), 2), dtype=np.float32)
            decoded, bad = decode_many([item for _, item in to_decode], self.image_size, self.decode_workers, found)
            for j, (i, _) in enumerate(to_decode):
                if j in bad:
                    errors[i] = bad[j]
                else:
                    pixels[i], sizes[i] = decoded[j], found[j]
        from model.inference.data import resize

        for i, img in enumerate(images):
            if not isinstance(img, bytes | bytearray):
                array = np.asarray(img)
                if array.ndim != 3 or array.shape[2] != 3:
                    errors[i] = ImageDecodeError(keys[i], f"expected an RGB array, got shape {array.shape}")
                else:
                    pixels[i], sizes[i] = resize(array, self.image_size), (array.shape[1], array.shape[0])
        ok = [i for i in range(len(images)) if i not in errors]
        meta = self.spec.transform([metadata[i] for i in ok])
        pixels, sizes = self.fill(pixels[ok]), sizes[ok]
        measured = measure(pixels, sizes) if ok else None  # the image as it came: the checks judge the camera's frame
        return Prepared(self.correct(pixels), meta, errors, ok, sizes, measured)

    def conform(self, pixels: np.ndarray) -> np.ndarray:
        """Resized pixels → what the network is given: the field's fill, then the camera clamp (where
        the bundle asks for them). :meth:`pre_process` does the same, taking the quality measures between."""
        return self.correct(self.fill(pixels))

    @property
    def runtime(self) -> str:
        return self._onnx_runtime if self._onnx is not None else "keras"

    def _run(self, x: np.ndarray, m: np.ndarray):
        """(probability (n,), features (n, d) or None, class probabilities (n, classes) or None)."""
        if self._onnx is not None:
            outputs = self._onnx.run(self._onnx_outputs, {"image": np.ascontiguousarray(x), "meta": m})
            classes = np.asarray(outputs[2], np.float32) if len(outputs) > 2 else None
            return np.asarray(outputs[0], np.float32).reshape(-1), np.asarray(outputs[1], np.float32), classes
        out = self._forward_pass().predict_on_batch({"image": np.ascontiguousarray(x), "meta": m})
        if not isinstance(out, list | tuple):
            return np.asarray(out, dtype=np.float32).reshape(-1), None, None
        # [probability, the gate's features where it reads them, the differential where there is one]
        rest = [np.asarray(o, np.float32) for o in out[1:]]
        features = rest.pop(0) if self.gate.features is not None else None
        return np.asarray(out[0], dtype=np.float32).reshape(-1), features, (rest[0] if rest else None)

    def predict_raw(self, pixels: np.ndarray, meta: np.ndarray, tta: bool | None = None):
        """The ensemble's uncalibrated score per flip view (views × n) and the plain view's
        image features (None without a feature gate), padded to the fixed batch shapes; ``tta``
        overrides the predictor's own flips setting (a heat map needs the plain view only)."""
        preds, features, _ = self.predict_views(pixels, meta, tta)
        return preds, features

    def predict_views(self, pixels: np.ndarray, meta: np.ndarray, tta: bool | None = None):
        """As :meth:`predict_raw`, and the differential's class probabilities (the mean over the
        views; None for a bundle without the differential)."""
        n = len(pixels)
        views = flips(pixels) if (self.tta if tta is None else tta) else [pixels]
        preds = np.zeros((len(views), n), dtype=np.float32)
        features = classes = None
        for start, stop, size in plan_batches(n, self.batch_sizes):
            m = meta[start:stop]
            pad = size - (stop - start)
            if pad:
                m = np.concatenate([m, np.zeros((pad, m.shape[1]), m.dtype)])
            for v, view in enumerate(views):
                x = view[start:stop]
                if pad:
                    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
                p, f, c = self._run(x, m)
                preds[v, start:stop] = p[: stop - start]
                if v == 0 and f is not None:
                    if features is None:
                        features = np.zeros((n, f.shape[1]), dtype=np.float32)
                    features[start:stop] = f[: stop - start]
                if c is not None:
                    if classes is None:
                        classes = np.zeros((n, c.shape[1]), dtype=np.float32)
                    classes[start:stop] += c[: stop - start] / len(views)
        return preds, features, classes

    def predict(self, pixels: np.ndarray, meta: np.ndarray) -> Predicted:
        """Calibrated probabilities (TTA mean; the TTA spread of the calibrated views) and the
        features the gate needs, for already-prepared arrays."""
        if len(pixels) == 0:
            return Predicted(np.zeros(0, np.float32), np.zeros(0, np.float32) if self.tta else None, None, [])
        preds, features, classes = self.predict_views(pixels, meta)
        missing = missing_fields(self.spec, meta)
        if self.missing is not None and any(missing):
            calibrated, spread = self.missing.calibrate(preds, missing, self.calibrator)
            calibrated, spread = calibrated.astype(np.float32), spread.astype(np.float32) if self.tta else None
        else:
            calibrated = self.calibrator(preds.mean(axis=0)).astype(np.float32)
            spread = self.calibrator(preds).std(axis=0).astype(np.float32) if self.tta else None
        return Predicted(calibrated, spread, features, missing, classes)

    def differential(self, classes: np.ndarray) -> np.ndarray:
        """The differential as it is served: the network's class probabilities (``Predicted.classes``)
        re-weighted by the bundle's prior adjustment (``model.inference.diagnosis.adjust``)."""
        from model.inference import diagnosis

        return diagnosis.adjust(classes, self.bundle.manifest.get("diagnosis"))

    def post_process(self, prepared: Prepared, predicted: Predicted) -> list[Score]:
        """Scores with the gate's verdict: a not-assessable image gets its reason and no referral."""
        from model.inference.reference import image_stats

        reasons, distance = self.gate.reasons(prepared.pixels, prepared.sizes, predicted.features, prepared.measured)
        embedded = None
        if self.change is not None and predicted.features is not None and len(prepared.pixels):
            embedded = np.round(self.change.embed(predicted.features), 5)
        spread = predicted.spread
        stats = image_stats(prepared.pixels, prepared.sizes, prepared.measured) if len(prepared.pixels) else []
        differential = None if predicted.classes is None else np.round(self.differential(predicted.classes), 5)
        return [
            Score(
                float(p),
                None if spread is None else float(spread[i]),
                reasons[i] is None and bool(p >= self.threshold),
                reasons[i] is None,
                reasons[i],
                None if distance is None else round(float(distance[i]), 4),
                stats[i],
                None if embedded is None else [float(v) for v in embedded[i]],
                list(predicted.missing[i]) if predicted.missing is not None else None,
                None if differential is None else [float(v) for v in differential[i]],
            )
            for i, p in enumerate(np.clip(predicted.probability, 0.0, 1.0))
        ]

    # -- convenience ------------------------------------------------------------------------------
    def score(self, images: Sequence, metadata: Sequence[dict], keys: Sequence | None = None):
        """Score a batch → list aligned with the input: a Score, or the ImageDecodeError of that row."""
        prepared = self.pre_process(images, metadata, keys)
        scores = self.post_process(prepared, self.predict(prepared.pixels, prepared.meta))
        out: list = [None] * len(images)
        for i, error in prepared.errors.items():
            out[i] = error
        for i, score in zip(prepared.ok, scores):
            out[i] = score
        return out

    def warm_up(self, progress=None) -> float:
        """Run every fixed batch shape once (compiles on JAX, traces on TensorFlow), then a JPEG
        through the decoding and the quality measures (the decoder's first use). Returns seconds.
        ``progress(done, size, seconds)`` is called after each shape."""
        t0 = time.perf_counter()
        for done, size in enumerate(self.batch_sizes, 1):
            pixels = np.zeros((size, *self.image_shape, 3), np.uint8)
            self._run(pixels, np.zeros((size, self.spec.dim), np.float32))
            if progress is not None:
                progress(done, size, time.perf_counter() - t0)
        jpeg = io.BytesIO()
        Image.new("RGB", (96, 72), (180, 120, 100)).save(jpeg, "JPEG")
        self.pre_process([jpeg.getvalue()], [{}])
        seconds = time.perf_counter() - t0
        log.info("predictor %s warmed up %s in %.1f s", self.version, self.batch_sizes, seconds)
        return seconds
