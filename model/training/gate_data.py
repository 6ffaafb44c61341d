"""Images that are *not* assessable lesion images, for fitting and checking the not-assessable
gate: synthetic frames, other-domain pictures (charts, text, shapes, the sample pictures that
matplotlib ships) and development lesion images degraded on purpose.

Every generator is seeded, so a gate report can be reproduced. Arrays are RGB uint8 at their
original size; the gate sees them exactly as a worker would (resized to the bundle's size).
"""

from __future__ import annotations

import io
import logging
import warnings
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


# -- photographs and other medical images (the kinds the feature distance alone let through) -----
def _registry_photographs() -> list[tuple[str, np.ndarray]]:
    """Photographs that packages from the registries ship: scikit-learn's two sample photographs
    (a temple, a flower) and matplotlib's portrait. (scikit-image's samples are kept out: an
    acceptance set uses them.)"""
    from matplotlib import cbook
    from sklearn.datasets import load_sample_images

    out = [(f"sklearn-{i}", np.asarray(img, np.uint8)) for i, img in enumerate(load_sample_images().images)]
    with cbook.get_sample_data("grace_hopper.jpg") as fh:
        out.append(("grace_hopper", np.asarray(Image.open(fh).convert("RGB"))))
    return out


def _variants(name: str, img: np.ndarray, n: int, rng) -> Iterator[tuple[str, np.ndarray]]:
    """Crops at several scales, turned, tinted and re-lit: one photograph, many framings."""
    h, w = img.shape[:2]
    for _ in range(n):
        side = int(min(h, w) * rng.uniform(0.25, 0.95))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = img[y : y + side, x : x + int(side * rng.uniform(0.8, 1.3)) if x + side * 1.3 < w else x + side]
        out = np.rot90(crop, int(rng.integers(0, 4))).astype(float)
        out = out * rng.uniform(0.7, 1.2, 3) + rng.uniform(-25, 25)  # white balance, exposure
        yield name, np.ascontiguousarray(out.clip(0, 255).astype(np.uint8))


