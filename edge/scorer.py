"""Scoring with an edge package: decode and resize (as the server does), encode the metadata (the
server's own rules), run the exported network (ONNX Runtime or LiteRT) on the flips the bundle
asks for, calibrate, and apply the gate — the same answer as the server's Predictor, to within
1e-4 for an fp32 package (the export checks it)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np

from model.errors import ModelError, require_extra
from model.inference import camera
from model.inference.bundle import file_sha256
from model.inference.calibration import Calibrator
from model.inference.data import canonical_size, decode_many
from model.inference.diagnosis import CODES, adjust, as_list
from model.inference.features import FeatureSpec
from model.inference.gate import Gate
from model.inference.missing import MissingMetadata, missing_fields

FORMAT = "dermascan-edge/1"


class _OnnxRuntime:
    def __init__(self, path: Path, threads: int | None):
        require_extra("onnxruntime", "onnx", "an ONNX edge package", "dermascan-edge")
        from model.inference.runtimes import ort_session

        self.session = ort_session(path, threads)

        self.outputs = ["probability", "features"]
        if "diagnosis" in {o.name for o in self.session.get_outputs()}:
            self.outputs.append("diagnosis")

    def __call__(self, image: np.ndarray, meta: np.ndarray):
        """(probability (n,), features (n, d), class probabilities (n, classes) or None)."""
        out = self.session.run(self.outputs, {"image": image, "meta": meta})
        classes = np.asarray(out[2], np.float32) if len(out) > 2 else None
        return np.asarray(out[0], np.float32).reshape(-1), np.asarray(out[1], np.float32), classes


class _LiteRT:
    def __init__(self, path: Path, threads: int | None):
        require_extra("ai_edge_litert", "litert", "a LiteRT edge package", "dermascan-edge")
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=str(path), num_threads=threads)
        inputs = self.interpreter.get_input_details()
        self.inputs = {("image" if d["dtype"] == np.uint8 else "meta"): d["index"] for d in inputs}
        self.batch = None

    def __call__(self, image: np.ndarray, meta: np.ndarray):
        it = self.interpreter
        if self.batch != len(image):  # the batch dimension is resized to each call's
            it.resize_tensor_input(self.inputs["image"], list(image.shape))
            it.resize_tensor_input(self.inputs["meta"], list(meta.shape))
            it.allocate_tensors()
            self.batch = len(image)
        it.set_tensor(self.inputs["image"], np.ascontiguousarray(image))
        it.set_tensor(self.inputs["meta"], np.ascontiguousarray(meta, dtype=np.float32))
        it.invoke()
        outputs = [it.get_tensor(d["index"]) for d in it.get_output_details()]
        probability = next(o for o in outputs if o.shape[-1] == 1)
        classes = next((o for o in outputs if o.shape[-1] == len(CODES)), None)
        features = next(o for o in outputs if o.shape[-1] not in (1, len(CODES)))
        return (np.asarray(probability, np.float32).reshape(-1), np.asarray(features, np.float32),
                None if classes is None else np.asarray(classes, np.float32))  # fmt: skip


RUNTIMES = {"onnxruntime": _OnnxRuntime, "litert": _LiteRT}


def read_manifest(package) -> dict:
    package = Path(package)
    path = package / "manifest.json"
    if not path.is_file():
        raise ModelError(f"{package}: not an edge package (no manifest.json; `dermascan export` makes one)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ModelError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    model = package / manifest["file"]
    if not model.is_file() or file_sha256(model) != manifest["sha256"]:
        raise ModelError(f"{model}: missing, or its sha256 does not match the manifest: refusing to score with it")
    return manifest


def check_summary(check: dict) -> str:
    """The figures an export's check compared, with the rule, as people read them."""
    if "referral_agreement" in check and check.get("rule", "").startswith("referral"):
        return (
            f"referrals agree {100 * check['referral_agreement']:.2f} % (the rule: at least 99 %), AUC "
            f"{check['auc_edge']:.4f} against the bundle's {check['auc_server']:.4f} (the rule: within 0.005)"
        )
    return (
        f"largest probability difference {check.get('max_probability_difference', float('nan')):.2e} (the rule: at most "
        f"1e-4), gate verdicts identical on {100 * check.get('gate_verdicts_identical', 0):.1f} % (the rule: all)"
    )


