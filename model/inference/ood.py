"""Out-of-distribution check from the network itself: how far an image's features lie from the
development images' features.

The features are the image branch's pooled features (``image_features``) of every ensemble
member (or of the members the gate names), side by side. A Gaussian is fitted to the development images' features in a reduced
space (PCA, whitened): the score is the Mahalanobis distance there plus the energy the PCA does
not explain (the residual, scaled by its development mean), so an image whose features are
unlike every lesion's — in the main directions or off them — scores high. The threshold is
chosen on held-out lesion images (a calibration set no member trained on) at a chosen false-flag
rate, and ships in the bundle (``gate.npz`` + ``manifest["gate"]``).

Only :func:`feature_network` imports Keras; fitting and scoring are numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_FEATURES = "image_features"


def feature_network(network, feature_members: Sequence[int] | None = None):
    """A model with the same inputs as ``network`` and two outputs: its probability and the
    image-branch features of each member (concatenated). Works for a single fusion model and for
    an ensemble of them (members are nested models). ``feature_members``: the members (by
    position) whose features the gate reads — all of them when None; every member still votes."""
    import keras

    members = [layer for layer in network.layers if isinstance(layer, keras.Model)]
    if not members:  # a single network; with the differential, its class probabilities third
        return keras.Model(
            network.inputs, [network.outputs[0], network.get_layer(IMAGE_FEATURES).output, *network.outputs[1:2]]
        )
    chosen = set(range(len(members)) if feature_members is None else feature_members)
    if not chosen or not chosen <= set(range(len(members))):
        raise ValueError(f"feature members {sorted(chosen)} are not among the network's {len(members)} members")
    image_in = keras.Input(network.get_layer("image").output.shape[1:], dtype="uint8", name="image")
    meta_in = keras.Input(network.get_layer("meta").output.shape[1:], dtype="float32", name="meta")
    inputs = {"image": image_in, "meta": meta_in}
    probabilities, features = [], []
    for k, member in enumerate(members):
        if k not in chosen:
            probabilities.append(member(inputs))
            continue
        both = keras.Model(member.inputs, [member.outputs[0], member.get_layer(IMAGE_FEATURES).output])
        p, f = both(inputs)
        probabilities.append(p)
        features.append(f)
    probability = keras.layers.Average()(probabilities) if len(members) > 1 else probabilities[0]
    feats = keras.layers.Concatenate()(features) if len(features) > 1 else features[0]
    return keras.Model(inputs, [probability, feats], name=f"{network.name}_features")


@dataclass
class FeatureDistance:
    mean: np.ndarray  # (d,)
    scale: np.ndarray  # (d,) per-feature standard deviation
    components: np.ndarray  # (k, d)
    variances: np.ndarray  # (k,)
    residual_mean: float  # mean residual energy of the development features
    threshold: float = float("inf")

    @classmethod
    def fit(cls, features: np.ndarray, components: int = 64) -> FeatureDistance:
        x = np.asarray(features, dtype=np.float64)
        mean = x.mean(axis=0)
        scale = x.std(axis=0) + 1e-6
        z = (x - mean) / scale
        k = int(min(components, z.shape[0] - 1, z.shape[1]))
        _, s, vt = np.linalg.svd(z, full_matrices=False)
        variances = (s[:k] ** 2) / (z.shape[0] - 1) + 1e-6
        out = cls(mean, scale, vt[:k], variances, 1.0)
        out.residual_mean = float(out._parts(x)[1].mean()) + 1e-9
        return out

    def _parts(self, features: np.ndarray):
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        proj = z @ self.components.T
        inside = (proj**2 / self.variances).sum(axis=1)
        residual = np.maximum((z**2).sum(axis=1) - (proj**2).sum(axis=1), 0.0)
        return inside, residual

    def score(self, features: np.ndarray) -> np.ndarray:
        """Distance from the development features: (Mahalanobis² in the PCA space) / k plus the
        residual energy over its development mean, halved (about 1 for a typical lesion)."""
        inside, residual = self._parts(features)
        return 0.5 * (inside / len(self.variances) + residual / self.residual_mean)

    def choose_threshold(self, held_out_features: np.ndarray, false_flag_rate: float) -> float:
        """The score above which at most ``false_flag_rate`` of the held-out lesions lie."""
        self.threshold = float(np.quantile(self.score(held_out_features), 1.0 - false_flag_rate))
        return self.threshold

    def save(self, path: Path) -> None:
        np.savez(
            path,
            mean=self.mean.astype(np.float32),
            scale=self.scale.astype(np.float32),
            components=self.components.astype(np.float32),
            variances=self.variances.astype(np.float32),
            residual_mean=np.float64(self.residual_mean),
            threshold=np.float64(self.threshold),
        )

    @classmethod
    def load(cls, path: Path) -> FeatureDistance:
        with np.load(path) as data:
            return cls(
                data["mean"].astype(np.float64),
                data["scale"].astype(np.float64),
                data["components"].astype(np.float64),
                data["variances"].astype(np.float64),
                float(data["residual_mean"]),
                float(data["threshold"]),
            )


@dataclass
class LesionCheck:
    """An explicit "is this a dermoscopic lesion image" signal from the same features: a logistic
    regression of development lesions against photographs, scenes and other medical images
    (``model.training.gate_data.world``, its "fit" half), on the features standardised and reduced to
    their main directions. The score is the log-odds of "lesion"; below ``threshold`` (set on
    held-out lesions at a false-flag rate) the image is not a dermoscopic lesion. Plain arrays,
    so any runtime can score it (the edge package does, in numpy)."""

    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray  # (k, d)
    coef: np.ndarray  # (k,)
    intercept: float
    threshold: float = float("-inf")

    @classmethod
    def fit(cls, lesions: np.ndarray, others: np.ndarray, components: int = 128, c: float = 0.05) -> LesionCheck:
        from sklearn.linear_model import LogisticRegression

        x = np.concatenate([lesions, others]).astype(np.float64)
        mean, scale = lesions.mean(axis=0), lesions.std(axis=0) + 1e-6
        z = (x - mean) / scale
        k = int(min(components, len(lesions) - 1, z.shape[1]))
        # main directions of both kinds together: those that tell them apart are kept too
        _, _, vt = np.linalg.svd(z - z.mean(axis=0), full_matrices=False)
        proj = z @ vt[:k].T
        y = np.r_[np.ones(len(lesions)), np.zeros(len(others))]
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=2000).fit(proj, y)
        return cls(mean, scale, vt[:k], model.coef_[0], float(model.intercept_[0]))

    def score(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        return (z @ self.components.T) @ self.coef + self.intercept

    def choose_threshold(self, held_out_lesions: np.ndarray, false_flag_rate: float) -> float:
        self.threshold = float(np.quantile(self.score(held_out_lesions), false_flag_rate))
        return self.threshold

    def save(self, path: Path) -> None:
        np.savez(path, mean=self.mean.astype(np.float32), scale=self.scale.astype(np.float32),
                 components=self.components.astype(np.float32), coef=self.coef.astype(np.float32),
                 intercept=np.float64(self.intercept), threshold=np.float64(self.threshold))  # fmt: skip

    @classmethod
    def load(cls, path: Path) -> LesionCheck:
        with np.load(path) as data:
            return cls(*(data[k].astype(np.float64) for k in ("mean", "scale", "components", "coef")),
                       float(data["intercept"]), float(data["threshold"]))  # fmt: skip
