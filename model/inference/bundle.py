"""The model bundle: the unit of deployment.

A bundle is a folder holding ``model.keras`` and ``manifest.json``. The manifest describes the
inputs and outputs (image size and dtype, the metadata feature spec), the preprocessing, the
referral threshold and how it was chosen, the metrics with the data they came from, the version
and the sha256 of the weights file. Loading checks the checksum and the manifest against the
network, and refuses a tampered or mismatched bundle with a clear error.

``read_manifest`` needs no Keras (the portal and the core read it); ``load`` imports Keras.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from pathlib import Path

from model.errors import BundleError
from model.inference import field
from model.inference.data import canonical_size, image_shape
from model.inference.features import FeatureSpec

FORMAT = "dermascan-bundle/1"
MODEL_FILE = "model.keras"
MANIFEST_FILE = "manifest.json"
LABELS = ["benign", "malignant"]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory, verify: bool = True) -> dict:
    """Read and check a bundle's manifest (and, with ``verify``, the weights checksum)."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"{directory}: not a model bundle (no {MANIFEST_FILE})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: manifest is not valid JSON ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{path}: unsupported bundle format {manifest.get('format')!r} (expected {FORMAT!r})")
    for key in ("version", "image_size", "feature_spec", "threshold", "weights_sha256"):
        if key not in manifest:
            raise BundleError(f"{path}: manifest has no {key!r}")
    weights = directory / MODEL_FILE
    if not weights.is_file():
        raise BundleError(f"{directory}: bundle has no {MODEL_FILE}")
    if verify:
        actual = file_sha256(weights)
        if actual != manifest["weights_sha256"]:
            raise BundleError(
                f"{weights}: checksum mismatch (manifest says {manifest['weights_sha256'][:12]}…, file is "
                f"{actual[:12]}…): the bundle was modified or damaged; refusing to load it"
            )
    return manifest


class Bundle:
    """A bundle folder read and checked. Its Keras network is loaded when first asked for
    (``network``): a process that scores on the shipped ONNX file never imports Keras."""

    def __init__(self, directory, manifest: dict, network=None, spec: FeatureSpec | None = None):
        self.directory = Path(directory)
        self.manifest = manifest
        self.spec = spec or FeatureSpec.from_dict(manifest["feature_spec"])
        self._network = network

    @property
    def network(self):  # keras.Model
        if self._network is None:
            self._network = _load_network(self.directory, self.manifest, self.spec)
        return self._network

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def image_size(self) -> int | list[int]:
        """The network's input size: an int (square) or [height, width]."""
        return canonical_size(self.manifest["image_size"])

    @property
    def image_shape(self) -> tuple[int, int]:
        """(height, width) of the network's input."""
        return image_shape(self.manifest["image_size"])

    @property
    def threshold(self) -> float:
        return float(self.manifest["threshold"])


