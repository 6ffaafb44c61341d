"""model/: feature spec, metrics, data reading, network, bundle, predictor, Grad-CAM, training."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest

from model import metrics
from model.errors import ImageDecodeError, ModelError
from model.inference.bundle import BundleError, load, read_manifest
from model.inference.data import IsicDataset, decode_image
from model.inference.features import FeatureSpec
from model.inference.predictor import Predictor, plan_batches
from tests.services import ROOT

DEFAULT = ROOT / "model" / "bundles" / "default"

# -- feature spec ---------------------------------------------------------------------------------


def test_feature_spec_fits_roundtrips_and_encodes_unknowns():
    frame = pd.DataFrame(
        {
            "age_approx": [30, 50, np.nan, 70, 45, 60],
            "sex": ["male", "female", "female", None, "male", "female"],
            "anatom_site_general": ["torso", "head/neck", "torso", "torso", "lower extremity", "torso"],
            "clin_size_long_diam_mm": [3.0, 4.5, 2.0, np.nan, 6.0, 3.3],
            "tbp_tile_type": ["3D: XP"] * 6,
        }
    )
    spec = FeatureSpec.fit(frame, min_count=1)
    # columns the data lacks (most tbp_* ones) are left out; the ones it has are in
    assert [f.name for f in spec.numeric] == ["age_approx", "clin_size_long_diam_mm"]
    assert [f.name for f in spec.categorical] == ["sex", "anatom_site_general", "tbp_tile_type"]
    again = FeatureSpec.from_json(spec.to_json())
    assert again == spec
    records = [
        {"age_approx": 50, "sex": "female", "anatom_site_general": "torso"},
        {},  # everything missing
        {
            "age_approx": "not a number",
            "sex": "other",
            "anatom_site_general": "elbow",
            "clin_size_long_diam_mm": math.inf,
        },
        {"age_approx": "55", "sex": " F ", "anatom_site_general": "TORSO"},
    ]
    x = spec.transform(records)
    assert x.shape == (4, spec.dim) and x.dtype == np.float32 and np.isfinite(x).all()
    names = spec.output_names()
    col = {n: i for i, n in enumerate(names)}
    assert x[1, col["age_approx__missing"]] == 1 and x[1, col["sex=<unknown>"]] == 1
    assert x[2, col["age_approx__missing"]] == 1 and x[2, col["anatom_site_general=<unknown>"]] == 1
    assert x[2, col["clin_size_long_diam_mm__missing"]] == 1
    assert x[3, col["sex=female"]] == 1 and x[3, col["anatom_site_general=torso"]] == 1
    assert x[0, col["age_approx__[45,60)"]] == 1
    np.testing.assert_array_equal(spec.transform(records), again.transform(records))


def test_feature_spec_on_ham10000_columns(ham_dir):
    spec = FeatureSpec.fit(IsicDataset.open(ham_dir).metadata)
    assert spec.columns == ["age_approx", "sex", "anatom_site_general"]
    assert {"torso", "posterior torso", "head/neck"} <= set(spec.categorical[1].vocabulary)


# -- metrics ---------------------------------------------------------------------------------------


def test_pauc80_matches_hand_computed_cases():
    y = np.array([1, 1, 0, 0])
    # perfect ranking: the whole region above TPR 0.8 → 0.2
    assert metrics.pauc_above_tpr(y, [0.9, 0.8, 0.2, 0.1]) == pytest.approx(0.2)
    # fully inverted ranking → 0
    assert metrics.pauc_above_tpr(y, [0.1, 0.2, 0.8, 0.9]) == pytest.approx(0.0)
    # ROC (0,0)→(0,.5)→(.5,.5)→(.5,1)→(1,1): above TPR 0.8 only for FPR ≥ 0.5, area (1−0.8)·(1−0.5)
    assert metrics.pauc_above_tpr(y, [0.9, 0.3, 0.5, 0.1]) == pytest.approx(0.1)
    # 5 positives, 5 negatives, one positive ranked below two negatives:
    # TPR reaches 0.8 at FPR 0 and 1.0 at FPR 0.4 → 0.2 − 0.4·0.2 = 0.12
    y10 = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0])
    s10 = np.array([0.95, 0.9, 0.85, 0.8, 0.4, 0.6, 0.5, 0.3, 0.2, 0.1])
    assert metrics.pauc_above_tpr(y10, s10) == pytest.approx(0.12)
    assert metrics.auc(y10, s10) == pytest.approx(23 / 25)


def test_threshold_for_sensitivity_and_operating_point():
    y = np.array([1] * 20 + [0] * 80)
    scores = np.concatenate([np.linspace(0.3, 0.99, 20), np.linspace(0.0, 0.6, 80)])
    t = metrics.threshold_for_sensitivity(y, scores, 0.95)
    op = metrics.at_threshold(y, scores, t)
    assert op.sensitivity >= 0.95 and op.tp + op.fn == 20
    assert metrics.at_threshold(y, scores, t + 1e-9).sensitivity < 0.95  # the highest such threshold
    lo, hi = metrics.bootstrap_ci(metrics.auc, y, scores, n_boot=200)
    assert lo <= metrics.auc(y, scores) <= hi


# -- data ------------------------------------------------------------------------------------------


def test_corrupt_jpeg_names_its_id(tmp_path, ham_dir):
    with pytest.raises(ImageDecodeError) as raised:
        decode_image(b"\xff\xd8\xff\xe0 broken", 64, key="ISIC_9999999")
    assert "ISIC_9999999" in str(raised.value)
    # an ISIC-layout folder with one damaged image: the error names the isic_id
    import h5py

    meta = pd.read_csv(ham_dir / "metadata.csv").iloc[:5]
    meta.to_csv(tmp_path / "metadata.csv", index=False)
    with h5py.File(ham_dir / "images.hdf5") as src, h5py.File(tmp_path / "images.hdf5", "w") as dst:
        for i, isic_id in enumerate(meta.isic_id):
            data = src[isic_id][()].tobytes()
            dst[isic_id] = np.void(data[: len(data) // 3] if i == 2 else data)
    dataset = IsicDataset.open(tmp_path)
    with pytest.raises(ImageDecodeError) as raised:
        dataset.load_images(64)
    assert meta.isic_id.iloc[2] in str(raised.value)


def test_an_input_size_is_one_side_or_width_by_height(ham_dir):
    """``--image-size 160`` is square; ``192x144`` is WIDTHxHEIGHT as people write image sizes and
    is kept as [height, width], the order of the pixel arrays; a bad size is a one-line error."""
    from click.testing import CliRunner

    from dermascan.cli import main
    from model.inference.data import canonical_size, image_shape, parse_size, size_label
    from model.training.config import TrainConfig

    assert parse_size("160") == 160 and parse_size("192x144") == [144, 192] == parse_size("192×144")
    assert parse_size("144x144") == 144 and image_shape(160) == (160, 160) and image_shape([144, 192]) == (144, 192)
    assert size_label([144, 192]) == "192x144px" and size_label(128) == "128px"
    assert TrainConfig(image_size=(144, 192)).image_size == [144, 192] == canonical_size((144, 192))
    for bad in ("big", "192x144x3", "16", "2000x100", "-5"):
        with pytest.raises(ModelError):
            parse_size(bad)
    arrays = IsicDataset.open(ham_dir, limit=3).load_images([24, 40])
    assert arrays.shape == (3, 24, 40, 3)
    result = CliRunner().invoke(main, ["train", "--data", str(ham_dir), "--out", "x", "--image-size", "192by144"])
    assert result.exit_code == 2 and "WIDTHxHEIGHT" in result.output


def test_plan_batches_uses_only_fixed_shapes():
    for n in range(1, 300):
        plan = plan_batches(n, (1, 8, 32, 64))
        assert plan[0][0] == 0 and plan[-1][1] == n
        assert all(size in (1, 8, 32, 64) and 0 < stop - start <= size for start, stop, size in plan)
        assert all(a[1] == b[0] for a, b in zip(plan, plan[1:]))


# -- network, training, bundle, predictor ---------------------------------------------------------


@pytest.fixture(scope="module")
def trained_bundle(tmp_path_factory, ham_dir):
    """`dermascan train` with the tiny backbone: 2 folds × 1 epoch on 96 real images."""
    from click.testing import CliRunner

    from dermascan.cli import main

    out = tmp_path_factory.mktemp("train") / "bundle"
    result = CliRunner().invoke(
        main,
        ["train", "--data", str(ham_dir), "--out", str(out), "--folds", "2", "--epochs", "1", "--limit", "96",
         "--backbone", "tiny", "--image-size", "32", "--version", "tiny-cv"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "out-of-fold AUC" in result.output
    return out


def test_training_writes_a_complete_bundle(trained_bundle):
    manifest = read_manifest(trained_bundle)
    assert manifest["version"] == "tiny-cv"
    assert manifest["image_size"] == 32
    assert manifest["inputs"]["image"]["dtype"] == "uint8"
    assert len(manifest["metrics"]["folds"]) == 2
    work = trained_bundle.with_name("bundle.work")
    split = np.load(work / "split.npy")
    held = int((split < 0).sum())  # the calibration set: no fold model trained on it
    assert 0 < held < 96 and manifest["metrics"]["oof"]["n"] == 96 - held
    cal = manifest["metrics"]["calibration_set"]
    # the one rule: the score that refers the aimed share of the ruler's malignant lesions (here the
    # ensemble's calibration set), checked part by part
    rule = cal["rule"]
    assert cal["n"] == held and rule["target"] == 0.95 and cal["operating_point"]["sensitivity"] >= 0.95
    assert (
        rule["check"]["parts"]
        and "refers 0.950 of the ruler's malignant lesions" in manifest["metrics"]["threshold_rule"]
    )
    assert manifest["calibration"]["method"] in ("none", "temperature", "platt", "isotonic")
    assert manifest["calibration"]["prevalence"] == pytest.approx(cal["positives"] / held)
    assert manifest["gate"]["quality"]["min_brightness"] > 0 and manifest["gate"]["ood"]["threshold"] > 0
    assert (trained_bundle / "gate.npz").is_file() and (trained_bundle / "reliability.png").stat().st_size > 1000
    assert manifest["metrics"]["data"]["metadata"]["sha256"]
    assert sorted(manifest["training"]["members"]) == ["fold0", "fold1"]
    assert manifest["weights_dtype"] == "float16"  # stored in half precision, computed in float32
    assert 0 < manifest["threshold"] < 1
    op = manifest["metrics"]["oof"]["operating_point"]
    assert 0 <= op["sensitivity"] <= 1
    assert (trained_bundle / "roc.png").stat().st_size > 1000
    oof = pd.read_csv(work / "oof.csv")
    assert oof[oof.fold >= 0].oof.notna().all() and oof[oof.fold < 0].oof.isna().all()
    assert set(oof.fold) == {-1, 0, 1}
    # folds are patient-grouped: no lesion on both sides
    groups = pd.read_csv(trained_bundle.parents[0] / "bundle.work" / "oof.csv").merge(
        IsicDataset.open(read_manifest(trained_bundle)["metrics"]["data"]["directory"], limit=96).metadata[
            ["isic_id", "patient_id"]
        ]
    )
    assert groups.groupby("patient_id").fold.nunique().max() == 1


def test_bundle_roundtrip_gives_identical_predictions(tmp_path, ham_dir):
    import keras

    from model.inference import bundle
    from model.inference.network import NO_AUGMENTATION, build

    keras.utils.set_random_seed(1)
    dataset = IsicDataset.open(ham_dir, limit=24)
    spec = FeatureSpec.fit(dataset.metadata, min_count=1)
    net = build(spec.dim, 32, backbone="tiny", augmentation=NO_AUGMENTATION)
    net.compile(optimizer="adam", loss="binary_crossentropy")
    x = {"image": dataset.load_images(32), "meta": spec.transform(dataset.metadata)}
    net.fit(x, dataset.targets().astype("float32"), epochs=1, verbose=0)
    before = net.predict(x, verbose=0)
    bundle.save(net, spec, tmp_path / "b", version="rt", threshold=0.5)
    after = load(tmp_path / "b").network.predict(x, verbose=0)
    np.testing.assert_allclose(before, after, rtol=0, atol=1e-6)


def test_tampered_or_mismatched_bundle_is_refused(trained_bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(trained_bundle, copy)
    load(copy)  # intact: loads
    with open(copy / "model.keras", "r+b") as fh:
        fh.seek(2000)
        byte = fh.read(1)
        fh.seek(2000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match="checksum mismatch"):
        load(copy)
    shutil.copytree(trained_bundle, tmp_path / "other")
    manifest = json.loads((tmp_path / "other" / "manifest.json").read_text())
    manifest["image_size"] = 64
    (tmp_path / "other" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="do not match the manifest"):
        load(tmp_path / "other")
    with pytest.raises(BundleError, match="not a model bundle"):
        load(tmp_path)
    shutil.copytree(trained_bundle, tmp_path / "gate")
    with open(tmp_path / "gate" / "gate.npz", "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(BundleError, match="gate.npz"):
        Predictor(tmp_path / "gate")


def test_predictor_scores_bytes_and_arrays_with_tta_and_reports_bad_rows(trained_bundle, ham_dir):
    dataset = IsicDataset.open(ham_dir, limit=10)
    images = dataset.read_bytes(dataset.ids)
    records = dataset.metadata.to_dict("records")
    predictor = Predictor(trained_bundle, batch_sizes=(1, 8), tta=True)
    out = predictor.score(images[:9] + [b"not an image"], records)
    assert isinstance(out[-1], ImageDecodeError) and out[-1].key == 9
    scores = out[:-1]
    assert all(0 <= s.probability <= 1 and s.spread is not None and s.spread >= 0 for s in scores)
    assert all(s.referred == (s.assessable and s.probability >= predictor.threshold) for s in scores)
    assert all(s.distance is not None for s in scores)  # the bundle's feature gate ran
    # the gate: a gray card and RGB noise are not assessable, with a reason and no referral
    noise = np.random.default_rng(0).integers(0, 256, (300, 400, 3)).astype(np.uint8)
    gray, noisy = predictor.score([np.full((300, 400, 3), 128, np.uint8), noise], records[:2])
    assert not gray.assessable and gray.reason.startswith("no contrast") and not gray.referred
    assert not noisy.assessable and noisy.reason and not noisy.referred
    assert predictor.calibrator.method == read_manifest(trained_bundle)["calibration"]["method"]
    # arrays give the same as bytes; padding to fixed shapes changes nothing
    arrays = dataset.load_images(predictor.image_size, dataset.ids[:9])
    again = predictor.score(list(arrays), records[:9])
    np.testing.assert_allclose([s.probability for s in scores], [s.probability for s in again], atol=1e-6)
    one = predictor.score(images[:1], records[:1])[0]
    assert one.probability == pytest.approx(scores[0].probability, abs=1e-6)


def test_the_map_shown_is_hot_only_where_the_position_s_own_gradient_agrees_with_its_channels():
    """Grad-CAM weights a channel by its mean gradient, so a position where that channel is active
    but its own gradient argues against malignancy can still be the hottest; the map shown (Grad-CAM
    times HiResCAM, blurred by one cell) is not hot there."""
    from model.inference.gradcam import grad_cam, hires_cam, lesion_map

    features = np.zeros((1, 4, 4, 1), np.float32)
    grads = np.zeros((1, 4, 4, 1), np.float32)
    features[0, 0, 0, 0], grads[0, 0, 0, 0] = 1.0, 3.0  # active, and its gradient supports the score
    features[0, 3, 3, 0], grads[0, 3, 3, 0] = 2.0, -1.0  # more active, its own gradient against
    assert np.unravel_index(np.argmax(grad_cam(features, grads)[0]), (4, 4)) == (3, 3)  # mean gradient 1/8
    assert hires_cam(features, grads)[0, 3, 3] == 0.0
    heat = lesion_map(4, 4, [(features, grads)])
    assert heat.dtype == np.float32 and heat.max() == 1.0
    assert np.unravel_index(np.argmax(heat), (4, 4)) == (0, 0) and heat[3, 3] < 0.01
    assert not lesion_map(4, 4, [(features, np.zeros_like(grads))]).any()  # no gradient: no heat, not NaN


def test_the_map_s_position_factor_can_come_from_another_network():
    """The heat-map check's control: the map shown is Grad-CAM times HiResCAM, blurred
    (``blurred_product``); with the HiResCAM factor of another network it peaks where that one's
    positions are hot."""
    from model.inference.gradcam import blurred_product, flip_averaged, grad_cam, hires_cam, lesion_map

    features = np.ones((1, 8, 8, 2), np.float32)
    grads = np.full((1, 8, 8, 2), 0.5, np.float32)
    grads[0, 2, 2] = 2.0  # this network's own position factor is hottest at (2, 2)
    other = np.zeros((1, 8, 8, 2), np.float32)
    other[0, 6, 5] = 1.0  # the other's only at (6, 5)
    channel = flip_averaged(8, 8, [(features, grads)], grad_cam)
    shown = lesion_map(8, 8, [(features, grads)])
    np.testing.assert_array_equal(
        shown, blurred_product(channel, flip_averaged(8, 8, [(features, grads)], hires_cam), (8, 8))
    )
    assert np.unravel_index(np.argmax(shown), (8, 8)) == (2, 2)
    control = blurred_product(channel, flip_averaged(8, 8, [(features, other)], hires_cam), (8, 8))
    assert np.unravel_index(np.argmax(control), (8, 8)) == (6, 5)


def test_heatmap_check_reports_the_map_the_middle_and_the_random_position_control(trained_bundle, ham_dir, tmp_path):
    import json

    from click.testing import CliRunner

    from dermascan.cli import main

    gallery = tmp_path / "maps.png"
    done = CliRunner().invoke(main, ["heatmap-check", str(trained_bundle), "--data", str(ham_dir), "-n", "8",
                                     "--gallery", str(gallery), "--draws", "2"])  # fmt: skip
    assert done.exit_code == 0, done.output
    lines = done.output.strip().splitlines()
    result = json.loads(lines[-1])
    lesions = result["as_is"]["map"]["n"]
    assert lesions > 0
    draws = result["randomised_draws"]
    assert [d["seed"] for d in draws] == [0, 1]
    for name in ("as_is", "shifted"):
        for control in [result["random_position_control"][name]] + [d["position_control"][name] for d in draws]:
            assert control["n"] == lesions and 0 <= control["pointing"] <= 1 and control["concentration"] >= 0
        assert 0 <= result[name]["map"]["pointing"] <= 1 and 0 <= result[name]["centre_baseline"]["pointing"] <= 1
    assert sum(line.startswith("randomised weights, draw ") for line in lines) == 2
    assert any(line.startswith("randomised weights, median of 2 draws") for line in lines)
    assert all(-1 <= d["rank_correlation"] <= 1 for d in draws)
    assert result["randomised_weights_rank_correlation"] == np.median([d["rank_correlation"] for d in draws])
    assert gallery.stat().st_size > 1000


def test_the_map_s_blur_is_scipy_s_gaussian_filter_without_scipy():
    from scipy import ndimage

    from model.inference.gradcam import gaussian_blur

    image = np.random.default_rng(0).random((128, 96))
    for sigma in ((8.0, 8.0), (8.0, 6.0), (2.5, 0.0)):
        np.testing.assert_allclose(
            gaussian_blur(image, sigma), ndimage.gaussian_filter(image, sigma, mode="nearest"), atol=1e-12
        )


def test_gradcam_overlay_from_the_last_cell(trained_bundle, ham_dir):
    import io

    from PIL import Image

    from model.inference.gradcam import GradCam
    from model.inference.heatmap import overlay_png

    predictor = Predictor(trained_bundle)
    dataset = IsicDataset.open(ham_dir, limit=1)
    pixels, meta, *_ = predictor.pre_process(dataset.read_bytes(dataset.ids), dataset.metadata.to_dict("records"))
    heat = GradCam(predictor.network).heatmap(pixels, meta)
    assert heat.shape == (32, 32) and heat.min() >= 0 and heat.max() <= 1
    png = overlay_png(pixels[0], heat)
    assert Image.open(io.BytesIO(png)).size == (32, 32)


def test_the_shipped_bundles_gradcam_on_onnx_runtime_is_its_keras_gradcam():
    """NASNet's operators (separable and strided convolutions, average and max pooling, padding,
    crops, concatenations, a tensor added to itself) differentiated in ONNX: the serving Grad-CAM
    of the shipped bundle gives the gradient TensorFlow's tape gives, and the same heat map."""
    from model.inference.gradcam import GradCam, OnnxGradCam
    from model.inference.loader import load_predictor

    predictor = load_predictor(DEFAULT, batch_sizes=(1,), runtime="onnxruntime")
    onnx_cam, keras_cam = OnnxGradCam(predictor.onnx_file), GradCam(predictor.network)
    examples = sorted((ROOT / "dermascan" / "examples").glob("*.jpg"))[:2]
    for path in examples:
        prepared = predictor.pre_process([path.read_bytes()], [{"age_approx": 50, "sex": "female"}])
        (fk, gk), (fo, go) = (
            keras_cam.features_and_gradients(prepared.pixels, prepared.meta)[0],
            onnx_cam.features_and_gradients(prepared.pixels, prepared.meta)[0],
        )
        assert fo.shape == fk.shape == (1, 16, 16, fk.shape[-1])
        np.testing.assert_allclose(fo, fk, atol=1e-4 * np.abs(fk).max())
        # the gradient: every element within 1e-3 of its largest, all but 0.1 % within 1e-4 — where the
        # two runtimes' forward passes land on either side of a ReLU's or a max-pool's kink, a few
        # neighbouring elements differ (ISIC_0025388 under v4.3's camera clamp: 63 of 67,584, at most
        # 2.4e-4 of the largest; v4.2's graph, the same operators, gives the same on those pixels)
        difference, largest = np.abs(go - gk), np.abs(gk).max()
        assert difference.max() <= 1e-3 * largest and np.mean(difference > 1e-4 * largest) <= 1e-3
        heat = onnx_cam.heatmap(prepared.pixels, prepared.meta)
        assert np.abs(heat - keras_cam.heatmap(prepared.pixels, prepared.meta)).max() < 1e-3


