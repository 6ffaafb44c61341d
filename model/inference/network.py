"""The NASNetMobile image + metadata fusion network.

Inputs are a dict: ``image`` (uint8 pixels, H×W×3) and ``meta`` (the feature spec's float32
vector). Conversion lives inside the model: the training-only augmentation works on raw pixels,
then ``Rescaling`` maps them to [-1, 1] as NASNet expects, so the saved model takes raw pixels and
no caller can normalise differently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import keras
from keras import layers, ops

from model.inference.data import Size, image_shape

HEAD = "classification_head"
DIAGNOSIS_HEAD = "diagnosis_head"
DIAGNOSIS_CELL_POOL = "diagnosis_cell_pool"  # the cell the differential reads beside the fused features
DIAGNOSIS_CELL_MAX_POOL = "diagnosis_cell_max_pool"  # the same cell's largest value per channel
# each way the differential head can pool that cell: its layer's name and class, in the order the head reads them
CELL_POOLS = {
    "average": (DIAGNOSIS_CELL_POOL, layers.GlobalAveragePooling2D),
    "max": (DIAGNOSIS_CELL_MAX_POOL, layers.GlobalMaxPooling2D),
}
IMAGE_FEATURES = "image_features"


@keras.saving.register_keras_serializable(package="dermascan")
class ShadesOfGray(layers.Layer):
    """Colour constancy (Finlayson and Trezzi, 2004), at inference as in training: each image's
    illuminant is estimated per channel as the Minkowski ``power``-mean of its pixels, and every
    channel is scaled so that the illuminant becomes grey at the image's own mean level. A cooler or
    warmer dermatoscope then gives the network the same colours (ISIC 2018-2019's leading entries
    used it as preprocessing; here it lives in the graph, so every runtime and export applies it)."""

    def __init__(self, power: float = 6.0, **kwargs):
        super().__init__(**kwargs)
        self.power = float(power)

    def call(self, x):
        unit = ops.clip(x / 255.0, 0.0, 1.0)
        norm = ops.power(ops.mean(ops.power(unit, self.power), axis=(1, 2), keepdims=True) + 1e-12, 1.0 / self.power)
        grey = ops.mean(norm, axis=-1, keepdims=True)
        return ops.clip(x * grey / (norm + 1e-6), 0.0, 255.0)

    def get_config(self):
        return {**super().get_config(), "power": self.power}


@keras.saving.register_keras_serializable(package="dermascan")
class CameraJitter(layers.Layer):
    """Training only: what another dermatoscope does to an image — its white balance (a gain per
    channel, ±``white_balance``), its exposure (one gain, ±``exposure``), a vignette (darker towards
    the corners, up to ``vignette``) and, with probability ``field_of_view``, a circular field of
    view with black outside it (contact dermatoscopes), of random radius and centre. The corners
    then carry no fixed pattern the network could lean on."""

    def __init__(self, white_balance=0.15, exposure=0.25, vignette=0.4, field_of_view=0.35, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.white_balance, self.exposure = float(white_balance), float(exposure)
        self.vignette, self.field_of_view = float(vignette), float(field_of_view)
        self.seed = seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, x, training=None):
        if not training:
            return x
        shape = ops.shape(x)
        batch, height, width = shape[0], shape[1], shape[2]

        def uniform(size, low, high):
            return keras.random.uniform(size, low, high, seed=self.generator)

        gains = uniform((batch, 1, 1, 3), 1.0 - self.white_balance, 1.0 + self.white_balance)
        gains = gains * uniform((batch, 1, 1, 1), 1.0 - self.exposure, 1.0 + self.exposure)
        rows = ops.reshape(ops.linspace(-1.0, 1.0, height), (1, -1, 1, 1))
        cols = ops.reshape(ops.linspace(-1.0, 1.0, width), (1, 1, -1, 1))
        cy, cx = uniform((batch, 1, 1, 1), -0.15, 0.15), uniform((batch, 1, 1, 1), -0.15, 0.15)
        radius = ops.sqrt(ops.square(rows - cy) + ops.square(cols - cx))  # 1 at an edge's middle
        fade = 1.0 - uniform((batch, 1, 1, 1), 0.0, self.vignette) * ops.square(radius) / 2.0
        edge = uniform((batch, 1, 1, 1), 0.85, 1.25)
        circle = ops.sigmoid((edge - radius) * 40.0)  # soft-edged disc
        use = ops.cast(uniform((batch, 1, 1, 1), 0.0, 1.0) < self.field_of_view, x.dtype)
        mask = use * circle + (1.0 - use)
        return ops.clip(x * gains * fade * mask, 0.0, 255.0)

    def get_config(self):
        return {
            **super().get_config(), "white_balance": self.white_balance, "exposure": self.exposure,
            "vignette": self.vignette, "field_of_view": self.field_of_view, "seed": self.seed,
        }  # fmt: skip


@keras.saving.register_keras_serializable(package="dermascan")
class MetadataDropout(layers.Layer):
    """Training only: hide metadata fields at random, so that "not said" is learned as not said.

    ``groups`` are the feature spec's fields as [start, stop) slices of the metadata vector and
    ``missing`` is the vector every field takes when it is missing (its missing flag or unknown
    bucket set). Each field is hidden with probability ``rate``, and all of them together with
    probability ``all_rate`` (a program that sends images only)."""

    def __init__(self, groups: Sequence[Sequence[int]], missing: Sequence[float], rate=0.25, all_rate=0.15, seed=None, **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        self.groups = [[int(a), int(b)] for a, b in groups]
        self.missing = [float(v) for v in missing]
        self.rate, self.all_rate, self.seed = float(rate), float(all_rate), seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, m, training=None):
        if not training or not self.groups:
            return m
        dim = len(self.missing)
        membership = [[1.0 if a <= j < b else 0.0 for j in range(dim)] for a, b in self.groups]
        membership = ops.convert_to_tensor(membership, dtype=m.dtype)  # (fields, dim)
        batch = ops.shape(m)[0]
        hide = keras.random.uniform((batch, len(self.groups)), seed=self.generator) < self.rate
        hide_all = keras.random.uniform((batch, 1), seed=self.generator) < self.all_rate
        hide = ops.cast(ops.logical_or(hide, hide_all), m.dtype)
        mask = ops.minimum(ops.matmul(hide, membership), 1.0)  # (batch, dim)
        missing = ops.convert_to_tensor([self.missing], dtype=m.dtype)
        return m * (1.0 - mask) + missing * mask

    def get_config(self):
        return {
            **super().get_config(), "groups": self.groups, "missing": self.missing, "rate": self.rate,
            "all_rate": self.all_rate, "seed": self.seed,
        }  # fmt: skip


TRAINING_ONLY = (CameraJitter, MetadataDropout)


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
    # another dermatoscope (CameraJitter): white balance, exposure, vignette, circular field of view
    white_balance: float = 0.0
    exposure: float = 0.0
    vignette: float = 0.0
    field_of_view: float = 0.0

    def layers(self, seed: int | None = None) -> list[keras.layers.Layer]:
        out: list[keras.layers.Layer] = []
        if self.white_balance or self.exposure or self.vignette or self.field_of_view:
            out.append(
                CameraJitter(
                    self.white_balance, self.exposure, self.vignette, self.field_of_view, seed=seed, name="aug_camera"
                )
            )
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
# model v4's recipe: the standard augmentation plus what other dermatoscopes do to an image
CAMERA_AUGMENTATION = {"white_balance": 0.15, "exposure": 0.25, "vignette": 0.4, "field_of_view": 0.35}
# wider: a cooler or warmer light (red ×0.9, blue ×1.1) and a 20 % darker exposure well inside the
# range rather than near its edge
WIDE_CAMERA_AUGMENTATION = {"white_balance": 0.25, "exposure": 0.35, "vignette": 0.4, "field_of_view": 0.35}


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
    diagnoses: int = 0,
    colour_constancy: bool = False,
    metadata_dropout: dict | None = None,
) -> keras.Model:
    """Build the fusion network.

    ``meta_dim`` is ``FeatureSpec.dim``. ``weights`` is an optional local NASNetMobile weights
    file (``include_top=False``); ImageNet weights cannot be downloaded here, so the default is
    training from scratch. ``diagnoses``: with a number of classes, a second output (softmax,
    ``diagnosis_head``) beside the probability of malignancy, on the same fused features.
    ``colour_constancy``: Shades of Gray inside the graph. ``metadata_dropout``: the arguments of
    :class:`MetadataDropout` (``groups``, ``missing``, ``rate``, ``all_rate``), training only.
    """
    augmentation = Augmentation() if augmentation is None else augmentation
    height, width = image_shape(image_size)  # a side (square), or [height, width]
    image_in = keras.Input((height, width, 3), dtype="uint8", name="image")
    meta_in = keras.Input((meta_dim,), dtype="float32", name="meta")

    x = layers.Identity(name="pixels", dtype="float32")(keras.ops.cast(image_in, "float32"))
    for layer in augmentation.layers(seed):
        x = layer(x)
    if colour_constancy:
        x = ShadesOfGray(name="colour_constancy")(x)
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
    if metadata_dropout:
        m = MetadataDropout(**metadata_dropout, seed=seed, name="metadata_dropout")(m)
    for i, units in enumerate(meta_units):
        m = layers.Dense(units, use_bias=False, name=f"meta_dense_{i}")(m)
        m = layers.BatchNormalization(name=f"meta_bn_{i}")(m)
        m = layers.Activation("relu", name=f"meta_relu_{i}")(m)
        m = layers.Dropout(meta_dropout, name=f"meta_dropout_{i}")(m)

    x = layers.Concatenate(name="fusion")([image_features, m])
    x = layers.Dropout(dropout, name="fusion_dropout")(x)
    out = layers.Dense(1, activation="sigmoid", dtype="float32", name=HEAD)(x)
    if diagnoses:
        dx = layers.Dense(diagnoses, activation="softmax", dtype="float32", name=DIAGNOSIS_HEAD)(x)
        return keras.Model({"image": image_in, "meta": meta_in}, [out, dx], name=name)
    return keras.Model({"image": image_in, "meta": meta_in}, out, name=name)


def diagnosis_reads_cell(network: keras.Model, stride: int = 8, pools: tuple[str, ...] = ("average",)) -> keras.Model:
    """``network`` with a new, untrained differential head that reads, beside the fused features,
    the cell Grad-CAM shows (NASNet's last cell at ``1/stride`` of the input's side,
    ``model.inference.gradcam.cell_layer``) pooled — ``pools``: its average and/or its largest
    value per channel (a small structure the average over the whole image dilutes): the last
    cell's features are made for malignancy, the earlier cell's texture and colour tell the
    diagnoses apart better (measured in docs/model.md). A head that already reads the cell is
    rewired to read ``pools``. Every other layer, and so the probability of malignancy, is the
    network's own."""
    from model.inference.gradcam import cell_layer

    unknown = sorted(set(pools) - set(CELL_POOLS))
    if unknown or not pools:
        raise ValueError(f"cell pools {list(pools)}: each one of {sorted(CELL_POOLS)}")
    if cell_pools(network) == tuple(p for p in CELL_POOLS if p in pools):
        raise ValueError(f"{network.name}: its differential head already reads the cell pooled that way")
    head = network.get_layer(DIAGNOSIS_HEAD)
    cell = cell_layer(network, stride).output
    pooled = [pool(name=name)(cell) for p, (name, pool) in CELL_POOLS.items() if p in pools]
    fused = network.get_layer("fusion_dropout").output  # what the head read before any cell
    features = layers.Concatenate(name="diagnosis_features")([fused, *pooled])
    dx = layers.Dense(head.units, activation="softmax", dtype="float32", name=DIAGNOSIS_HEAD)(features)
    return keras.Model(network.input, [network.outputs[0], dx], name=network.name)


def cell_pools(network: keras.Model) -> tuple[str, ...]:
    """How the differential head reads the cell beside the fused features: () for not at all,
    else its pools in :data:`CELL_POOLS`'s order."""
    names = {layer.name for layer in network.layers}
    return tuple(p for p, (name, _) in CELL_POOLS.items() if name in names)


def last_cell_layer(model: keras.Model) -> keras.layers.Layer:
    """The layer whose output is NASNet's last cell (the input of its global average pooling)."""
    pool = next(
        (
            layer
            for layer in model.layers
            if isinstance(layer, layers.GlobalAveragePooling2D)
            and layer.name not in {name for name, _ in CELL_POOLS.values()}
        ),
        None,
    )
    if pool is None:
        raise ValueError(f"{model.name}: no global average pooling layer after the image backbone")
    producer = pool._inbound_nodes[0].input_tensors[0]._keras_history.operation
    return producer