def photographs(per_picture: int = 40, seed: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """Ordinary photographs: the registries' sample photographs, whole and in many framings."""
    rng = _rng(seed + 7)
    for name, img in _registry_photographs():
        yield f"photo-{name}", img
        yield from ((f"photo-{n}", v) for n, v in _variants(name, img, per_picture, rng))


def scenes(n: int = 60, seed: int = 0, size: int = 256) -> Iterator[tuple[str, np.ndarray]]:
    """Made-up photographs of things: a mug on a table, a vehicle on a road, a furry animal's coat,
    a rocket against the sky — smooth shading, hard edges, specular highlights, fur and sky: what a
    camera pointed at the world sees, and dermoscopy never does."""
    rng = _rng(seed + 11)
    kinds = ("mug", "vehicle", "fur", "rocket")
    for i in range(n):
        kind = kinds[i % len(kinds)]
        w, h = size, int(size * rng.uniform(0.7, 1.0))
        yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
        if kind == "fur":
            base = rng.uniform([120, 60, 20], [230, 170, 110])
            strands = np.sin(xx * rng.uniform(60, 140) + np.cumsum(rng.normal(0, 0.4, (h, w)), axis=0) * 0.3)
            shade = 0.75 + 0.25 * strands[..., None] + rng.normal(0, 0.06, (h, w, 1))
            img = base * shade * (0.8 + 0.4 * yy[..., None])
        else:
            top = (
                rng.uniform([60, 120, 180], [150, 200, 255])
                if kind in ("rocket", "vehicle")
                else rng.uniform(120, 230, 3)
            )
            bottom = rng.uniform(40, 160, 3)
            img = top * (1 - yy[..., None]) + bottom * yy[..., None]
            canvas = Image.fromarray(img.clip(0, 255).astype(np.uint8))
            draw = ImageDraw.Draw(canvas)
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            cx, cy = int(w * rng.uniform(0.35, 0.65)), int(h * rng.uniform(0.4, 0.6))
            if kind == "mug":
                bw, bh = int(w * 0.25), int(h * 0.35)
                draw.rectangle([cx - bw, cy - bh, cx + bw, cy + bh], fill=colour)
                draw.ellipse([cx + bw - 10, cy - bh // 2, cx + bw + 40, cy + bh // 2], outline=colour, width=12)
                draw.ellipse([cx - bw, cy - bh - 12, cx + bw, cy - bh + 12], fill=(60, 35, 20))
                draw.rectangle([cx - bw + 8, cy - bh + 10, cx - bw + 22, cy + bh - 10], fill=(250, 250, 250))
            elif kind == "vehicle":
                draw.rounded_rectangle([cx - 90, cy - 30, cx + 90, cy + 25], 18, fill=colour)
                draw.rectangle([cx - 50, cy - 60, cx + 40, cy - 28], fill=tuple(int(c * 0.8) for c in colour))
                for dx in (-55, 55):
                    draw.ellipse([cx + dx - 22, cy + 5, cx + dx + 22, cy + 49], fill=(20, 20, 20))
                draw.rectangle([0, cy + 40, w, h], fill=(70, 70, 75))
            else:  # rocket
                draw.polygon([(cx, cy - 100), (cx - 25, cy - 40), (cx + 25, cy - 40)], fill=colour)
                draw.rectangle([cx - 25, cy - 40, cx + 25, cy + 70], fill=(235, 235, 240))
                draw.polygon([(cx - 25, cy + 40), (cx - 55, cy + 90), (cx - 25, cy + 70)], fill=colour)
                draw.polygon([(cx + 25, cy + 40), (cx + 55, cy + 90), (cx + 25, cy + 70)], fill=colour)
                draw.ellipse([cx - 30, cy + 70, cx + 30, cy + 130], fill=(255, 170, 40))
            img = np.asarray(canvas.filter(ImageFilter.GaussianBlur(0.8)), dtype=float)
            img = img + rng.normal(0, 4, img.shape)
        yield f"scene-{kind}", np.ascontiguousarray(np.asarray(img).clip(0, 255).astype(np.uint8))


def fundus(n: int = 24, seed: int = 0, size: int = 256) -> Iterator[tuple[str, np.ndarray]]:
    """Made-up retina fundus photographs: an orange-red disc on black, a bright optic disc, dark
    branching vessels — the colour of skin, the look of nothing dermoscopic."""
    rng = _rng(seed + 13)
    for _ in range(n):
        yy, xx = (np.mgrid[0:size, 0:size] - size / 2) / (size / 2)
        r = np.hypot(yy, xx)
        base = np.array(rng.uniform([170, 60, 20], [240, 120, 50]))
        img = base * np.clip(1.15 - 0.5 * r**2, 0, 1)[..., None]
        ox, oy = rng.uniform(-0.5, 0.5, 2)
        disc = np.exp(-(((xx - ox) ** 2 + (yy - oy) ** 2) / 0.012))
        img = img + disc[..., None] * np.array([60, 80, 50])
        canvas = Image.fromarray(img.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(canvas)
        cx, cy = (ox + 1) * size / 2, (oy + 1) * size / 2
        for _ in range(int(rng.integers(6, 12))):
            x, y, angle = cx, cy, rng.uniform(0, 2 * np.pi)
            for _ in range(25):
                nx, ny = x + 8 * np.cos(angle), y + 8 * np.sin(angle)
                draw.line([x, y, nx, ny], fill=(110, 20, 15), width=int(rng.integers(2, 5)))
                x, y, angle = nx, ny, angle + rng.normal(0, 0.25)
        img = np.asarray(canvas, dtype=float)
        img[r > 0.95] = 0
        yield "medical-fundus", np.ascontiguousarray(img.clip(0, 255).astype(np.uint8))


def dicom_samples(seed: int = 0) -> Iterator[tuple[str, np.ndarray]]:
    """The medical images pydicom ships as test data (CT, MR, ultrasound, secondary captures):
    grey ones as they are, and coloured by a colour map as a viewer would show them."""
    import matplotlib
    import pydicom
    import pydicom.data

    rng = _rng(seed + 17)
    cmaps = ("inferno", "hot", "viridis", "bone")
    # the files pydicom ships inside its package (get_testdata_files would also try to download more)
    for path in sorted((Path(pydicom.data.__file__).parent / "test_files").glob("*.dcm")):
        pixels = _clean_pixels(pydicom, path)
        if pixels is None:
            continue
        if pixels.ndim == 4 or pixels.ndim == 3 and pixels.shape[-1] != 3:
            pixels = pixels[0]
        if pixels.ndim < 2 or min(pixels.shape[:2]) < 64:
            continue
        pixels = (pixels - pixels.min()) / (np.ptp(pixels) or 1)
        if pixels.ndim == 2:
            grey = np.repeat((pixels * 255).astype(np.uint8)[..., None], 3, axis=2)
            yield "medical-dicom", grey
            coloured = matplotlib.colormaps[cmaps[int(rng.integers(0, len(cmaps)))]](pixels)[..., :3]
            yield "medical-dicom-colour", (coloured * 255).astype(np.uint8)
        else:
            yield "medical-dicom", (pixels * 255).astype(np.uint8)


class _Faults(logging.Handler):
    """Collects what pydicom finds wrong with a file while it is read (instead of printing it)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.found: list[str] = []

    def emit(self, record) -> None:
        self.found.append(record.getMessage())


def _clean_pixels(pydicom, path) -> np.ndarray | None:
    """A test file's pixels when pydicom reads it without finding fault (pydicom ships some
    deliberately malformed files — an IS of '1A', padded pixel data — to test itself: they are
    skipped, not read with a warning); None otherwise."""
    logger = logging.getLogger("pydicom")
    faults, propagate = _Faults(), logger.propagate
    logger.addHandler(faults)
    logger.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a file pydicom warns about is one it had to repair
            pixels = np.asarray(pydicom.dcmread(path).pixel_array, dtype=float)
    except Exception:  # noqa: BLE001 — a test file its decoders cannot read, or read only with a warning
        return None
    finally:
        logger.removeHandler(faults)
        logger.propagate = propagate
    return None if faults.found else pixels


def histology(n: int = 24, seed: int = 0, size: int = 256) -> Iterator[tuple[str, np.ndarray]]:
    """Made-up H&E histology: pink stroma with purple nuclei — pinks and purples a dermoscopic image
    shares, in a texture it never has."""
    rng = _rng(seed + 19)
    for _ in range(n):
        img = np.ones((size, size, 3)) * rng.uniform([225, 160, 190], [250, 195, 220])
        img = img + np.asarray(Image.fromarray((rng.random((size // 8, size // 8)) * 255).astype(np.uint8)).resize((size, size)))[..., None] * 0.15 - 20  # fmt: skip
        canvas = Image.fromarray(img.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(80, 240))):
            x, y, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(2, 6)
            draw.ellipse([x - r, y - r * 0.8, x + r, y + r * 0.8], fill=tuple(int(c) for c in rng.uniform([60, 30, 110], [120, 70, 170])))  # fmt: skip
        yield "medical-histology", np.asarray(canvas.filter(ImageFilter.GaussianBlur(0.7)))


def world(seed: int = 0, part: str = "all") -> tuple[list[str], list[np.ndarray]]:
    """Photographs, made-up scenes and other medical images, split in two halves that share no
    source picture or generator draw (``part`` "fit": what an explicit is-this-dermoscopy check
    learns from; "report": what measures it; "all")."""
    pairs = [
        *photographs(seed=seed),
        *scenes(seed=seed),
        *fundus(seed=seed),
        *dicom_samples(seed),
        *histology(seed=seed),
    ]
    if part != "all":
        sources = sorted({k for k, _ in pairs if k.startswith("photo-")})
        held_photo = sources[-1]  # one whole source photograph (and its framings) is for reporting only

        def reporting(i: int, kind: str) -> bool:
            return kind == held_photo if kind.startswith("photo-") else i % 2 == 1

        pairs = [(k, img) for i, (k, img) in enumerate(pairs) if reporting(i, k) == (part == "report")]
    return [k for k, _ in pairs], [img for _, img in pairs]
