"""Which heat map points at the lesion, and which still depends on what the network learned?

Grad-CAM (channel weights: the mean gradient) against LayerCAM (Jiang et al., 2021: each position
weighted by its own positive gradient, meant for finer layers), at NASNet's 1/8 cell and at its
1/4 stem cell, and products of a 1/8 map and a 1/4 map (hot where both layers agree) — all from
the workers' ONNX Grad-CAM graph (``model.inference.backprop``), flip-averaged as the workers do.
Also: Grad-CAM at NASNet's earlier 1/8 cells and its last 1/16 cell, alone and times the shipped
map, and the shipped map blurred by a Gaussian (1/32, 1/16 and 1/8 of the image's side). And the
gradient with respect to the image itself (Simonyan et al., 2014: its magnitude per pixel; and
gradient × input), blurred, alone and times the shipped map — the plain gradient is the map that
passes Adebayo et al.'s randomisation test best. And other weightings of the same cells' activations
and gradients — HiResCAM (each position times its own gradient, negative gradients kept), Grad-CAM++
and XGrad-CAM — alone and times the shipped map; and maps averaged over the image moved by 1/16 or
1/8 of its side in four directions (each map moved back). One run of a cell's graph per image serves
every map drawn from that cell. And occlusion (Zeiler and Fergus, 2014: squares of the image painted
in its skin colour, each pixel's heat the fall of the malignancy logit when it is covered), alone
and times the served map — forward passes only, a map that any runtime could draw. And a control for
the products: Grad-CAM times a position-level factor (LayerCAM, HiResCAM) taken from the network with
random weights — what the factor adds from the image alone, not from what the network learned.
The images are conformed as the workers conform them (a circular field's surround filled).
Measured as ``dermascan heatmap-check`` measures (pointing game and concentration on automatic
lesion masks, as they are and shifted sideways) on the bundle's held-out malignant lesions: the
first ``--n`` of them (the set the shipped method was chosen on) and the rest (a confirmation set
no choice here looked at); then the sanity check of Adebayo et al. (2018): the same maps from the
same graph with every convolution and dense weight redrawn at random (He normal), whose median
rank correlation with the trained maps must be low.

    python -m bench.heatmap_methods --n 120

"shipped" in a method's name is the map served until 2026-12-07 (Grad-CAM alone at the 1/8 cell); the
map served since is "shipped × HiResCAM, 1/8, smoothed (σ = 1/16 of the side)" — one cell of the 1/8
feature maps at 128 px (``model.inference.gradcam.lesion_map``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from bench import support

STEM = "reduction_concat_stem_1"  # NASNet's last cell at 1/4 of the input's side
OTHER_CELLS = {  # Grad-CAM at other cells than the shipped one (NASNet's last cell at 1/8)
    "Grad-CAM, normal cell 1 (1/8)": "normal_concat_1",
    "Grad-CAM, normal cell 2 (1/8)": "normal_concat_2",
    "Grad-CAM, normal cell 8 (1/16)": "normal_concat_8",
}


def layer_cam(features: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """LayerCAM: each position weighted by its own positive gradient."""
    return np.maximum((features * np.maximum(grads, 0)).sum(-1), 0)


def grad_cam_plus_plus(features: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Grad-CAM++ (Chattopadhay et al., 2018), the closed form for an exponential score: each
    channel's weight is its positive gradients, each weighted by alpha = g² / (2g² + ΣA·g³)."""
    g2, g3 = grads**2, grads**3
    total = features.sum(axis=(1, 2), keepdims=True)
    denominator = 2 * g2 + total * g3
    alpha = np.where(np.abs(denominator) > 1e-12, g2 / np.where(denominator == 0, 1, denominator), 0.0)
    weights = (alpha * np.maximum(grads, 0)).sum(axis=(1, 2), keepdims=True)
    return np.maximum((features * weights).sum(-1), 0)