def load(directory, *, network: bool = True) -> Bundle:
    """Load a bundle: verify its checksum, load the network (``network=False``: when first asked
    for), check it matches the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory, verify=True)
    loaded = Bundle(directory, manifest)
    if network:
        loaded.network  # noqa: B018  (loads and checks it now)
    return loaded


def _load_network(directory: Path, manifest: dict, spec: FeatureSpec):
    try:
        import keras
    except ImportError as exc:
        raise BundleError(
            f"{directory}: scoring with Keras needs the training extra (pip install 'dermascan[train]'); "
            "without it a bundle scores on its ONNX package"
        ) from exc

    import model.inference.network  # noqa: F401  (registers the network's own layers, e.g. CameraJitter)

    try:
        network = keras.saving.load_model(directory / MODEL_FILE, compile=False)
    except Exception as exc:  # Keras raises many kinds for a bad archive
        raise BundleError(f"{directory / MODEL_FILE}: cannot be loaded by Keras ({exc})") from exc
    inputs = {t.name: tuple(t.shape) for t in network.inputs}
    expected = {"image": (None, *image_shape(manifest["image_size"]), 3), "meta": (None, spec.dim)}
    if inputs != expected:
        raise BundleError(f"{directory}: network inputs {inputs} do not match the manifest {expected}")
    return network


def save(
    network,
    spec: FeatureSpec,
    directory,
    *,
    version: str,
    threshold: float,
    metrics: dict | None = None,
    training: dict | None = None,
    extra: dict | None = None,
    weights_dtype: str = "float32",
) -> dict:
    """Write ``network`` and its manifest as a bundle folder. Returns the manifest."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = _write_weights(directory, network, weights_dtype)
    image_input = network.inputs[0] if network.inputs[0].name == "image" else network.inputs[1]
    height, width = int(image_input.shape[1]), int(image_input.shape[2])
    size = canonical_size([height, width])
    manifest = {
        "format": FORMAT,
        "version": version,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "labels": LABELS,
        "image_size": size,  # one side (square), or [height, width]
        "inputs": {
            "image": {"shape": [height, width, 3], "dtype": "uint8", "color": "RGB", "range": [0, 255]},
            "meta": {"shape": [spec.dim], "dtype": "float32", "names": spec.output_names()},
        },
        "output": {"name": "probability", "meaning": "probability of malignancy", "range": [0, 1]},
        "preprocessing": {
            "decode": "Pillow, RGB",
            "resize": f"whole image to {width}x{height} (width x height), bilinear (aspect not kept)",
            "scaling": "inside the network: Rescaling(1/127.5, offset=-1) to [-1, 1]",
            "field_of_view": field.MANIFEST_NOTE,  # model.inference.field
        },
        "feature_spec": spec.to_dict(),
        "threshold": float(threshold),
        "metrics": metrics or {},
        "training": training or {},
        "weights_file": MODEL_FILE,
        "weights_dtype": weights_dtype,
        "weights_sha256": file_sha256(weights),
        "weights_bytes": weights.stat().st_size,
        **(extra or {}),
    }
    write_manifest(directory, manifest)
    return manifest


def _write_weights(directory: Path, network, weights_dtype: str) -> Path:
    """Save ``network`` as the bundle's weights file (float16 arrays where asked), atomically."""
    weights, tmp = directory / MODEL_FILE, directory / (MODEL_FILE + ".tmp.keras")
    network.save(tmp)
    if weights_dtype == "float16":
        _store_float16(tmp)
    os.replace(tmp, weights)
    return weights


def write_manifest(directory: Path, manifest: dict) -> None:
    tmp = directory / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False))
    os.replace(tmp, directory / MANIFEST_FILE)


def rewrite_network(directory, network, version: str, changes: dict) -> dict:
    """Store a changed ``network`` in an existing bundle under a new ``version`` (its weights'
    checksum changes, so the version must too), with the manifest's top-level ``changes``; the
    weights keep the manifest's precision. Returns the manifest."""
    directory = Path(directory)
    manifest = read_manifest(directory, verify=True)
    if version == manifest["version"]:
        raise BundleError(f"{directory}: changed weights need a new version, not {version!r} again")
    weights = _write_weights(directory, network, manifest.get("weights_dtype", "float32"))
    manifest = {
        **manifest,
        **changes,
        "version": version,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "weights_sha256": file_sha256(weights),
        "weights_bytes": weights.stat().st_size,
    }
    write_manifest(directory, manifest)
    return manifest


def _store_float16(path: Path) -> None:
    """Rewrite the float32 arrays of a .keras archive's weights file as float16 (half the size).

    Keras casts them back to the variables' float32 on load."""
    import shutil
    import tempfile
    import zipfile

    import h5py
    import numpy as np

    with tempfile.TemporaryDirectory() as tmpdir:
        tmpdir = Path(tmpdir)
        with zipfile.ZipFile(path) as archive:
            archive.extractall(tmpdir)
            names = archive.namelist()
        source, target = tmpdir / "model.weights.h5", tmpdir / "model.weights.f16.h5"
        with h5py.File(source, "r") as src, h5py.File(target, "w") as dst:

            def copy(group_in, group_out):
                group_out.attrs.update(group_in.attrs)
                for key, item in group_in.items():
                    if isinstance(item, h5py.Group):
                        copy(item, group_out.create_group(key))
                    else:
                        data = item[()]
                        if getattr(data, "dtype", None) == np.float32:
                            data = data.astype(np.float16)
                        group_out.create_dataset(key, data=data).attrs.update(item.attrs)

            copy(src, dst)
        os.replace(target, source)
        out = path.with_suffix(".f16")
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name in names:
                archive.write(tmpdir / name, name)
        shutil.move(out, path)
