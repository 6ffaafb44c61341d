"""Export a bundle for the edge: ONNX (ONNX Runtime) or LiteRT, fp32 or int8, with a manifest that
makes the package score exactly like the bundle (``edge/`` reads it without TensorFlow).

What is exported is the forward pass the Predictor runs: the network rebuilt without its
training-only layers (the random flips, rotations, zoom, colour jitter and cutout are no-ops at
inference, but their ops have no ONNX form), given the bundle's weights, with two outputs — the
ensemble's raw probability and the image-branch features the gate reads (of the members it names).
Beside it, ``manifest.json`` (``dermascan-edge/1``): the source bundle's version and weights
sha256, the input spec, the metadata encoding, the calibration map, the threshold, the flips
setting, the gate (quality bounds and the feature files, copied with their sha256) — and the
export's own check, which ``export`` prints and stores (``check.json``):

- fp32: probabilities within 1e-4 of Keras (the Predictor) on 200 held-out lesions, the gate's
  verdicts identical;
- int8 (static post-training quantisation, calibrated on development images only): referral
  decisions agreeing on at least 99 % of the held-out calibration set, AUC within 0.005.

TensorFlow, tf2onnx, ONNX Runtime and LiteRT are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from model import metrics
from model.errors import ModelError
from model.inference.bundle import file_sha256

log = logging.getLogger(__name__)
FORMAT = "dermascan-edge/1"
FILES = {("onnx", False): "model.onnx", ("onnx", True): "model.int8.onnx",
         ("litert", False): "model.tflite", ("litert", True): "model.int8.tflite"}  # fmt: skip


def _random_layers():
    from keras import layers

    from model.inference.network import TRAINING_ONLY

    return (
        layers.RandomFlip, layers.RandomRotation, layers.RandomZoom, layers.RandomColorJitter, layers.RandomErasing,
        *TRAINING_ONLY,
    )  # fmt: skip


def without_augmentation(model):
    """A copy of ``model`` (and of its nested members) with every training-only random layer
    replaced by an Identity of the same name, and the same weights."""
    import keras
    from keras import layers

    random = _random_layers()

    def replace(layer):
        if isinstance(layer, random):
            return layers.Identity(name=layer.name)
        if isinstance(layer, keras.Model):
            return without_augmentation(layer)
        return layer.__class__.from_config(layer.get_config())

    clone = keras.models.clone_model(model, clone_function=replace)
    for layer in clone.layers:
        if layer.weights and not isinstance(layer, keras.Model):
            layer.set_weights(model.get_layer(layer.name).get_weights())
    return clone


def inference_network(loaded):
    """The bundle's forward pass for export: probability and the gate's features."""
    from model.inference.gate import Gate
    from model.inference.ood import feature_network

    gate = Gate.from_bundle(loaded.directory, loaded.manifest)
    return feature_network(without_augmentation(loaded.network), gate.feature_members)


def _signature(loaded):
    import tensorflow as tf

    return (
        tf.TensorSpec((None, *loaded.image_shape, 3), tf.uint8, name="image"),
        tf.TensorSpec((None, loaded.spec.dim), tf.float32, name="meta"),
    )


def _function(net, loaded):
    import tensorflow as tf

    @tf.function(input_signature=_signature(loaded))
    def forward(image, meta):
        outputs = net({"image": image, "meta": meta}, training=False)
        named = {"probability": outputs[0], "features": outputs[1]}
        if len(outputs) > 2:  # the differential
            named["diagnosis"] = outputs[2]
        return named

    return forward


def _development_images(loaded, data_dir, n: int, seed: int = 0):
    """``n`` development images (never the calibration set) and their metadata, for int8
    calibration."""
    from model.inference.data import IsicDataset
    from model.training.config import read_config, split_rows

    cfg = read_config(loaded.directory)
    dataset = IsicDataset.open(data_dir, limit=cfg.limit)
    split = split_rows(dataset.targets(), dataset.groups(), cfg)
    rows = np.random.default_rng(seed).permutation(np.flatnonzero(split >= 0))[:n]
    ids = [dataset.ids[i] for i in rows]
    return dataset.load_images(loaded.image_size, ids=ids), loaded.spec.transform(dataset.metadata.iloc[rows])


def _held_out(loaded, data_dir):
    """The calibration set (held out of every member): ids, labels, bytes, metadata records."""
    from model.inference.data import IsicDataset
    from model.training.config import read_config, split_rows

    cfg = read_config(loaded.directory)
    dataset = IsicDataset.open(data_dir, limit=cfg.limit)
    split = split_rows(dataset.targets(), dataset.groups(), cfg)
    rows = np.flatnonzero(split < 0)
    ids = [dataset.ids[i] for i in rows]
    records = dataset.metadata.iloc[rows].to_dict("records")
    return ids, dataset.targets()[rows], dataset.read_bytes(ids), records


def _write_onnx(forward, loaded, path: Path) -> None:
    import tf2onnx

    tf2onnx.convert.from_function(forward, input_signature=_signature(loaded), opset=17, output_path=str(path))


def _quantise_onnx(fp32: Path, path: Path, images: np.ndarray, meta: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(
                [{"image": images[i : i + 16], "meta": meta[i : i + 16]} for i in range(0, len(images), 16)]
            )

        def get_next(self):
            return next(self.batches, None)

    prepared = path.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
    # the convolutions (nearly all of the weights and the work) in int8; the small dense layers of
    # the metadata branch and the fusion head stay fp32: quantising them too moved the referral
    # decision of 2.8 % of held-out lesions, the convolutions alone of 0.7 % (docs/benchmarks.md)
    quantize_static(
        str(prepared), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8, op_types_to_quantize=["Conv"],
    )  # fmt: skip
    prepared.unlink(missing_ok=True)


def _write_litert(forward, loaded, path: Path, int8: bool, images=None, meta=None) -> None:
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    # the weights frozen into constants (a LiteRT file with variables would read them uninitialised)
    frozen = convert_variables_to_constants_v2(forward.get_concrete_function())
    converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen])
    if not int8:
        path.write_bytes(converter.convert())
        return
    converter.optimizations = [tf.lite.Optimize.DEFAULT]

    def representative():
        for i in range(len(images)):
            yield [images[i : i + 1], meta[i : i + 1]]

    converter.representative_dataset = representative
    # (keeping the dense layers in float, as the ONNX export does, through LiteRT's quantisation
    # debugger, changed nothing measurable: 96.8 % agreement either way; docs/benchmarks.md)
    path.write_bytes(converter.convert())


def export(
    bundle_dir, fmt: str, out_dir, int8: bool = False, data_dir=None, calibration_images: int = 512, scorer=None
) -> dict:
    """Export ``bundle_dir`` as an edge package in ``out_dir`` and check it (see the module
    docstring). ``data_dir``: the ISIC-2024 folder the bundle was trained on (default: the one
    its manifest names), for int8 calibration and the check. Returns the package manifest."""
    from model.inference import bundle as bundle_lib
    from model.inference.gate import GATE_FILE, LESION_CHECK_FILE

    if fmt not in ("onnx", "litert"):
        raise ModelError(f"format {fmt!r}: onnx or litert")
    loaded = bundle_lib.load(bundle_dir)
    data_dir = Path(data_dir or (loaded.manifest.get("metrics", {}).get("data", {}) or {}).get("directory", ""))
    needs_data = int8 or scorer is not None
    if needs_data and not (data_dir / "metadata.csv").is_file() and not (data_dir / "train-metadata.csv").is_file():
        raise ModelError(f"{data_dir}: the bundle's development data is needed (--data) for calibration and the check")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    net = inference_network(loaded)
    forward = _function(net, loaded)
    target = out / FILES[(fmt, int8)]
    images = meta = None
    if int8:
        images, meta = _development_images(loaded, data_dir, calibration_images)
    if fmt == "onnx":
        fp32 = out / FILES[("onnx", False)]
        if not fp32.is_file() or int8:
            _write_onnx(forward, loaded, fp32 if int8 else target)
        if int8:
            _quantise_onnx(fp32, target, images, meta)
            fp32.unlink()
    else:
        _write_litert(forward, loaded, target, int8, images, meta)
    seconds = time.time() - t0
    gate = dict(loaded.manifest.get("gate") or {})
    for name in (GATE_FILE, LESION_CHECK_FILE):
        if (Path(bundle_dir) / name).is_file():
            shutil.copy(Path(bundle_dir) / name, out / name)
    source = loaded.manifest
    manifest = {
        "format": FORMAT,
        "source": {
            "version": source["version"],
            "weights_sha256": source["weights_sha256"],
            "manifest_sha256": file_sha256(Path(bundle_dir) / "manifest.json"),
        },  # fmt: skip
        "version": source["version"],
        "runtime": "onnxruntime" if fmt == "onnx" else "litert",
        "precision": "int8" if int8 else "fp32",
        "file": target.name,
        "sha256": file_sha256(target),
        "bytes": target.stat().st_size,
        "image_size": loaded.image_size,
        "inputs": source.get("inputs"),
        "outputs": {
            "probability": "the raw (uncalibrated) probability, (n, 1)",
            "features": "the gate's features",
            **({"diagnosis": "the differential's class probabilities, (n, 7)"} if source.get("diagnosis") else {}),
        },
        "diagnosis": source.get("diagnosis"),
        "preprocessing": source.get("preprocessing"),
        "feature_spec": source["feature_spec"],
        "calibration": source.get("calibration"),
        "missing_metadata": source.get("missing_metadata"),
        "threshold": source["threshold"],
        "inference": source.get("inference", {}),
        "gate": gate,
        "exported_in_s": round(seconds, 1),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if int8:
        if scorer is None:
            raise ModelError("an int8 package refits its gate on its own features: a scorer is needed")
        manifest["gate"] = refit_gate(loaded, out, data_dir, scorer)
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if scorer is None:
        return manifest
    result = check(loaded, out, data_dir, int8, scorer)
    manifest["check"] = result
    (out / "check.json").write_text(json.dumps(result, indent=2))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def refit_gate(loaded, package: Path, data_dir: Path, scorer) -> dict:
    """The int8 package's gate, fitted as the bundle's was (same images, same quality thresholds,
    same false-flag rates) but on the package's own features: quantisation moves the features
    enough that the bundle's feature distance and lesion check, fitted on float features, would
    flag most lesions. Returns the package manifest's ``gate`` block (files written beside it)."""
    from model.inference.data import IsicDataset
    from model.training.config import read_config, split_rows
    from model.training.gate_fit import fit_gate

    block = loaded.manifest.get("gate") or {}
    cfg = read_config(loaded.directory)
    ood = block.get("ood") or {}
    cfg.gate_false_flag_rate = float(ood.get("false_flag_rate") or cfg.gate_false_flag_rate)
    cfg.gate_components = int(ood.get("components") or cfg.gate_components)
    cfg.lesion_check_rate = cfg.gate_false_flag_rate if block.get("lesion_check") else None
    dataset = IsicDataset.open(data_dir, limit=cfg.limit)
    split = split_rows(dataset.targets(), dataset.groups(), cfg)
    edge = scorer(package)
    members = ood.get("members")
    gate = fit_gate(None, dataset, split, cfg, members, features_of=edge.image_features)
    out = gate.manifest_block(package)
    out["refitted"] = "on this int8 package's own features (the bundle's images and false-flag rates)"
    return out