def xgrad_cam(features: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """XGrad-CAM (Fu et al., 2020): each channel's weight is its gradient averaged with the
    channel's own activations as weights."""
    weights = (features * grads).sum(axis=(1, 2), keepdims=True) / (features.sum(axis=(1, 2), keepdims=True) + 1e-7)
    return np.maximum((features * weights).sum(-1), 0)


_RUNS: dict = {}  # (session, image) → the graph's outputs: every map of one place shares one run


def _drawn(session, draw):
    """A map from one of the Grad-CAM graph's sessions: ``draw(height, width, [(feature maps,
    gradients)])`` of the four flips, as the workers draw theirs."""
    from model.inference.gradcam import _views

    def make(pixels, meta):
        views = _views(pixels)
        key = (id(session), views.tobytes(), np.asarray(meta).tobytes())
        if key not in _RUNS:
            out = session.run(
                ["cell_0", "cell_grad_0"], {"image": views, "meta": np.repeat(meta[:1], 4, 0).astype(np.float32)}
            )
            _RUNS[key] = [(out[0].transpose(0, 2, 3, 1), out[1].transpose(0, 2, 3, 1))]
        return draw(*views.shape[1:3], _RUNS[key])

    return make


def _maker(session, cam):
    """The workers' flip-averaged map from one of the Grad-CAM graph's sessions, with ``cam``."""
    from model.inference.gradcam import flip_averaged

    return _drawn(session, lambda height, width, maps: flip_averaged(height, width, maps, cam))


def flips_multiplied(height: int, width: int, maps) -> np.ndarray:
    """The served map with the four flips' maps combined by their geometric mean instead of their
    mean: hot only where every view agrees."""
    from model.inference.gradcam import flip_averaged, gaussian_blur, grad_cam, hires_cam, unflip

    features, grads = maps[0]
    logs = np.zeros((height, width))
    for v in range(len(features)):
        one = [(features[v : v + 1], grads[v : v + 1])]
        view = flip_averaged(height, width, one, grad_cam) * flip_averaged(height, width, one, hires_cam)
        logs += np.log(unflip(view, v) + 1e-3)
    both = np.exp(logs / len(features))
    both = gaussian_blur(both, (height / features.shape[1], width / features.shape[2]))
    return (both / both.max()).astype(np.float32)


def input_gradient(features: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """The gradient's magnitude at each pixel (summed over the colour channels)."""
    return np.abs(grads).sum(-1)


def gradient_times_input(features: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """|gradient × input| at each pixel (the input as the network sees it, in [-1, 1])."""
    return np.abs((features * grads).sum(-1))


class _Lazy:
    """An ONNX Runtime session built on its first ``run``."""

    def __init__(self, build):
        self._build, self._session = build, None

    def run(self, *args):
        if self._session is None:
            self._session = self._build()
        return self._session.run(*args)


def _product(a, b):
    def make(pixels, meta):
        both = a(pixels, meta) * b(pixels, meta)
        return both / both.max() if both.max() > 0 else both

    return make


def _smoothed(make, share: float):
    """``make``'s map blurred by a Gaussian of ``share`` of the image's side: a peak on one cell at
    the lesion's rim gives way to where the heat is densest."""
    from scipy import ndimage

    def smoothed(pixels, meta):
        heat = ndimage.gaussian_filter(make(pixels, meta).astype(np.float64), share * pixels.shape[1], mode="nearest")
        return (heat / heat.max()).astype(np.float32) if heat.max() > 0 else heat.astype(np.float32)

    return smoothed


def _moved(array: np.ndarray, dy: int, dx: int, mode: str) -> np.ndarray:
    """``array`` (h, w, ...) with its content moved by (dy, dx) pixels, the edges it leaves filled."""
    h, w = array.shape[:2]
    pad = [(max(dy, 0), max(-dy, 0)), (max(dx, 0), max(-dx, 0))] + [(0, 0)] * (array.ndim - 2)
    padded = np.pad(array, pad, mode=mode)
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[top : top + h, left : left + w]


def _shift_averaged(make, share: float):
    """``make``'s map of the image moved by ``share`` of its side up, down, left and right (and not
    at all), each moved back and averaged: what a map owes to where the lesion sits is averaged out."""

    def averaged(pixels, meta):
        h, w = pixels.shape[1:3]
        total = np.zeros((h, w), np.float64)
        for dy, dx in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)):
            dy, dx = round(dy * share * h), round(dx * share * w)
            moved = _moved(pixels[0], dy, dx, "reflect")[None]
            total += _moved(make(moved, meta), -dy, -dx, "edge")
        return (total / total.max()).astype(np.float32) if total.max() > 0 else total.astype(np.float32)

    return averaged


def _skin(image: np.ndarray) -> np.ndarray:
    """The image's skin colour: the median of its brighter half (a lesion is darker than the skin)."""
    flat = image.reshape(-1, 3).astype(np.float32)
    luminance = flat.mean(-1)
    return np.median(flat[luminance >= np.median(luminance)], axis=0)


def _occlusion(session, patch: int, stride: int):
    """Occlusion sensitivity (Zeiler and Fergus, 2014): a square of ``patch`` pixels, moved by
    ``stride``, painted in the image's skin colour; each pixel's heat is the mean fall of the
    malignancy logit over the squares that covered it (rises count as none). Forward passes only."""

    from model.inference.calibration import _logit

    def logit(probabilities):
        return _logit(np.asarray(probabilities).reshape(-1))

    def make(pixels, meta):
        image = pixels[0]
        h, w = image.shape[:2]
        colour = _skin(image).astype(np.uint8)
        corners = [(y, x) for y in range(0, h - patch + 1, stride) for x in range(0, w - patch + 1, stride)]
        views = np.repeat(image[None], len(corners), 0)
        for k, (y, x) in enumerate(corners):
            views[k, y : y + patch, x : x + patch] = colour
        base = logit(session.run(["probability"], {"image": pixels, "meta": meta.astype(np.float32)})[0])[0]
        falls = []
        for start in range(0, len(views), 64):
            chunk = views[start : start + 64]
            m = np.repeat(meta[:1], len(chunk), 0).astype(np.float32)
            falls.append(base - logit(session.run(["probability"], {"image": chunk, "meta": m})[0]))
        falls = np.maximum(np.concatenate(falls), 0)
        heat, cover = np.zeros((h, w)), np.zeros((h, w))
        for fall, (y, x) in zip(falls, corners, strict=True):
            heat[y : y + patch, x : x + patch] += fall
            cover[y : y + patch, x : x + patch] += 1
        heat = heat / np.maximum(cover, 1)
        return (heat / heat.max()).astype(np.float32) if heat.max() > 0 else heat.astype(np.float32)

    return make


def _randomised(model, seed: int = 0):
    import onnx
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    out = onnx.ModelProto.FromString(model.SerializeToString())
    for init in out.graph.initializer:
        a = numpy_helper.to_array(init)
        if a.dtype == np.float32 and a.ndim in (2, 4) and a.size > 16:
            fan_in = int(np.prod(a.shape[1:])) if a.ndim == 4 else a.shape[0]
            init.CopyFrom(
                numpy_helper.from_array((rng.normal(size=a.shape) * np.sqrt(2 / fan_in)).astype(np.float32), init.name)
            )
    return out


def main() -> None:
    import onnx

    from model.inference.backprop import gradcam_graph
    from model.inference.data import IsicDataset
    from model.inference.gradcam import grad_cam, hires_cam, lesion_map
    from model.inference.predictor import Predictor
    from model.inference.runtimes import ort_session
    from model.training.config import read_config, split_rows
    from model.training.heatmaps import measure, rank_correlation

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=support.ROOT / "model" / "bundles" / "default")
    parser.add_argument("--data", type=Path, default=support.HAM)
    parser.add_argument("--n", type=int, default=120, help="the selection set: the first N held-out malignant lesions")
    parser.add_argument("--randomised", type=int, default=24, help="lesions for the randomised-weights check")
    parser.add_argument("--methods", help="only these maps, separated by ';' (default: every one)")
    args = parser.parse_args()

    predictor = Predictor(args.bundle, batch_sizes=(1,), onnx_package=args.bundle / "onnx")
    cfg = read_config(predictor.bundle.directory)
    dataset = IsicDataset.open(args.data, limit=cfg.limit)
    y = dataset.targets()
    rows = np.flatnonzero((split_rows(y, dataset.groups(), cfg) < 0) & (y == 1))
    sets = {"selection": rows[: args.n], "confirmation": rows[args.n :]}
    loaded = {
        name: (predictor.conform(dataset.load_images(predictor.image_size, ids=[dataset.ids[i] for i in chosen])),
               predictor.spec.transform(dataset.metadata.iloc[chosen]))
        for name, chosen in sets.items() if len(chosen)
    }  # fmt: skip
    forward = onnx.load(str(predictor.onnx_file))

    def output_of(cell):
        return next(n.output[0] for n in forward.graph.node if n.op_type == "Concat" and f"/{cell}_" in n.name)

    # the image as the network sees it (scaled to [-1, 1]), channels first: the stem's input
    pixels_in = next(n.output[0] for n in forward.graph.node if n.op_type == "Transpose")
    places = [("1/8 cell", None), ("1/4 stem cell", [output_of(STEM)]), ("image", [pixels_in])] + [
        (name, [output_of(cell)]) for name, cell in OTHER_CELLS.items()
    ]

    def sessions(model):
        """A session per place, each built when a chosen method first runs it (the backward graph
        to the image is the costliest to build)."""
        return {
            where: _Lazy(lambda cells=cells: ort_session(gradcam_graph(model, cells=cells).SerializeToString()))
            for where, cells in places
        }  # fmt: skip

    trained, random = sessions(forward), sessions(_randomised(forward))
    methods = {
        "Grad-CAM, 1/8 cell (shipped)": (_maker(trained["1/8 cell"], grad_cam), _maker(random["1/8 cell"], grad_cam)),
        "LayerCAM, 1/8 cell": (_maker(trained["1/8 cell"], layer_cam), _maker(random["1/8 cell"], layer_cam)),
        "LayerCAM, 1/4 stem cell": (
            _maker(trained["1/4 stem cell"], layer_cam),
            _maker(random["1/4 stem cell"], layer_cam),
        ),
    }
    methods["Grad-CAM, 1/4 stem cell"] = (
        _maker(trained["1/4 stem cell"], grad_cam),
        _maker(random["1/4 stem cell"], grad_cam),
    )
    for first, second in (
        ("LayerCAM, 1/8 cell", "LayerCAM, 1/4 stem cell"),
        ("Grad-CAM, 1/8 cell (shipped)", "Grad-CAM, 1/4 stem cell"),
        ("Grad-CAM, 1/8 cell (shipped)", "LayerCAM, 1/4 stem cell"),
    ):
        name = f"{first.split(',')[0]} 1/8 × {second.split(',')[0]} 1/4"
        methods[name] = (
            _product(methods[first][0], methods[second][0]),
            _product(methods[first][1], methods[second][1]),
        )
    shipped = methods["Grad-CAM, 1/8 cell (shipped)"]
    methods["served: Grad-CAM × HiResCAM, 1/8, blurred by one cell"] = (
        _drawn(trained["1/8 cell"], lesion_map),
        _drawn(random["1/8 cell"], lesion_map),
    )
    methods["served, the flips' geometric mean"] = (
        _drawn(trained["1/8 cell"], flips_multiplied),
        _drawn(random["1/8 cell"], flips_multiplied),
    )
    for label, cam in (("HiResCAM", hires_cam), ("Grad-CAM++", grad_cam_plus_plus), ("XGrad-CAM", xgrad_cam)):
        for where, cell in (("1/8 cell", "1/8 cell"), ("normal cell 8 (1/16)", "Grad-CAM, normal cell 8 (1/16)")):
            methods[f"{label}, {where}"] = (_maker(trained[cell], cam), _maker(random[cell], cam))
        methods[f"shipped × {label}, 1/8"] = (
            _product(shipped[0], methods[f"{label}, 1/8 cell"][0]),
            _product(shipped[1], methods[f"{label}, 1/8 cell"][1]),
        )
        methods[f"shipped × {label}, 1/16"] = (
            _product(shipped[0], methods[f"{label}, normal cell 8 (1/16)"][0]),
            _product(shipped[1], methods[f"{label}, normal cell 8 (1/16)"][1]),
        )
    methods["shipped × LayerCAM, 1/8"] = (
        _product(shipped[0], methods["LayerCAM, 1/8 cell"][0]),
        _product(shipped[1], methods["LayerCAM, 1/8 cell"][1]),
    )
    for denominator in (16, 12):
        methods[f"shipped × LayerCAM, 1/8, smoothed (σ = 1/{denominator} of the side)"] = (
            _smoothed(methods["shipped × LayerCAM, 1/8"][0], 1 / denominator),
            _smoothed(methods["shipped × LayerCAM, 1/8"][1], 1 / denominator),
        )
    # the position-level factor taken from the network with random weights: what the product owes to
    # the image alone (a dark, edged region) rather than to what the network learned
    for label, cam in (("LayerCAM", layer_cam), ("HiResCAM", hires_cam)):
        methods[f"shipped × {label} of the randomised network, 1/8, smoothed (σ = 1/16 of the side)"] = tuple(
            _smoothed(_product(grad_cam_map, _maker(random["1/8 cell"], cam)), 1 / 16) for grad_cam_map in shipped
        )
    for name in OTHER_CELLS:
        methods[name] = (_maker(trained[name], grad_cam), _maker(random[name], grad_cam))
        methods[f"shipped × {name}"] = (_product(shipped[0], methods[name][0]), _product(shipped[1], methods[name][1]))
    for denominator in (16, 8):
        for name in ("Grad-CAM, 1/8 cell (shipped)", "shipped × HiResCAM, 1/8"):
            methods[f"{name}, moved by 1/{denominator} and averaged"] = (
                _shift_averaged(methods[name][0], 1 / denominator),
                _shift_averaged(methods[name][1], 1 / denominator),
            )
    for denominator in (32, 16, 12, 8, 6):
        methods[f"shipped × HiResCAM, 1/8, smoothed (σ = 1/{denominator} of the side)"] = (
            _smoothed(methods["shipped × HiResCAM, 1/8"][0], 1 / denominator),
            _smoothed(methods["shipped × HiResCAM, 1/8"][1], 1 / denominator),
        )
    for denominator in (32, 16, 8):
        methods[f"Grad-CAM, 1/8 cell, smoothed (σ = 1/{denominator} of the side)"] = (
            _smoothed(shipped[0], 1 / denominator),
            _smoothed(shipped[1], 1 / denominator),
        )
    for label, cam in (("input gradient", input_gradient), ("gradient × input", gradient_times_input)):
        plain = (_maker(trained["image"], cam), _maker(random["image"], cam))
        for denominator in (32, 16):
            blurred = (_smoothed(plain[0], 1 / denominator), _smoothed(plain[1], 1 / denominator))
            methods[f"{label}, smoothed (σ = 1/{denominator} of the side)"] = blurred
            methods[f"shipped × {label}, smoothed (σ = 1/{denominator})"] = (
                _product(shipped[0], blurred[0]),
                _product(shipped[1], blurred[1]),
            )
    forward_sessions = (_Lazy(lambda: ort_session(str(predictor.onnx_file))),
                        _Lazy(lambda: ort_session(_randomised(forward).SerializeToString())))  # fmt: skip
    for patch, stride in ((32, 8), (24, 8), (48, 16)):
        occluded = tuple(_occlusion(s, patch, stride) for s in forward_sessions)
        methods[f"occlusion, {patch} px squares every {stride} px"] = occluded
        methods[f"served × occlusion, {patch} px squares every {stride} px"] = (
            _product(methods["served: Grad-CAM × HiResCAM, 1/8, blurred by one cell"][0], occluded[0]),
            _product(methods["served: Grad-CAM × HiResCAM, 1/8, blurred by one cell"][1], occluded[1]),
        )
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(";")]
        unknown = [m for m in wanted if m not in methods]
        if unknown:
            parser.error(f"unknown method(s) {unknown}: one of {list(methods)}")
        methods = {m: methods[m] for m in wanted}
    print(f"heat-map methods — {support.machine()}")
    print(f"bundle {predictor.version}; held-out malignant lesions: selection {len(sets['selection'])}, "
          f"confirmation {len(sets['confirmation'])}; randomised-weights check on {args.randomised}")  # fmt: skip
    rows_out = []
    images, metas = loaded["selection"]
    for name, (make, make_random) in methods.items():
        cells = [name]
        for part in ("selection", "confirmation"):
            if part not in loaded:
                cells += ["", ""]
                continue
            r = measure(make, *loaded[part])
            cells += [f"{r['as_is']['map']['pointing']:.1%} / {r['as_is']['map']['concentration']:.2f}×",
                      f"{r['shifted']['map']['pointing']:.1%} / {r['shifted']['map']['concentration']:.2f}×"]  # fmt: skip
        k = min(args.randomised, len(images))
        correlation = np.median([rank_correlation(make(images[i : i + 1], metas[i : i + 1]),
                                                  make_random(images[i : i + 1], metas[i : i + 1])) for i in range(k)])  # fmt: skip
        rows_out.append((*cells, f"{correlation:.2f}"))
        print(" | ".join(rows_out[-1]), file=sys.stderr, flush=True)  # each map's row as soon as it is measured
    header = ("map", "selection: as is (pointing / concentration)", "selection: shifted",
              "confirmation: as is", "confirmation: shifted", "randomised weights: rank correlation")  # fmt: skip
    print(support.table(rows_out, header))


if __name__ == "__main__":
    main()
