"""The runtimes a bundle's ONNX file runs on: ONNX Runtime, or OpenVINO (it reads the same file).

OpenVINO was 2.6× faster than ONNX Runtime on this project's 2-core x86 machine (docs/benchmarks.md,
runtimes). It is used only where it is exact: ``open_session(..., "auto")`` on an x86 CPU with
OpenVINO installed compiles the file on both, runs both on the same fixed check inputs (seeded
dermoscopy-like images and metadata vectors of the network's shapes) and keeps OpenVINO only if
every output lies within the export check's tolerance of ONNX Runtime's (probabilities within
``TOLERANCE``, as ``model.training.export`` demands of an fp32 package against Keras); otherwise ONNX
Runtime, with one log line saying why. ``"openvino"`` asks for it outright (still checked; a
mismatch is an error), ``"onnxruntime"`` never tries it.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import numpy as np

from model.errors import ModelError

log = logging.getLogger(__name__)
TOLERANCE = 1e-4  # the export check's rule for an fp32 package (probabilities)
FEATURE_TOLERANCE = 1e-3  # relative, on the image features the gate reads
CHOICES = ("auto", "onnxruntime", "openvino")


class OpenVinoSession:
    """An OpenVINO compiled model behind ONNX Runtime's ``run(names, feeds)``; ``threads``: the
    threads of one call (None: every core), then not pinned to cores — OpenVINO pins a process's
    threads to the first cores, so several single-threaded processes would share one core."""

    def __init__(self, path: Path, threads: int | None = None):
        import openvino as ov

        config = {"NUM_STREAMS": 1, "INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
            config["ENABLE_CPU_PINNING"] = False
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.output_names = [port.get_any_name() for port in self.compiled.outputs]

    def run(self, names, feeds: dict) -> list[np.ndarray]:
        result = self.request.infer(feeds)
        by_name = {port.get_any_name(): np.array(value) for port, value in result.items()}
        return [by_name[name] for name in names]


class OrtSession:
    """An ONNX Runtime session on the CPU; ``threads``: the threads of one call (None: every core)."""

    def __init__(self, path, threads: int | None = None):
        self.session = ort_session(path, threads)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, names, feeds: dict) -> list[np.ndarray]:
        return self.session.run(list(names), feeds)


def ort_session(model, threads: int | None = None):
    """An ONNX Runtime CPU session of ``model`` (a path or the serialised graph); ``threads``: the
    threads of one call (None: every core)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                providers=["CPUExecutionProvider"])  # fmt: skip


def check_inputs(image_shape: tuple[int, int], meta_dim: int, n: int = 6, seed: int = 20261205) -> dict:
    """Fixed inputs of the network's shapes: skin-coloured images with a darker blob (a lesion-like
    pattern at varied places and sizes) and texture, and metadata vectors in [0, 1]."""
    rng = np.random.default_rng(seed)
    h, w = image_shape
    yy, xx = np.mgrid[0:h, 0:w]
    images = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        skin = np.array([200, 150, 140]) + rng.integers(-30, 30, 3)
        cy, cx, r = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w, rng.uniform(0.1, 0.35) * min(h, w)
        blob = np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))[..., None]
        lesion = np.array([90, 55, 40]) + rng.integers(-20, 20, 3)
        texture = rng.normal(0, 8, (h, w, 3))
        images[i] = np.clip(skin * (1 - blob) + lesion * blob + texture, 0, 255).astype(np.uint8)
    meta = rng.uniform(0, 1, (n, meta_dim)).astype(np.float32)
    return {"image": images, "meta": meta}


def differences(reference, other, names, feeds) -> dict[str, float]:
    """Per output: the largest absolute difference (the probability) or the largest difference
    relative to the output's scale (features, class probabilities)."""
    out = {}
    for name, a, b in zip(names, reference.run(names, feeds), other.run(names, feeds), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        diff = float(np.max(np.abs(a - b))) if a.size else 0.0
        out[name] = diff if name == "probability" else diff / max(float(np.max(np.abs(a))), 1e-6)
    return out


def _exact(diff: dict[str, float]) -> bool:
    return all(v <= (TOLERANCE if k == "probability" else FEATURE_TOLERANCE) for k, v in diff.items())


def open_session(path, choice: str, image_shape, meta_dim: int, threads: int | None = None) -> tuple[object, str]:
    """(session, runtime name) for the ONNX file at ``path``; ``threads``: the threads of one call
    (None: every core)."""
    if choice not in CHOICES:
        raise ModelError(f"ONNX runtime {choice!r}: one of {', '.join(CHOICES)}")
    if threads is not None and threads < 1:
        raise ModelError(f"inference threads {threads}: at least 1 (or none: every core)")
    reference = OrtSession(Path(path), threads)
    if choice == "onnxruntime":
        return reference, "onnxruntime"
    if choice == "auto" and platform.machine().lower() not in ("x86_64", "amd64"):
        log.info("ONNX Runtime: OpenVINO is tried on x86 CPUs only (this is %s)", platform.machine())
        return reference, "onnxruntime"
    try:
        candidate = OpenVinoSession(Path(path), threads)
    except ImportError:
        if choice == "openvino":
            raise ModelError(
                "runtime openvino: OpenVINO is not installed (pip install 'dermascan[openvino]')"
            ) from None
        log.info("ONNX Runtime: OpenVINO is not installed (pip install 'dermascan[openvino]' to try it)")
        return reference, "onnxruntime"
    feeds = check_inputs(tuple(image_shape), meta_dim)
    diff = differences(reference, candidate, reference.output_names, feeds)
    shown = ", ".join(f"{k} {v:.2g}" for k, v in diff.items())
    if _exact(diff):
        log.info("OpenVINO: matches ONNX Runtime on %d check inputs (%s)", len(feeds["image"]), shown)
        return candidate, "openvino"
    message = f"OpenVINO differs from ONNX Runtime on the check inputs beyond the export check's tolerance ({shown})"
    if choice == "openvino":
        raise ModelError(message)
    log.warning("ONNX Runtime: %s", message)
    return reference, "onnxruntime"
