"""Images that are *not* assessable lesion images, for fitting and checking the not-assessable
gate: synthetic frames, other-domain pictures (charts, text, shapes, the sample pictures that
matplotlib ships) and development lesion images degraded on purpose.

Every generator is seeded, so a gate report can be reproduced. Arrays are RGB uint8 at their
original size; the gate sees them exactly as a worker would (resized to the bundle's size).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def synthetic(n: int, seed: int = 0, size: int = 256) -> Iterator[tuple[str, np.ndarray]]:
    """(kind, image) pairs: uniform frames, gradients, checkerboards, stripes, noise, shapes, text."""
    rng = _rng(seed)
    kinds = ("uniform", "gradient", "checkerboard", "stripes", "noise", "shapes", "text")
    for i in range(n):
        kind = kinds[i % len(kinds)]
        h, w = size, int(size * rng.uniform(1.0, 1.5))
        if kind == "uniform":
            colour = rng.integers(0, 256, 3) if rng.random() < 0.6 else np.full(3, rng.choice([0, 128, 255]))
            img = np.broadcast_to(colour.astype(np.uint8), (h, w, 3)).copy()
        elif kind == "gradient":  # skies, walls, backdrops
            top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
            t = np.linspace(0, 1, h)[:, None, None]
            img = (top * (1 - t) + bottom * t + rng.normal(0, 2, (h, w, 3))).clip(0, 255).astype(np.uint8)
        elif kind == "checkerboard":
            cell = int(rng.integers(4, 48))
            yy, xx = np.mgrid[0:h, 0:w]
            mask = ((yy // cell + xx // cell) % 2).astype(bool)
            a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
            img = np.where(mask[..., None], a, b).astype(np.uint8)
        elif kind == "stripes":
            period = int(rng.integers(6, 60))
            xx = np.arange(w)[None, :] * np.ones((h, 1))
            phase = np.sin(2 * np.pi * xx / period) > 0
            a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
            img = np.where(phase[..., None], a, b).astype(np.uint8)
        elif kind == "noise":
            img = (
                rng.integers(0, 256, (h, w, 3)) if rng.random() < 0.5 else rng.normal(128, 60, (h, w, 3)).clip(0, 255)
            ).astype(np.uint8)
        elif kind == "shapes":
            canvas = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
            draw = ImageDraw.Draw(canvas)
            for _ in range(int(rng.integers(3, 12))):
                x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
                x1, y1 = x0 + int(rng.integers(10, w // 2)), y0 + int(rng.integers(10, h // 2))
                fill = tuple(int(c) for c in rng.integers(0, 256, 3))
                (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
            img = np.asarray(canvas)
        else:  # text: a page of a document or a form
            canvas = Image.new("RGB", (w, h), (250, 250, 245))
            draw = ImageDraw.Draw(canvas)
            for line in range(0, h, 14):
                words = " ".join(
                    "".join(chr(int(c)) for c in rng.integers(97, 123, rng.integers(2, 9))) for _ in range(8)
                )
                draw.text((6, line), words, fill=(20, 20, 20))
            img = np.asarray(canvas)
        yield kind, np.ascontiguousarray(img, dtype=np.uint8)


def charts(n: int, seed: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """Line, bar and scatter plots and colour-mapped fields rendered by matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = _rng(seed)
    cmaps = ("viridis", "magma", "terrain", "coolwarm", "gray")
    for i in range(n):
        fig, ax = plt.subplots(figsize=(3, 2.4), dpi=80)
        kind = ("line", "bar", "scatter", "field")[i % 4]
        if kind == "line":
            ax.plot(np.cumsum(rng.normal(size=(100, 3)), axis=0))
        elif kind == "bar":
            ax.bar(range(8), rng.random(8), color=rng.random((8, 3)))
        elif kind == "scatter":
            ax.scatter(*rng.normal(size=(2, 200)), c=rng.random(200), s=8)
        else:
            field = np.cumsum(np.cumsum(rng.normal(size=(64, 64)), 0), 1)
            ax.imshow(field, cmap=cmaps[i % len(cmaps)])
            ax.axis("off")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        plt.close(fig)
        yield f"chart-{kind}", np.asarray(Image.open(buffer).convert("RGB"))


def matplotlib_samples(crops: int = 6, seed: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """matplotlib's sample pictures (a portrait, a photo, a logo, terrain and an MRI slice,
    colour-mapped) and random crops of them."""
    import matplotlib
    from matplotlib import cbook

    rng = _rng(seed)
    pictures: list[tuple[str, np.ndarray]] = []
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"):
        with cbook.get_sample_data(name) as fh:
            pictures.append((name, np.asarray(Image.open(fh).convert("RGB"))))
    for name, key, cmap in (
        ("jacksboro_fault_dem.npz", "elevation", "terrain"),
        ("topobathy.npz", "topo", "gist_earth"),
    ):
        with cbook.get_sample_data(name) as data:
            field = np.asarray(data[key], dtype=float)
        field = (field - field.min()) / (np.ptp(field) or 1)
        pictures.append((name, (matplotlib.colormaps[cmap](field)[..., :3] * 255).astype(np.uint8)))
    mri = Path(cbook.get_sample_data("s1045.ima.gz", asfileobj=False))
    import gzip

    raw = np.frombuffer(gzip.open(mri).read(), np.uint16).reshape(256, 256).astype(float)
    pictures.append(("s1045.ima", np.repeat((raw / raw.max() * 255).astype(np.uint8)[..., None], 3, axis=2)))
    for name, img in pictures:
        yield f"sample-{name}", img
        h, w = img.shape[:2]
        for _ in range(crops):
            side = int(min(h, w) * rng.uniform(0.3, 0.8))
            y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
            yield f"sample-crop-{name}", np.ascontiguousarray(img[y : y + side, x : x + side])


def degraded(images, seed: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """Lesion images made unusable: heavily blurred, nearly black, blown out, drowned in noise."""
    rng = _rng(seed)
    kinds = ("blurred", "dark", "overexposed", "noisy")
    for i, img in enumerate(images):
        kind = kinds[i % len(kinds)]
        if kind == "blurred":
            radius = float(rng.uniform(6, 12)) * max(img.shape[:2]) / 192
            out = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius)))
        elif kind == "dark":
            out = (img.astype(float) * rng.uniform(0.03, 0.15)).astype(np.uint8)
        elif kind == "overexposed":
            out = (img.astype(float) * rng.uniform(2.5, 4.0) + 60).clip(0, 255).astype(np.uint8)
        else:
            out = (img.astype(float) + rng.normal(0, rng.uniform(70, 110), img.shape)).clip(0, 255).astype(np.uint8)
        yield f"degraded-{kind}", out


def negatives(lesions, seed: int = 0, n_synthetic: int = 140, n_charts: int = 24):
    """All of the above → (kinds, list of images)."""
    pairs = [
        *synthetic(n_synthetic, seed),
        *charts(n_charts, seed),
        *matplotlib_samples(seed=seed),
        *degraded(lesions, seed),
    ]
    return [k for k, _ in pairs], [img for _, img in pairs]