class EdgeScorer:
    """An edge package, loaded once; :meth:`score` one study, :meth:`score_many` several."""

    def __init__(self, package, threads: int | None = None, batch: int = 16, allow_failed_check: bool = False):
        self.package = Path(package)
        self.manifest = read_manifest(self.package)
        check = self.manifest.get("check") or {}
        if check.get("passed") is False and not allow_failed_check:
            raise ModelError(
                f"{self.package}: this package failed its own check when it was exported ({check_summary(check)}): "
                "not scored with (--allow-failed-check to use it anyway)"
            )
        self.run = RUNTIMES[self.manifest["runtime"]](self.package / self.manifest["file"], threads)
        self.spec = FeatureSpec.from_dict(self.manifest["feature_spec"])
        self.calibrator = Calibrator.from_dict(self.manifest.get("calibration"))
        self.missing = MissingMetadata.from_dict(self.manifest.get("missing_metadata"))
        self.gate = Gate.from_bundle(self.package, self.manifest)
        self.threshold = float(self.manifest["threshold"])
        self.tta = bool(self.manifest.get("inference", {}).get("tta", False))
        # as the server's Predictor does: the fill before the quality measures, the camera clamp after
        self.fill, self.correct = camera.steps(self.manifest)
        self.size = canonical_size(self.manifest["image_size"])
        self.batch = batch

    @property
    def version(self) -> str:
        return self.manifest["version"]

    def prepare_metadata(self, record: dict) -> dict:
        """The package's own rules for its metadata (its feature spec: the vocabulary and aliases
        it was trained with, ages 0–120): ValueError naming the field for a value it cannot take."""
        return self.spec.check(record or {})

    def image_features(self, pixels: np.ndarray) -> np.ndarray:
        """The gate's features of resized pixels (the metadata does not reach them)."""
        meta = np.zeros((self.batch, self.spec.dim), np.float32)
        parts = [self.run(np.ascontiguousarray(pixels[i : i + self.batch]), meta[: len(pixels[i : i + self.batch])])[1]
                 for i in range(0, len(pixels), self.batch)]  # fmt: skip
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)

    def _forward(self, pixels: np.ndarray, meta: np.ndarray):
        views = [pixels, pixels[:, :, ::-1], pixels[:, ::-1], pixels[:, ::-1, ::-1]] if self.tta else [pixels]
        raw = np.zeros((len(views), len(pixels)), np.float32)
        features = classes = None
        for start in range(0, len(pixels), self.batch):
            stop = min(len(pixels), start + self.batch)
            for v, view in enumerate(views):
                p, f, c = self.run(np.ascontiguousarray(view[start:stop]), meta[start:stop])
                raw[v, start:stop] = p
                if v == 0:
                    features = np.zeros((len(pixels), f.shape[1]), np.float32) if features is None else features
                    features[start:stop] = f
                if c is not None:
                    classes = np.zeros((len(pixels), c.shape[1]), np.float32) if classes is None else classes
                    classes[start:stop] += c / len(views)
        missing = missing_fields(self.spec, meta)
        if self.missing is not None and any(missing):
            probability = self.missing.calibrate(raw, missing, self.calibrator)[0]
        else:
            probability = self.calibrator(raw.mean(axis=0))
        differential = None if classes is None else adjust(classes, self.manifest.get("diagnosis"))
        return probability.astype(np.float32), features, missing, differential

    def score_many(self, images: list[bytes], records: list[dict]) -> list[dict]:
        """Each image (JPEG or PNG bytes) with its metadata → a result (the server's fields), or
        ``{"error": …}`` for an image that cannot be decoded."""
        sizes = np.zeros((len(images), 2), np.float32)
        pixels, errors = decode_many([(i, b) for i, b in enumerate(images)], self.size, sizes=sizes)
        ok = [i for i in range(len(images)) if i not in errors]
        out: list[dict] = [{"error": str(errors[i])} if i in errors else {} for i in range(len(images))]
        if not ok:
            return out
        meta = self.spec.transform([records[i] for i in ok])
        pixels = self.fill(pixels[ok])
        probability, features, missing, differential = self._forward(self.correct(pixels), meta)
        reasons, distance = self.gate.reasons(pixels, sizes[ok], features)  # measured as they came
        made_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        for j, i in enumerate(ok):
            p = float(np.clip(probability[j], 0.0, 1.0))
            assessable = reasons[j] is None
            out[i] = {
                "probability": p if assessable else None,
                "score": p,  # the number itself, whatever the gate said (checks compare it)
                "referred": (p >= self.threshold) if assessable else None,
                "assessable": assessable,
                "reason": reasons[j],
                "threshold": self.threshold,
                "missing_fields": missing[j],
                **({} if differential is None else {"differential": as_list(differential[j])}),
                "bundle_version": self.version,
                "runtime": self.manifest["runtime"],
                "precision": self.manifest["precision"],
                "made_at": made_at,
            }
        return out

    def score(self, image: bytes, record: dict | None = None) -> dict:
        """One study: the image's bytes and its metadata (age_approx, sex, anatom_site_general)."""
        return self.score_many([image], [self.prepare_metadata(record or {})])[0]