def check(loaded, package: Path, data_dir: Path, int8: bool, scorer, n_fp32: int = 200) -> dict:
    """The package against the Predictor on the held-out calibration set (fp32: its first 200).
    ``scorer(package)`` opens the package as the edge does (``edge.scorer.EdgeScorer``; passed in,
    so that ``model/`` imports nothing of the applications around it)."""
    from model.inference.predictor import Predictor

    ids, y, images, records = _held_out(loaded, data_dir)
    if not int8:
        ids, y, images, records = ids[:n_fp32], y[:n_fp32], images[:n_fp32], records[:n_fp32]
    tta = bool(loaded.manifest.get("inference", {}).get("tta", False))
    server = Predictor(bundle=loaded, batch_sizes=(1, 16, 64), tta=tta).score(images, records, ids)
    edge = scorer(package).score_many(images, records)
    p_server = np.array([s.probability for s in server])
    p_edge = np.array([e["score"] for e in edge])
    same_gate = [s.assessable == e["assessable"] and s.reason == e["reason"] for s, e in zip(server, edge, strict=True)]
    agree = float(np.mean([s.referred == bool(e["referred"]) for s, e in zip(server, edge, strict=True)]))
    out = {
        "n": len(ids), "precision": "int8" if int8 else "fp32",
        "max_probability_difference": float(np.max(np.abs(p_server - p_edge))),
        "gate_verdicts_identical": float(np.mean(same_gate)), "referral_agreement": agree,
        "auc_server": metrics.auc(y, p_server), "auc_edge": metrics.auc(y, p_edge),
    }  # fmt: skip
    if int8:
        out["passed"] = agree >= 0.99 and abs(out["auc_server"] - out["auc_edge"]) <= 0.005
        out["rule"] = "referral decisions agree on >= 99 % of the held-out calibration set, AUC within 0.005"
    else:
        out["passed"] = out["max_probability_difference"] <= 1e-4 and out["gate_verdicts_identical"] == 1.0
        out["rule"] = "probabilities within 1e-4 of Keras on 200 held-out lesions, gate verdicts identical"
    log.info("edge package check: %s", out)
    return out
