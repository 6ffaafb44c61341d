"""A bundle as a serving process's predictor, on the runtime it is asked for.

``runtime``: ``keras``; ``onnxruntime``; ``openvino`` (the same ONNX file, checked against ONNX
Runtime at load); or ``auto`` (the ONNX file — on OpenVINO where it is installed, the CPU is x86
and it matches ONNX Runtime, else on ONNX Runtime: model.inference.runtimes — unless Keras is
installed with the JAX backend, the GPU workers' path). Keras is imported only to score with it:
the README's install has neither TensorFlow nor Keras (they come with the ``train`` extra). The
ONNX package is the one shipped inside the bundle (``onnx/``, exported from the very same weights)
or the one made when the bundle was registered (``dermascan bundle register`` exports it into
``packages_dir``). A serving process never exports: without a package it scores with Keras and
says why in one log line.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from model.errors import ModelError, installed

log = logging.getLogger(__name__)
RUNTIMES = ("auto", "keras", "onnxruntime", "openvino")


def keras_backend() -> str | None:
    """The backend Keras would use (its environment variable, then its config file), read without
    importing Keras; None where Keras is not installed."""
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    if not installed("keras"):
        return None
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    base = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        return json.loads(Path(base, "keras.json").read_text()).get("backend", "tensorflow")
    except (OSError, ValueError):
        return "tensorflow"


def package_folder(packages_dir, manifest: dict) -> Path:
    """Where the registered ONNX package of a bundle lives under ``packages_dir``."""
    return Path(packages_dir) / f"{manifest['version']}-{manifest['weights_sha256'][:12]}"


def onnx_package(bundle_dir, manifest: dict, packages_dir=None) -> Path | None:
    """The bundle's ONNX package made from these weights: shipped inside it, or registered."""
    candidates = [Path(bundle_dir) / "onnx"]
    if packages_dir is not None:
        candidates.append(package_folder(packages_dir, manifest))
    for folder in candidates:
        path = folder / "manifest.json"
        if not path.is_file():
            continue
        package = json.loads(path.read_text())
        same = package.get("source", {}).get("weights_sha256") == manifest["weights_sha256"]
        if same and (package.get("check") or {}).get("passed") is not False:  # never one that failed its check
            return folder
    return None


def onnx_file(bundle_dir, manifest: dict, packages_dir=None) -> Path | None:
    """The ONNX file of :func:`onnx_package`, or None without a package."""
    package = onnx_package(bundle_dir, manifest, packages_dir)
    return None if package is None else package / json.loads((package / "manifest.json").read_text())["file"]


def runtime_package(bundle_dir, manifest: dict, runtime: str, packages_dir=None) -> Path | None:
    """The ONNX package the forward pass runs on, or None for Keras."""
    if runtime not in RUNTIMES:
        raise ModelError(f"runtime {runtime!r}: one of {', '.join(RUNTIMES)}")
    if runtime == "keras":
        return None
    if runtime == "auto" and keras_backend() == "jax":
        return None
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        log.warning("onnxruntime is not installed: scoring with Keras instead")
        return None
    package = onnx_package(bundle_dir, manifest, packages_dir)
    if package is None:
        log.warning(
            "bundle %s has no ONNX package (none shipped in it, none made when it was registered: "
            "`dermascan bundle register` exports one): scoring with Keras instead", manifest["version"],
        )  # fmt: skip
    return package


def load_predictor(bundle_dir, *, batch_sizes, tta: bool | None = None, mixed_precision: bool = False,
                   runtime: str = "auto", packages_dir=None, threads: int | None = None):  # fmt: skip
    """The bundle as a Predictor, with the flips its manifest recommends unless ``tta`` says;
    ``threads``: of one ONNX call (None: every core)."""
    from model.inference.bundle import read_manifest
    from model.inference.predictor import Predictor

    manifest = read_manifest(bundle_dir, verify=False)
    flips = tta if tta is not None else bool(manifest.get("inference", {}).get("tta", False))
    loaded = Predictor(
        bundle_dir, batch_sizes=batch_sizes, tta=flips, mixed_precision=mixed_precision,
        onnx_package=runtime_package(bundle_dir, manifest, runtime, packages_dir),
        onnx_runtime="onnxruntime" if runtime == "onnxruntime" else ("openvino" if runtime == "openvino" else "auto"),
        threads=threads,
    )  # fmt: skip
    log.info(
        "loaded bundle %s (tta=%s, runtime %s%s)", loaded.version, flips, loaded.runtime,
        f", Keras backend {keras_backend()}" if loaded.runtime == "keras" else "",
    )  # fmt: skip
    return loaded
