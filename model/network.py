"""The NASNetMobile image + metadata fusion network.

Inputs are a dict: ``image`` (uint8 pixels, H×W×3) and ``meta`` (the feature spec's float32
vector). Conversion lives inside the model: the training-only augmentation works on raw pixels,
then ``Rescaling`` maps them to [-1, 1] as NASNet expects, so the saved model takes raw pixels and
no caller can normalise differently.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import keras
from keras import layers

from model.data import Size, image_shape

HEAD = "classification_head"
IMAGE_FEATURES = "image_features"


@dataclass(frozen=True)
class Augmentation:
    """Training-only augmentation (Keras core layers; inactive at inference).

    The cutout defaults follow the ISIC 2024 KerasCV starter: patches with 2–6 % side lengths,
    applied with probability 0.5.
    """

    flip: bool = True
    rotation: float = 0.5  # fraction of a full turn either way (0.5 = any angle)
    zoom: float = 0.1
    cutout_side: tuple[float, float] = (0.02, 0.06)
    cutout_p: float = 0.5
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1

    def layers(self, seed: int | None = None) -> list[keras.layers.Layer]:
        out: list[keras.layers.Layer] = []
        if self.flip:
            out.append(layers.RandomFlip("horizontal_and_vertical", seed=seed, name="aug_flip"))
        if self.rotation:
            out.append(layers.RandomRotation(self.rotation, fill_mode="reflect", seed=seed, name="aug_rotate"))
        if self.zoom:
            out.append(layers.RandomZoom((-self.zoom, self.zoom), fill_mode="reflect", seed=seed, name="aug_zoom"))
        if self.brightness or self.contrast or self.saturation:
            out.append(
                layers.RandomColorJitter(
                    value_range=(0, 255),
                    brightness_factor=self.brightness or None,
                    contrast_factor=self.contrast or None,
                    saturation_factor=(max(0.0, 0.5 - self.saturation / 2), 0.5 + self.saturation / 2)
                    if self.saturation
                    else None,
                    seed=seed,
                    name="aug_color",
                )
            )
        if self.cutout_p:
            lo, hi = self.cutout_side
            out.append(
                layers.RandomErasing(
                    factor=(self.cutout_p, self.cutout_p),
                    scale=(lo * lo, hi * hi),  # RandomErasing takes the square of the side fraction
                    value_range=(0, 255),
                    seed=seed,
                    name="aug_cutout",
                )
            )
        return out

    def to_dict(self) -> dict:
        return asdict(self)


NO_AUGMENTATION = Augmentation(False, 0.0, 0.0, (0.02, 0.06), 0.0, 0.0, 0.0, 0.0)


def build(
    meta_dim: int,
    image_size: Size = 128,
    *,
    augmentation: Augmentation | None = None,
    weights: str | None = None,
    backbone: str = "nasnet_mobile",
    bn_momentum: float = 0.99,
    meta_units: tuple[int, ...] = (64, 32),
    dropout: float = 0.3,
    meta_dropout: float = 0.2,
    seed: int | None = None,
    name: str = "dermascan_fusion",
) -> keras.Model:
    """Build the fusion network.

    ``meta_dim`` is ``FeatureSpec.dim``. ``weights`` is an optional local NASNetMobile weights
    file (``include_top=False``); ImageNet weights cannot be downloaded here, so the default is
    training from scratch.
    """
    augmentation = Augmentation() if augmentation is None else augmentation
    height, width = image_shape(image_size)  # a side (square), or [height, width]
    image_in = keras.Input((height, width, 3), dtype="uint8", name="image")
    meta_in = keras.Input((meta_dim,), dtype="float32", name="meta")

    x = layers.Identity(name="pixels", dtype="float32")(keras.ops.cast(image_in, "float32"))
    for layer in augmentation.layers(seed):
        x = layer(x)
    x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="to_unit_range")(x)
    if backbone == "nasnet_mobile":
        nasnet = keras.applications.NASNetMobile(
            input_shape=(height, width, 3),
            include_top=False,
            weights=None,
            pooling="avg",
            input_tensor=x,
        )
        if weights:
            nasnet.load_weights(weights, skip_mismatch=False)
        # NASNet's batch norm keeps moving statistics with momentum 0.9997, tuned for ImageNet's
        # millions of steps; trained from scratch on a few thousand images, the inference-time
        # statistics would still be near their initial values after many epochs
        for layer in nasnet.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = bn_momentum
        x = nasnet.output
    elif backbone == "tiny":
        # A few-layer CNN with the same interface, for fast tests of everything around the model.
        for i, filters in enumerate((8, 16)):
            x = layers.Conv2D(filters, 3, strides=2, padding="same", name=f"tiny_conv_{i}")(x)
            x = layers.Activation("relu", name=f"tiny_relu_{i}")(x)
        x = layers.GlobalAveragePooling2D(name="tiny_pool")(x)
    else:
        raise ValueError(f"unknown backbone {backbone!r} (nasnet_mobile or tiny)")
    image_features = layers.Identity(name=IMAGE_FEATURES)(x)

    m = meta_in
    for i, units in enumerate(meta_units):
        m = layers.Dense(units, use_bias=False, name=f"meta_dense_{i}")(m)
        m = layers.BatchNormalization(name=f"meta_bn_{i}")(m)
        m = layers.Activation("relu", name=f"meta_relu_{i}")(m)
        m = layers.Dropout(meta_dropout, name=f"meta_dropout_{i}")(m)

    x = layers.Concatenate(name="fusion")([image_features, m])
    x = layers.Dropout(dropout, name="fusion_dropout")(x)
    out = layers.Dense(1, activation="sigmoid", dtype="float32", name=HEAD)(x)
    return keras.Model({"image": image_in, "meta": meta_in}, out, name=name)


def last_cell_layer(model: keras.Model) -> keras.layers.Layer:
    """The layer whose output is NASNet's last cell (the input of its global average pooling)."""
    pool = next(
        (layer for layer in model.layers if isinstance(layer, layers.GlobalAveragePooling2D)),
        None,
    )
    if pool is None:
        raise ValueError(f"{model.name}: no global average pooling layer after the image backbone")
    producer = pool._inbound_nodes[0].input_tensors[0]._keras_history.operation
    return producer
