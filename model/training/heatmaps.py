"""Do the heat maps point at the lesion? Measured on held-out malignant lesions whose lesion
masks are found automatically (Otsu's threshold on the blurred image, the dark component nearest
the centre), against a map that always marks the middle of the image (a Gaussian) — and again
with every image shifted sideways, where such a map must fail:

- the pointing game: the share of maps whose hottest pixel lies on the lesion;
- concentration: the lesion's share of the heat over its share of the image (1: no better than
  chance; the median over lesions);
- the sanity check (Adebayo et al., 2018): the same maps from the network with its weights
  randomised must differ (their rank correlation with the trained network's maps, median), in
  several random draws (one draw's figure moves a lot);
- a control for the map's position-level factor: the same pointing game with that factor taken
  from the randomised network — a map that does no better owes its pointing to the image (the lesion
  is the darkest, most edged region), not to what the network learned.
"""

from __future__ import annotations

import numpy as np


def otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=256)
    p = hist / max(hist.sum(), 1)
    w = np.cumsum(p)
    mu = np.cumsum(p * (edges[:-1] + edges[1:]) / 2)
    between = (mu[-1] * w - mu) ** 2 / np.maximum(w * (1 - w), 1e-12)
    return float(edges[int(np.nanargmax(between))])


def lesion_mask(image: np.ndarray) -> np.ndarray:
    """The lesion of a dermoscopic image, found automatically: the dark component (Otsu on the
    blurred luminance) nearest the image's centre (of at least 1 % of the image)."""
    from scipy import ndimage

    grey = ndimage.gaussian_filter(image.astype(np.float64).mean(axis=-1), 2)
    dark = grey < otsu(grey)
    labels, n = ndimage.label(dark)
    h, w = grey.shape
    best, nearest = 0, np.inf
    for k in range(1, n + 1):
        ys, xs = np.nonzero(labels == k)
        if len(ys) < 0.01 * h * w:
            continue
        d = np.min((ys - (h - 1) / 2) ** 2 + (xs - (w - 1) / 2) ** 2)
        if d < nearest:
            best, nearest = k, d
    return labels == best if best else dark


def centre_map(shape: tuple[int, int]) -> np.ndarray:
    """The baseline that always marks the middle: a Gaussian of a quarter of each side."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    return np.exp(-(((yy - (h - 1) / 2) / (h / 4)) ** 2 + ((xx - (w - 1) / 2) / (w / 4)) ** 2) / 2)


def shifted(image: np.ndarray, share: float = 0.25) -> np.ndarray:
    """The image's content moved sideways by ``share`` of its width (the edge it leaves filled by
    reflection), so the lesion is no longer in the middle. Works for masks too."""
    step = round(share * image.shape[1])
    pad = [(0, 0), (step, 0)] + [(0, 0)] * (image.ndim - 2)
    return np.pad(image, pad, mode="reflect" if image.dtype != bool else "edge")[:, : image.shape[1]]


def scores(maps, masks) -> dict:
    """The pointing game and the concentration of heat on the lesions."""
    hits, ratios = [], []
    for heat, mask in zip(maps, masks, strict=True):
        heat = np.asarray(heat, np.float64)
        if not mask.any() or heat.sum() <= 0:
            hits.append(False)
            ratios.append(0.0)
            continue
        top = np.unravel_index(int(np.argmax(heat)), heat.shape)
        hits.append(bool(mask[top]))
        ratios.append(float(heat[mask].sum() / heat.sum() / mask.mean()))
    return {"n": len(hits), "pointing": float(np.mean(hits)), "concentration": float(np.median(ratios))}


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps; 0 when either is constant (a flat map ranks nothing,
    so it shares no ranking with the other: a randomised network's Grad-CAM is often all zero)."""
    from scipy.stats import spearmanr

    a, b = np.ravel(a), np.ravel(b)
    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)


def measure(make_map, images: np.ndarray, metas: np.ndarray, shift: float = 0.25) -> dict:
    """``make_map(pixels (1,H,W,3), meta (1,d)) → (H,W)`` on the images as they are and shifted
    sideways (their lesion masks found once, on the images as they are, and shifted with them),
    against the centre baseline; the maps themselves are returned too."""
    masks = [lesion_mask(i) for i in images]
    out = {}
    for name, batch, lesions in (
        ("as_is", images, masks),
        ("shifted", np.stack([shifted(i, shift) for i in images]), [shifted(k, shift) for k in masks]),
    ):
        maps = [make_map(i[None], m[None]) for i, m in zip(batch, metas, strict=True)]
        out[name] = {
            "map": scores(maps, lesions), "centre_baseline": scores([centre_map(i.shape[:2]) for i in batch], lesions),
            "lesion_share": float(np.mean([k.mean() for k in lesions])),
        }  # fmt: skip
        out[f"{name}_maps"] = maps
    return out