def test_nasnet_fusion_network_shape_and_bn_momentum():
    import keras

    from model.inference.network import HEAD, build, last_cell_layer

    net = build(12, 64)
    assert {t.name: tuple(t.shape) for t in net.inputs} == {"image": (None, 64, 64, 3), "meta": (None, 12)}
    assert net.get_layer(HEAD).activation.__name__ == "sigmoid"
    assert any(layer.name.startswith("aug_cutout") for layer in net.layers)
    bns = [layer for layer in net.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and {b.momentum for b in bns} == {0.99}
    assert last_cell_layer(net).output.shape[-1] == 1056  # NASNetMobile's last cell


def test_evaluate_command(trained_bundle, ham_dir, tmp_path):
    from click.testing import CliRunner

    from dermascan.cli import main

    out = tmp_path / "eval.json"
    result = CliRunner().invoke(
        main, ["evaluate", "--bundle", str(trained_bundle), "--data", str(ham_dir), "--limit", "120", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["n"] == 120 and 0 <= report["auc"] <= 1 and 0 <= report["pauc80"] <= 0.2
    assert report["operating_point"]["tp"] + report["operating_point"]["fn"] == report["positives"]
    assert "AUC" in result.output and "sensitivity" in result.output
    assert 0 <= report["calibration"]["ece"] <= 1 and len(report["calibration"]["reliability"]) == 10
    assert report["gate"]["n"] == 120 and sum(report["gate"]["reasons"].values()) == report["gate"]["not_assessable"]
    assert "ECE" in result.output and "not assessable" in result.output
    # another camera, on the calibration rows of a split: one row per camera, the unchanged one first
    split = np.zeros(120, int)
    split[:40] = -1
    np.save(tmp_path / "split.npy", split)
    shifted = CliRunner().invoke(main, ["evaluate", "--bundle", str(trained_bundle), "--data", str(ham_dir),
                                        "--limit", "120", "--shift", "white-balance", "--calibration-rows-of",
                                        str(tmp_path / "split.npy"), "--out", str(tmp_path / "shifts.json")])  # fmt: skip
    assert shifted.exit_code == 0, shifted.output
    rows = json.loads((tmp_path / "shifts.json").read_text())["rows"]
    assert [r["shift"] for r in rows] == ["none", "white-balance"] and {r["n"] for r in rows} == {40}
    assert "white balance: red ×0.9" in shifted.output
    from model.training.evaluate import shifted as shift_pixels

    grey = np.full((1, 9, 9, 3), 200, np.uint8)
    assert shift_pixels(grey, "white-balance")[0, 4, 4].tolist() == [180, 200, 220]
    assert shift_pixels(grey, "brighter")[0, 4, 4].tolist() == [240] * 3
    field = shift_pixels(grey, "field-of-view")
    assert field[0, 0, 0].tolist() == [0, 0, 0] and field[0, 4, 4].tolist() == [200] * 3
    np.save(tmp_path / "short.npy", split[:50])
    wrong = CliRunner().invoke(main, ["evaluate", "--bundle", str(trained_bundle), "--data", str(ham_dir), "--limit",
                                      "120", "--calibration-rows-of", str(tmp_path / "short.npy")])  # fmt: skip
    assert wrong.exit_code == 2 and "50 rows in the split, 120" in wrong.output


def test_combine_averages_two_runs_on_one_split_and_refuses_another_split(trained_bundle, ham_dir, tmp_path):
    """`dermascan combine`: a bundle and a second run (weight averaging on) on the same split →
    one four-member bundle, calibrated and gated on the held-out set; another split is refused."""
    import keras
    from click.testing import CliRunner

    from dermascan.cli import main

    second = tmp_path / "ema"
    run = CliRunner().invoke(
        main,
        ["train", "--data", str(ham_dir), "--out", str(second / "bundle"), "--work-dir", str(second / "work"),
         "--folds", "2", "--epochs", "1", "--limit", "96", "--backbone", "tiny", "--image-size", "32",
         "--ema-momentum", "0.9", "--version", "tiny-ema"],
    )  # fmt: skip
    assert run.exit_code == 0, run.output
    out = tmp_path / "combined"
    result = CliRunner().invoke(
        main,
        ["combine", str(trained_bundle), str(second / "work"), "--data", str(ham_dir), "--out", str(out),
         "--version", "tiny-combined", "--gate-members", "0,1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "4 members" in result.output and "threshold" in result.output
    manifest = read_manifest(out)
    held = int((np.load(trained_bundle.with_name("bundle.work") / "split.npy") < 0).sum())
    assert manifest["training"]["members"] == ["tiny-cv/fold0", "tiny-cv/fold1", "work/fold0", "work/fold1"]
    assert manifest["metrics"]["calibration_set"]["n"] == held
    assert len(manifest["metrics"]["members_on_calibration_set"]) == 4
    assert manifest["gate"]["ood"]["members"] == [0, 1]
    # the one threshold rule, on the ensemble's calibration set
    assert manifest["metrics"]["calibration_set"]["rule"]["target"] == 0.95
    assert 0 < manifest["threshold"] < 1 and (out / "reliability.png").is_file() and (out / "reference.json").is_file()
    # the combined network is the mean of the four members; the gate reads the first two's features
    dataset = IsicDataset.open(ham_dir, limit=12)
    pixels = dataset.load_images(32)
    meta = FeatureSpec.from_dict(manifest["feature_spec"]).transform(dataset.metadata)
    combined = Predictor(out, batch_sizes=(16,))
    raw, features = combined.predict_raw(pixels, meta)
    source = Predictor(trained_bundle, batch_sizes=(16,))
    first = source.predict_raw(pixels, meta)[0]
    others = [
        keras.saving.load_model(second / "work" / f"fold{k}" / "best.keras", compile=False).predict(
            {"image": pixels, "meta": meta}, verbose=0
        )
        for k in (0, 1)
    ]
    expected = (2 * np.ravel(first) + np.ravel(others[0]) + np.ravel(others[1])) / 4
    np.testing.assert_allclose(np.ravel(raw), expected, atol=2e-3)
    two_members = source.gate.features.mean.size  # the source bundle's gate reads its two members
    assert features.shape[1] == combined.gate.features.mean.size == two_members
    assert all(0 <= s.probability <= 1 for s in combined.score(list(pixels), dataset.metadata.to_dict("records")))
    # a run on another split cannot join: its calibration set was not held out of all members
    shuffled = tmp_path / "shuffled"
    shutil.copytree(second / "work", shuffled)
    np.save(shuffled / "split.npy", np.random.default_rng(1).permutation(np.load(shuffled / "split.npy")))
    refused = CliRunner().invoke(
        main, ["combine", str(trained_bundle), str(shuffled), "--data", str(ham_dir), "--out", str(tmp_path / "x"),
               "--version", "x"],
    )  # fmt: skip
    assert refused.exit_code != 0 and "another split" in refused.output
    assert not (tmp_path / "x").exists()


def test_unpack_then_assemble_again_gives_the_same_members_without_training(trained_bundle, ham_dir, tmp_path):
    """`dermascan unpack` re-creates a bundle's work folder; `train --work-dir` on it trains nothing and
    writes a bundle with the same members, split and calibration set (and today's rules)."""
    from click.testing import CliRunner

    from dermascan.cli import main

    work = tmp_path / "work"
    done = CliRunner().invoke(main, ["unpack", str(trained_bundle), "--data", str(ham_dir), "--work-dir", str(work)])
    assert done.exit_code == 0, done.output
    original = trained_bundle.with_name("bundle.work")
    np.testing.assert_array_equal(np.load(work / "split.npy"), np.load(original / "split.npy"))
    for k in (0, 1):  # the held-out scores computed again are the ones training saved (float16 weights aside)
        again, saved = np.load(work / f"fold{k}" / "oof.npz"), np.load(original / f"fold{k}" / "oof.npz")
        np.testing.assert_array_equal(again["index"], saved["index"])
        np.testing.assert_allclose(again["cal_mean"], saved["cal_mean"], atol=5e-3)
    out = tmp_path / "again"
    rebuilt = CliRunner().invoke(
        main,
        ["train", "--data", str(ham_dir), "--out", str(out), "--work-dir", str(work), "--folds", "2", "--epochs", "1",
         "--limit", "96", "--backbone", "tiny", "--image-size", "32", "--version", "tiny-again"],
    )  # fmt: skip
    assert rebuilt.exit_code == 0, rebuilt.output
    assert not (work / "fold0" / "history.csv").exists()  # nothing was trained
    dataset = IsicDataset.open(ham_dir, limit=12)
    records = dataset.metadata.to_dict("records")
    images = dataset.read_bytes(dataset.ids)
    before = Predictor(trained_bundle, batch_sizes=(16,)).predict_raw(*_prepared(trained_bundle, images, records))[0]
    after = Predictor(out, batch_sizes=(16,)).predict_raw(*_prepared(out, images, records))[0]
    np.testing.assert_allclose(after, before, atol=1e-3)
    wrong = CliRunner().invoke(
        main, ["unpack", str(trained_bundle), "--data", str(tmp_path), "--work-dir", str(tmp_path / "w")]
    )
    assert wrong.exit_code != 0 and "ISIC-2024 layout" in wrong.output and not (tmp_path / "w").exists()


def _prepared(bundle_dir, images, records):
    prepared = Predictor(bundle_dir, batch_sizes=(16,)).pre_process(images, records)
    return prepared.pixels, prepared.meta


def test_distill_trains_a_student_from_out_of_fold_teacher_scores_and_resumes(trained_bundle, ham_dir, tmp_path):
    """`dermascan distill` with the tiny backbone: the teacher's out-of-fold scores once, a fold
    student validated on its fold and the final student on every development row, the bundle with
    the threshold rule on its ruler; a second run trains nothing."""
    from click.testing import CliRunner

    from dermascan.cli import main
    from model.training.distill import TEACHER_FILE, DistillConfig

    work, out = tmp_path / "work", tmp_path / "student"
    args = ["distill", "--teacher", str(trained_bundle), "--data", str(ham_dir), "--work-dir", str(work),
            "--out", str(out), "--backbone", "tiny", "--image-size", "32", "--epochs", "1", "--folds", "0",
            "--version", "tiny-student"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    teacher = np.load(work / TEACHER_FILE)
    split = teacher["split"]
    assert np.isnan(teacher["soft"][split < 0]).all() and not np.isnan(teacher["soft"][split >= 0]).any()
    manifest = read_manifest(out)
    assert manifest["version"] == "tiny-student" and manifest["training"]["distilled"]
    assert manifest["training"]["teacher"]["version"] == read_manifest(trained_bundle)["version"]
    chosen = manifest["metrics"]["threshold_rule"]
    # one rule: the threshold on the ruler (the fold student's out-of-fold scores and the final
    # student's calibration set), checked part by part (fitted without each part, applied to it)
    assert "the ruler's malignant lesions" in chosen and "patient-disjoint parts" in chosen
    rule = manifest["metrics"]["ruler"]["rule"]
    assert rule["threshold"] == pytest.approx(manifest["threshold"]) and rule["ruler"]["parts"] == 2
    assert [row["malignant_lesions"] for row in manifest["metrics"]["cohort_spread"]] == [50, 200, 1000]
    assert {s["student"] for s in manifest["metrics"]["students"]} == {"fold0", "final"}
    history = (work / "final" / "history.csv").read_text()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert (work / "final" / "history.csv").read_text() == history  # resumed: nothing trained again
    other = CliRunner().invoke(
        main, [*args[: args.index("--epochs")], "--epochs", "2", *args[args.index("--epochs") + 2 :]]
    )
    assert other.exit_code == 1 and "another recipe (epochs 1 → 2)" in other.output  # not resumed as another
    assert DistillConfig.read(work / "config.json").epochs == 1
    four = IsicDataset.open(ham_dir, limit=4)
    scores = Predictor(out).score(four.read_bytes(four.ids), [{}] * 4)
    assert all(0.0 <= s.probability <= 1.0 for s in scores)
    # two runs' fold students side by side: a copy of the run differs from it by exactly nothing
    copy = tmp_path / "same-recipe"
    shutil.copytree(work, copy)
    ablation = tmp_path / "no-ema-plateau"  # the recipe's parts switched off one by one, on the same fold
    fold_args = [a for a in args[: args.index("--version")] if a not in ("--out", str(out))]
    fold_args[fold_args.index(str(work))] = str(ablation)
    refused = CliRunner().invoke(main, [*fold_args, "--no-ema", "--lr-schedule", "plateau"])
    assert refused.exit_code == 1 and "no validation rows" in refused.output  # the final student has none
    assert not ablation.exists()  # refused before anything was scored or written
    result = CliRunner().invoke(main, [*fold_args, "--no-ema", "--lr-schedule", "plateau", "--no-final"])
    assert result.exit_code == 0, result.output
    ran = DistillConfig.read(ablation / "config.json")
    assert ran.ema_momentum is None and ran.lr_schedule == "plateau"
    # the same recipe again with the training's own seed: 42 (the split's) replays the first run's
    # fold student, another seed is another run on the same patients
    replayed, reseeded = tmp_path / "init-seed-42", tmp_path / "init-seed-7"
    for folder, seed in ((replayed, "42"), (reseeded, "7")):
        run_args = [str(folder) if a == str(ablation) else a for a in fold_args]
        result = CliRunner().invoke(main, [*run_args, "--init-seed", seed, "--no-final"])
        assert result.exit_code == 0, result.output
    assert DistillConfig.read(reseeded / "config.json").init_seed == 7
    # 0 would seed the final student with -1 (hours in, after the fold students): refused at once
    zero = CliRunner().invoke(main, [*fold_args, "--init-seed", "0"])
    assert zero.exit_code == 2 and "--init-seed" in zero.output
    with pytest.raises(ValueError, match="init_seed 0"):
        DistillConfig(init_seed=0)
    first = np.load(work / "fold0" / "oof.npz")["plain"]
    assert np.array_equal(np.load(replayed / "fold0" / "oof.npz")["plain"], first)
    assert not np.allclose(np.load(reseeded / "fold0" / "oof.npz")["plain"], first)
    runs = [str(work), str(copy), str(ablation), str(reseeded)]
    compared = CliRunner().invoke(main, ["distill-compare", *runs, "--data", str(ham_dir), "--boot", "50"])
    assert compared.exit_code == 0, compared.output
    assert (
        "teacher (out-of-fold)" in compared.output and "32px, 1 epochs, standard, EMA 0.99, cosine" in compared.output
    )
    assert (
        "+0.0000 [+0.0000, +0.0000]" in compared.output
        and "32px, 1 epochs, standard, no EMA, plateau" in compared.output
        and "cosine, init seed 7" in compared.output
        and "resample patients only" in compared.output
    )
    split = np.load(copy / "split.npy")
    np.save(copy / "split.npy", np.roll(split, 1))  # another split: other patients in fold 0
    refused = CliRunner().invoke(main, ["distill-compare", str(work), str(copy), "--data", str(ham_dir)])
    assert refused.exit_code == 1 and "not comparable" in refused.output


def test_a_paired_difference_resamples_patients_and_cancels_what_two_scores_share():
    """Pure logic: the same scores differ by exactly nothing; a better score is ahead with an
    interval above zero; five images of each patient do not narrow the interval as if they were
    five patients (they do when the grouping is left out)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    base = y + rng.normal(0, 1.2, 400)
    better = base + y * 0.8
    same = metrics.paired_difference(metrics.auc, y, base, base, n_boot=200)
    assert same["difference"] == 0 and same["ci95"] == (0.0, 0.0)
    ahead = metrics.paired_difference(metrics.auc, y, base, better, n_boot=400)
    assert ahead["difference"] > 0.05 and ahead["ci95"][0] > 0 and ahead["share_ahead"] > 0.97
    noisy = base + rng.normal(0, 0.8, 400)
    one = metrics.paired_difference(metrics.auc, y, base, noisy, n_boot=400)
    five = [np.repeat(v, 5) for v in (y, base, noisy)]
    grouped = metrics.paired_difference(metrics.auc, *five, groups=np.repeat(np.arange(400), 5), n_boot=400)
    ungrouped = metrics.paired_difference(metrics.auc, *five, n_boot=400)

    def width(r):
        return r["ci95"][1] - r["ci95"][0]

    assert 0.75 < width(grouped) / width(one) < 1.33 and width(ungrouped) < 0.7 * width(one)
    with pytest.raises(ValueError):
        metrics.paired_difference(metrics.auc, y, base, better[:10])


def test_the_one_threshold_rule_lands_on_its_aim_part_by_part():
    """Pure logic: on a ruler of patient-disjoint parts the rule refers the aimed share of the
    malignant lesions, and fitted without each part it lands near the aim there too; a part whose
    lesions are harder is seen in the check (below the aim) rather than hidden."""
    from model.training import threshold as rule_of

    rng = np.random.default_rng(5)
    parts = np.repeat(np.arange(4), 1500)
    y = (rng.random(parts.size) < 0.2).astype(int)
    scores = rng.normal(0, 1, parts.size) + 2.0 * y
    rule = rule_of.choose(y, scores, parts, 0.955, "synthetic")
    assert metrics.at_threshold(y, scores, rule.threshold).sensitivity == pytest.approx(0.955, abs=0.002)
    assert rule.check["sensitivity_mean"] == pytest.approx(0.955, abs=0.01)
    assert all(abs(row["sensitivity"] - 0.955) < 0.03 for row in rule.check["parts"])
    scores[(parts == 3) & (y == 1)] -= 0.6  # the last part's lesions are harder
    check = rule_of.choose(y, scores, parts, 0.955).check
    assert check["parts"][3]["sensitivity"] < check["parts"][0]["sensitivity"] - 0.02
    spread = rule_of.cohort_spread(rule)
    assert spread[0]["p95"] - spread[0]["p05"] > spread[2]["p95"] - spread[2]["p05"]  # small cohorts vary more
    assert rule_of.level_threshold(np.array([0.1, 0.2, 0.3, 0.4]), 0.75) == 0.2


def test_a_warm_start_copies_every_layer_but_the_new_head_and_refuses_another_shape(tmp_path):
    """A v4 network (differential head, metadata dropout) starting from an earlier network of the
    same backbone: the same probability of malignancy before any training, the new head fresh; a
    network of another shape is refused with the layer named, nothing copied."""
    import keras

    from model.inference.network import DIAGNOSIS_HEAD, NO_AUGMENTATION, build, diagnosis_reads_cell
    from model.training.warm_start import copy_weights, source_network

    old = build(6, 32, backbone="tiny", augmentation=NO_AUGMENTATION, seed=1)
    old.save(tmp_path / "old.keras")
    new = build(6, 32, backbone="tiny", augmentation=NO_AUGMENTATION, seed=2, diagnoses=7,
                metadata_dropout={"groups": [[0, 3], [3, 6]], "missing": [0.0] * 6, "rate": 0.5, "all_rate": 0.5})  # fmt: skip
    fresh_head = [w.copy() for w in new.get_layer(DIAGNOSIS_HEAD).get_weights()]
    x = {"image": np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8),
         "meta": np.random.default_rng(1).random((4, 6), dtype=np.float32)}  # fmt: skip
    assert copy_weights(new, source_network(str(tmp_path / "old.keras"))) == len(old.weights)
    np.testing.assert_allclose(new.predict(x, verbose=0)[0], old.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
    for before, after in zip(fresh_head, new.get_layer(DIAGNOSIS_HEAD).get_weights(), strict=True):
        np.testing.assert_array_equal(before, after)
    other = build(6, 32, backbone="tiny", augmentation=NO_AUGMENTATION, meta_units=(16,))
    kept = [w.numpy().copy() for w in other.weights]
    with pytest.raises(ModelError, match="warm start"):
        copy_weights(other, old)
    for before, w in zip(kept, other.weights, strict=True):
        np.testing.assert_array_equal(before, w.numpy())
    # from a network with a differential of its own, one whose head reads a cell as the shipped
    # bundle's does: everything but that head, the same probability of malignancy
    shipped = diagnosis_reads_cell(build(6, 32, backbone="tiny", augmentation=NO_AUGMENTATION, seed=3, diagnoses=7))
    again = build(6, 32, backbone="tiny", augmentation=NO_AUGMENTATION, seed=4, diagnoses=7)
    head = shipped.get_layer(DIAGNOSIS_HEAD)
    assert copy_weights(again, shipped) == len(shipped.weights) - len(head.weights)
    np.testing.assert_allclose(again.predict(x, verbose=0)[0], shipped.predict(x, verbose=0)[0], rtol=1e-5, atol=1e-6)
    ensemble = keras.Model(old.inputs, keras.layers.Average()([old(old.inputs), old(old.inputs)]))
    with pytest.raises(ModelError, match="name one with #k"):
        source_network(str(_saved(ensemble, tmp_path / "ens.keras")))


def _saved(model, path):
    model.save(path)
    return path


def test_the_heat_map_measures_find_the_lesion_and_score_a_map_against_it():
    """model/training/heatmaps.py on a made-up dermoscopic image: the automatic mask is the dark
    lesion off the middle, a map on it wins the pointing game where the centre map loses, a flat map
    ranks nothing (the randomised-weights check: 0, not NaN), and shifting moves the lesion."""
    from model.training.heatmaps import centre_map, lesion_mask, rank_correlation, scores, shifted

    yy, xx = np.mgrid[:64, :64]
    image = np.full((64, 64, 3), 200, np.uint8)
    lesion = (yy - 32) ** 2 + (xx - 44) ** 2 < 8**2
    image[lesion] = 60
    mask = lesion_mask(image)
    assert (mask & lesion).sum() / lesion.sum() > 0.9 and (mask & ~lesion).sum() < 0.1 * lesion.sum()
    on_lesion = np.exp(-((yy - 32) ** 2 + (xx - 44) ** 2) / 50.0)
    found = scores([on_lesion, centre_map((64, 64))], [mask, mask])
    assert found["n"] == 2 and found["pointing"] == 0.5  # the map on the lesion hits, the middle misses
    assert scores([on_lesion], [mask])["concentration"] > 2
    assert rank_correlation(on_lesion, np.zeros((64, 64))) == 0.0
    assert rank_correlation(on_lesion, on_lesion) == pytest.approx(1.0)
    moved = lesion_mask(shifted(image, 0.25))
    assert np.argwhere(moved)[:, 1].mean() > np.argwhere(mask)[:, 1].mean() + 10


def test_the_gradcam_graph_names_an_operator_it_cannot_differentiate():
    """A graph with an operator between the feature maps and the score that has no adjoint here
    (Tanh) is refused with a ModelError naming it, not turned into a wrong map."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from model.inference.backprop import gradcam_graph

    rng = np.random.default_rng(0)
    weights = {
        "w": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        "head": rng.normal(size=(8, 1)).astype(np.float32),
        "perm_scale": np.float32(1 / 255),
        "axes": np.array([2, 3], np.int64),
    }
    nodes = [
        helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["x", "perm_scale"], ["scaled"]),
        helper.make_node("Transpose", ["scaled"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "w"], ["conv"], kernel_shape=[3, 3], strides=[8, 8], pads=[1, 1, 1, 1]),
        helper.make_node("Concat", ["conv", "conv"], ["cell"], axis=1),
        helper.make_node("Tanh", ["cell"], ["squashed"]),
        helper.make_node("GlobalAveragePool", ["squashed"], ["pooled"]),
        helper.make_node("Squeeze", ["pooled", "axes"], ["features"]),
        helper.make_node("MatMul", ["features", "head"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["probability"]),
    ]
    graph = helper.make_graph(
        nodes, "tanh",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["n", 16, 16, 3]),
         helper.make_tensor_value_info("meta", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["n", 1])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    with pytest.raises(ModelError, match="no gradient for the operator Tanh"):
        gradcam_graph(model, stride=8)
    nodes[5] = helper.make_node("Relu", ["cell"], ["squashed"])  # the same graph with a ReLU: fine
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    built = gradcam_graph(model, stride=8)
    assert {o.name for o in built.graph.output} == {"logit", "cell_0", "cell_grad_0"}


def test_the_differential_head_is_refitted_without_touching_the_malignancy_output(tmp_path, ham_dir):
    """``dermascan diagnosis-fit`` on a tiny bundle whose differential head was never trained: the
    refitted head tells the classes apart on the held-out calibration rows (better than the old head
    and than chance), the probability of malignancy the Predictor serves is the same to the bit, the
    bundle loads under its new version with a checksum that verifies, and the same version again is
    refused."""
    import keras
    from click.testing import CliRunner

    from dermascan.cli import main
    from model.inference import bundle, diagnosis
    from model.inference.gradcam import GradCam, OnnxGradCam, for_predictor
    from model.inference.network import DIAGNOSIS_CELL_MAX_POOL, DIAGNOSIS_CELL_POOL, NO_AUGMENTATION, build

    keras.utils.set_random_seed(0)
    limit = 1500
    ds = IsicDataset.open(ham_dir, limit=limit)
    spec = FeatureSpec.fit(ds.metadata, min_count=1)
    net = build(spec.dim, 32, backbone="tiny", augmentation=NO_AUGMENTATION, diagnoses=len(diagnosis.CODES))
    config = {"limit": limit, "folds": 3, "seed": 42, "calibration_fraction": 0.15, "tta": False}
    block = {**diagnosis.manifest_block(), "prior_adjustment": {"tau": 0.0, "prior": [1 / 7] * 7}}
    path = tmp_path / "dx"
    bundle.save(net, spec, path, version="tiny-dx-1", threshold=0.5, training={"config": config},
                extra={"calibration": {"method": "none", "params": {}}, "diagnosis": block})  # fmt: skip
    rows = ds.metadata.iloc[-60:]
    pictures = ds.read_bytes(list(rows.isic_id))
    records = rows[["age_approx", "sex", "anatom_site_general"]].to_dict("records")
    before = Predictor(path).score(pictures, records)

    result = CliRunner().invoke(main, ["diagnosis-fit", str(path), "--data", str(ham_dir), "--version", "tiny-dx-2"])
    assert result.exit_code == 0, result.output
    assert "calibration set (chose nothing)" in result.output
    manifest = load(path, network=False).manifest  # verifies the new checksum
    assert manifest["version"] == "tiny-dx-2" and manifest["training"]["diagnosis_head"]["from_version"] == "tiny-dx-1"
    report = manifest["diagnosis"]["report"]
    new, old = report["calibration_set"], report["refit"]["previous_head"]["calibration_set"]
    assert new["n"] == old["n"] > 100
    assert new["balanced_accuracy"] > max(old["balanced_accuracy"], 1 / 7) + 0.05, (new, old)
    after = Predictor(path).score(pictures, records)
    assert [s.probability for s in after] == [s.probability for s in before]
    assert [s.differential for s in after] != [s.differential for s in before]
    # the new head reads the cell Grad-CAM shows beside the fused features; exported, ONNX Runtime
    # serves the same differential, and Grad-CAM's graph still follows the malignancy output alone
    assert report["refit"]["reads"] == "the fused features and the cell Grad-CAM shows, average and max-pooled"
    assert {DIAGNOSIS_CELL_POOL, DIAGNOSIS_CELL_MAX_POOL} <= {layer.name for layer in load(path).network.layers}
    exported = CliRunner().invoke(
        main, ["export", str(path), "--format", "onnx", "--out", str(tmp_path / "onnx"), "--data", str(ham_dir)]
    )
    assert exported.exit_code == 0, exported.output
    on_onnx = Predictor(path, onnx_package=tmp_path / "onnx")
    served = on_onnx.score(pictures, records)
    assert np.abs(np.array([s.differential for s in served]) - [s.differential for s in after]).max() < 1e-4
    onnx_cam, keras_cam = for_predictor(on_onnx), GradCam(load(path).network)
    assert isinstance(onnx_cam, OnnxGradCam) and onnx_cam.members == 1
    prepared = on_onnx.pre_process(pictures[:2], records[:2])
    for i in range(2):
        pixels, meta = prepared.pixels[i : i + 1], prepared.meta[i : i + 1]
        assert np.abs(onnx_cam.heatmap(pixels, meta) - keras_cam.heatmap(pixels, meta)).max() < 1e-3
    # `dermascan evaluate` reports the differential as the Predictor serves it: on the same held-out
    # rows, the figures the refit wrote into the manifest (the fill of a circular field aside)
    from model.training.config import read_config, split_rows

    np.save(tmp_path / "split.npy", split_rows(ds.targets(), ds.groups(), read_config(path)))
    evaluated = CliRunner().invoke(main, ["evaluate", "--bundle", str(path), "--data", str(ham_dir), "--limit", str(limit),
                                          "--calibration-rows-of", str(tmp_path / "split.npy"),
                                          "--out", str(tmp_path / "eval.json")])  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    served = json.loads((tmp_path / "eval.json").read_text())["diagnosis"]
    assert served["n"] == new["n"] and abs(served["balanced_accuracy"] - new["balanced_accuracy"]) < 0.02, (served, new)
    assert set(served["recall"]) <= set(diagnosis.CODES) and 0 <= served["melanoma_auc"] <= 1
    assert f"balanced accuracy {served['balanced_accuracy']:.4f}" in evaluated.output

    again = CliRunner().invoke(main, ["diagnosis-fit", str(path), "--data", str(ham_dir), "--version", "tiny-dx-2"])
    assert again.exit_code != 0 and "needs a new version" in again.output


def test_a_circular_field_of_view_is_filled_with_its_rim_and_nothing_else_is():
    """model.inference.field on made-up images: a black surround outside a disc takes the colour of
    the skin just inside it and the lesion in the middle is untouched; an image without one, a
    vignette's greyish corners, a dark lesion that touches no border and an image that is mostly
    black are left alone (the very same array when nothing changes)."""
    from model.inference.field import fill_outside_field

    yy, xx = np.mgrid[:128, :128]
    skin = np.zeros((128, 128, 3), np.uint8) + np.array([200, 150, 130], np.uint8)
    lesion = (yy - 64) ** 2 + (xx - 64) ** 2 < 15**2
    skin[lesion] = (70, 40, 30)
    disc = np.sqrt((yy - 63.5) ** 2 + (xx - 63.5) ** 2) <= 64
    circular = np.where(disc[..., None], skin, 0).astype(np.uint8)
    filled = fill_outside_field(circular[None])[0]
    assert np.abs(filled[~disc].astype(int) - (200, 150, 130)).max() <= 2
    assert np.array_equal(filled[lesion], skin[lesion]) and np.array_equal(filled[disc], circular[disc])
    vignette = np.where(disc[..., None], skin, (60, 45, 40)).astype(np.uint8)
    small = np.where(((yy - 64) ** 2 + (xx - 64) ** 2 < 80**2)[..., None], skin, 0).astype(
        np.uint8
    )  # 2.8 %: corners only
    mostly_black = np.where(((yy - 64) ** 2 + (xx - 64) ** 2 < 30**2)[..., None], skin, 0).astype(np.uint8)
    batch = np.stack([skin, vignette, small, mostly_black])
    assert fill_outside_field(batch) is batch  # nothing in it has a field-of-view surround
    both = fill_outside_field(np.stack([skin, circular]))
    assert np.array_equal(both[0], skin) and np.array_equal(both[1], filled)


def test_a_head_that_reads_the_cell_s_average_is_rewired_to_read_its_largest_values_too():
    """v4.3's head reads the 1/8 cell average-pooled; a refit rewires it to read the cell's average
    and largest value per channel beside the fused features (in that order, so the old head's
    inputs come first), the malignancy output untouched; asking for what it reads already, or
    for a pool that does not exist, is refused."""
    import keras

    from model.inference import diagnosis
    from model.inference.network import (
        DIAGNOSIS_CELL_MAX_POOL,
        DIAGNOSIS_CELL_POOL,
        DIAGNOSIS_HEAD,
        NO_AUGMENTATION,
        build,
        cell_pools,
        diagnosis_reads_cell,
    )  # fmt: skip

    keras.utils.set_random_seed(0)
    net = build(5, 32, backbone="tiny", augmentation=NO_AUGMENTATION, diagnoses=len(diagnosis.CODES))
    fused = net.get_layer(DIAGNOSIS_HEAD).input.shape[-1]
    average = diagnosis_reads_cell(net, 8, ("average",))
    both = diagnosis_reads_cell(average, 8, ("average", "max"))
    assert (cell_pools(net), cell_pools(average), cell_pools(both)) == ((), ("average",), ("average", "max"))
    cell = both.get_layer(DIAGNOSIS_CELL_POOL).output.shape[-1]
    assert both.get_layer(DIAGNOSIS_CELL_MAX_POOL).output.shape[-1] == cell
    assert both.get_layer(DIAGNOSIS_HEAD).input.shape[-1] == fused + 2 * cell
    inputs = {"image": np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3)).astype(np.float32),
              "meta": np.zeros((4, 5), np.float32)}  # fmt: skip
    malignancy = np.asarray(net.predict(inputs, verbose=0)[0])
    assert np.array_equal(np.asarray(both.predict(inputs, verbose=0)[0]), malignancy)
    with pytest.raises(ValueError, match="already reads"):
        diagnosis_reads_cell(both, 8, ("max", "average"))
    with pytest.raises(ValueError, match="cell pools"):
        diagnosis_reads_cell(net, 8, ("median",))


def test_a_prior_re_weighting_is_chosen_only_for_a_real_gain_that_keeps_the_melanoma_ranking():
    """tau > 0 (the differential re-weighted towards equal priors) must gain at least half a point
    of balanced accuracy over the head's own probabilities and cost the melanoma AUC at most half
    a point; v4.4's search had tau = 0.5 gain 0.003 and cost 0.022 of melanoma AUC."""
    from model.inference.diagnosis import choose_tau

    balanced = {0.0: 0.6239, 0.25: 0.6122, 0.5: 0.6270, 0.75: 0.6193, 1.0: 0.6044}
    melanoma = {0.0: 0.886, 0.25: 0.878, 0.5: 0.864, 0.75: 0.85, 1.0: 0.84}
    assert choose_tau(balanced, melanoma) == 0.0  # v4.4: a gain within the noise, a melanoma cost beyond it
    assert choose_tau({**balanced, 0.5: 0.64}, melanoma) == 0.0  # a real gain, but the melanoma ranking suffers
    assert choose_tau({**balanced, 0.5: 0.64}, {**melanoma, 0.5: 0.883}) == 0.5  # a real gain, the ranking kept
    assert (
        choose_tau({0.0: 0.5, 0.5: 0.52, 1.0: 0.52}, dict.fromkeys((0.0, 0.5, 1.0))) == 0.5
    )  # no melanoma: the smaller tau of a tie


def test_the_differential_s_classes_are_weighted_by_their_counts():
    """``--diagnosis-balance``: each class weighted by count^-power, the rows' mean weight 1; a
    class with no rows gets the largest weight and unknown rows (-1) are not counted."""
    from model.training.folds import class_weights

    rows = np.array([0] * 60 + [1] * 30 + [2] * 10 + [-1] * 50)
    assert np.allclose(class_weights(rows, 0.0, 4), 1.0)
    balanced = class_weights(rows, 1.0, 4)
    assert balanced[:3] * np.array([60, 30, 10]) == pytest.approx([100 / 3] * 3)  # every class the same total
    assert balanced[rows[rows >= 0]].mean() == pytest.approx(1.0) and balanced[3] == pytest.approx(balanced[2])
    root = class_weights(rows, 0.5, 4)
    assert root[2] / root[0] == pytest.approx(np.sqrt(6)) and root[rows[rows >= 0]].mean() == pytest.approx(1.0)


def test_distill_trains_the_differential_with_weighted_classes_and_a_wider_camera(trained_bundle, ham_dir, tmp_path):
    """A tiny fold student with the differential weighted towards rare classes and the wider camera
    augmentation: it trains, its checkpoint (which names the weighted loss) loads again, and the
    recipe is recorded."""
    from click.testing import CliRunner

    from dermascan.cli import main
    from model.inference.network import WIDE_CAMERA_AUGMENTATION
    from model.training.distill import DistillConfig

    work = tmp_path / "work"
    args = ["distill", "--teacher", str(trained_bundle), "--data", str(ham_dir), "--work-dir", str(work),
            "--backbone", "tiny", "--image-size", "32", "--epochs", "1", "--folds", "0", "--no-final",
            "--diagnosis-weight", "0.5", "--diagnosis-balance", "0.5", "--augment", "camera-wide"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    cfg = DistillConfig.read(work / "config.json")
    assert cfg.diagnosis_balance == 0.5 and cfg.augmentation == WIDE_CAMERA_AUGMENTATION
    import keras

    from model.training.folds import _masked_loss

    _masked_loss()
    model = keras.saving.load_model(work / "fold0" / "last.keras")
    weights = model.loss[1].weights
    assert len(weights) == 7 and max(weights) > 1.0 > min(weights)  # nevi weigh less than the rare classes
    bad = CliRunner().invoke(main, [*args[:-5], "--diagnosis-balance", "2"])
    assert bad.exit_code == 2 and "--diagnosis-balance" in bad.output