def gallery_png(path, images, maps, titles, columns: int = 6) -> None:
    """A gallery of overlays (the heat over each image) with a title each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from model.inference.heatmap import blend

    rows = int(np.ceil(len(images) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.1 * columns, 2.3 * rows), dpi=100)
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, image, heat, title in zip(np.ravel(axes), images, maps, titles, strict=False):
        ax.imshow(blend(image, heat))
        ax.set_title(title, fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def check_bundle(bundle_dir, data_dir, n: int = 120, gallery=None, randomised: int = 24, draws: int = 5) -> dict:
    """The bundle's heat maps as the workers draw them (``model.inference.gradcam``: on ONNX Runtime
    where the bundle has an ONNX package) on ``n`` malignant lesions of its held-out calibration
    set: the pointing game and concentration as they are and shifted, the centre baseline, how far
    they are from the Keras network's own Grad-CAM (largest difference of a map, on [0, 1]), and the
    median rank correlation with the maps of the same network with randomised weights (on
    ``randomised`` of them), and a control: the same measures of the map with its position-level
    factor taken from that randomised network (a map that points no better than its control owes
    its pointing to the image, not to the network) — both for ``draws`` random networks (seeds 0, 1,
    …), each draw's figures and their median. ``gallery``: a PNG of the first 24 maps."""
    import keras

    from model.inference import gradcam as gradcam_lib
    from model.inference.data import IsicDataset
    from model.inference.gradcam import GradCam, OnnxGradCam, for_predictor
    from model.inference.predictor import Predictor
    from model.training.config import read_config, split_rows

    predictor = Predictor(bundle_dir, batch_sizes=(1,))
    cfg = read_config(predictor.bundle.directory)
    dataset = IsicDataset.open(data_dir, limit=cfg.limit)
    y = dataset.targets()
    split = split_rows(y, dataset.groups(), cfg)
    rows = np.flatnonzero((split < 0) & (y == 1))[:n]
    images = predictor.conform(dataset.load_images(predictor.image_size, ids=[dataset.ids[i] for i in rows]))
    metas = predictor.spec.transform(dataset.metadata.iloc[rows])
    cam = GradCam(predictor.network)
    serving = for_predictor(predictor)  # the ONNX Grad-CAM where the bundle ships its ONNX file
    out = measure(serving.heatmap, images, metas)
    out["serving_gradcam"] = type(serving).__name__
    if isinstance(serving, OnnxGradCam):
        gaps = [float(np.abs(out["as_is_maps"][i] - cam.heatmap(images[i : i + 1], metas[i : i + 1])).max())
                for i in range(len(images))]  # fmt: skip
        out["keras_difference_max"], out["keras_difference_median"] = max(gaps), float(np.median(gaps))
    # the same graph with freshly initialised weights, in several fixed draws: one draw's figures
    # move a lot (the rank correlation of the served map over five draws: 0.06 to 0.68), so the check
    # gives each draw and their median, and repeats
    k = min(randomised, len(images))
    channel_maps: dict = {}  # the trained network's flip-averaged Grad-CAM of an image, for every draw

    def control_with(random_cam):
        def control(pixels, meta):
            """The map shown with its position-level factor (HiResCAM) taken from the randomised
            network: what that factor adds from the image alone (the lesion is the darkest, most
            edged region, and random convolutions answer there too), not from what the network learned."""
            height, width = pixels.shape[1:3]
            key = pixels.tobytes()
            if key not in channel_maps:
                trained = cam.flip_maps(pixels, meta)
                channel_maps[key] = gradcam_lib.flip_averaged(height, width, trained, gradcam_lib.grad_cam)
            random_maps = random_cam.flip_maps(pixels, meta)
            position = gradcam_lib.flip_averaged(height, width, random_maps, gradcam_lib.hires_cam)
            return gradcam_lib.blurred_product(channel_maps[key], position, random_maps[0][0].shape[1:3])

        return control

    out["randomised_draws"] = []
    for seed in range(draws):
        keras.utils.set_random_seed(seed)
        random_cam = GradCam(keras.models.clone_model(predictor.network))
        correlation = float(np.median([
            rank_correlation(out["as_is_maps"][i], random_cam.heatmap(images[i : i + 1], metas[i : i + 1]))
            for i in range(k)
        ]))  # fmt: skip
        checked = measure(control_with(random_cam), images, metas)
        out["randomised_draws"].append({
            "seed": seed, "rank_correlation": correlation,
            "position_control": {name: checked[name]["map"] for name in ("as_is", "shifted")},
        })  # fmt: skip
    found = out["randomised_draws"]
    out["randomised_weights_rank_correlation"] = float(np.median([d["rank_correlation"] for d in found]))
    out["random_position_control"] = {
        name: {"pointing": float(np.median([d["position_control"][name]["pointing"] for d in found])),
               "concentration": float(np.median([d["position_control"][name]["concentration"] for d in found])),
               "n": found[0]["position_control"][name]["n"]}
        for name in ("as_is", "shifted")
    }  # fmt: skip
    if gallery is not None:
        titles = [f"{dataset.ids[r]} ({dataset.metadata['diagnosis'].iloc[r]})" if "diagnosis" in dataset.metadata else dataset.ids[r]
                  for r in rows[:24]]  # fmt: skip
        gallery_png(gallery, images[:24], out["as_is_maps"][:24], titles)
    return {k: v for k, v in out.items() if not k.endswith("_maps")}
