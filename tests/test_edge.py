"""The edge package (`dermascan export`, `edge/`): a bundle exported to ONNX and LiteRT scores
exactly like the bundle without TensorFlow in the scoring process; int8 packages are smaller and
check themselves; a result made offline is uploaded with its version and kept beside the
server's own score."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from dermascan.cli import main
from model.inference.bundle import read_manifest
from tests.ham_files import json_records
from tests.services import ROOT

pytestmark = pytest.mark.slow  # it trains and exports a tiny bundle (tens of seconds)
FORBIDDEN = ("tensorflow", "keras", "flask", "sqlalchemy", "celery", "jax")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ham_dir):
    """A tiny trained bundle (the pipeline's own train command) and its fp32 ONNX package. Its input
    is rectangular (40x32, width x height, HAM10000's own 4:3 in small), so every step of export and
    edge scoring is shown to keep height and width apart; the other model tests train square ones."""
    work = tmp_path_factory.mktemp("edge")
    bundle = work / "bundle"
    result = CliRunner().invoke(main, [
        "train", "--data", str(ham_dir), "--out", str(bundle), "--folds", "2", "--epochs", "1", "--limit", "96",
        "--backbone", "tiny", "--image-size", "40x32", "--version", "tiny-edge",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    package = work / "onnx"
    result = CliRunner().invoke(main, ["export", str(bundle), "--format", "onnx", "--out", str(package), "--data", str(ham_dir)])  # fmt: skip
    assert result.exit_code == 0, result.output
    return bundle, package


def test_an_onnx_package_scores_like_the_bundle_and_says_how_it_was_checked(exported):
    bundle, package = exported
    manifest = json.loads((package / "manifest.json").read_text())
    check = json.loads((package / "check.json").read_text())
    assert manifest["format"] == "dermascan-edge/1" and manifest["source"]["version"] == "tiny-edge"
    assert check["passed"] and check["max_probability_difference"] <= 1e-4 and check["gate_verdicts_identical"] == 1.0
    assert manifest["image_size"] == [32, 40] == read_manifest(bundle)["image_size"]  # [height, width]
    assert (package / "gate.npz").is_file() and manifest["gate"]["quality"]


def test_openvino_runs_the_same_onnx_file_where_it_is_exact(exported, ham_dir, caplog, monkeypatch):
    """The workers' forward pass on OpenVINO: chosen by "auto" on this x86 CPU because it matches
    ONNX Runtime on the check inputs, scoring the same as ONNX Runtime; one that differs is refused
    with a log line (asked by name: an error)."""
    import logging
    import platform

    from model.errors import ModelError
    from model.inference import runtimes
    from model.inference.predictor import Predictor

    bundle, package = exported
    images = [base64.b64decode(r["image_base64"]) for r in json_records(ham_dir, 6)]
    metas = [{"age_approx": 50, "sex": "female", "anatom_site_general": "back"}] * len(images)
    ort = Predictor(bundle, onnx_package=package, onnx_runtime="onnxruntime")
    with caplog.at_level(logging.INFO, logger="model.inference.runtimes"):
        auto = Predictor(bundle, onnx_package=package, onnx_runtime="auto")
    expected = "openvino" if platform.machine().lower() in ("x86_64", "amd64") else "onnxruntime"
    assert (ort.runtime, auto.runtime) == ("onnxruntime", expected)
    if expected == "openvino":
        assert "OpenVINO: matches ONNX Runtime" in caplog.text
    a, b = ort.score(images, metas), auto.score(images, metas)
    assert max(abs(x.probability - y.probability) for x, y in zip(a, b, strict=True)) <= 1e-4
    assert [x.assessable for x in a] == [y.assessable for y in b]
    # an OpenVINO that answered differently would not be used (its outputs shifted here)
    real_run = runtimes.OpenVinoSession.run
    monkeypatch.setattr(
        runtimes.OpenVinoSession, "run", lambda self, names, feeds: [o + 0.01 for o in real_run(self, names, feeds)]
    )
    monkeypatch.setattr(runtimes.platform, "machine", lambda: "x86_64")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="model.inference.runtimes"):
        assert Predictor(bundle, onnx_package=package, onnx_runtime="auto").runtime == "onnxruntime"
    assert "differs from ONNX Runtime" in caplog.text
    with pytest.raises(ModelError, match="differs from ONNX Runtime"):
        Predictor(bundle, onnx_package=package, onnx_runtime="openvino")


def test_the_edge_scorer_imports_no_part_of_the_server(exported, ham_dir):
    """`dermascan-edge score` in a process of its own: JSON out, the server's answer, and not one
    module of TensorFlow, Keras, Flask, SQLAlchemy or Celery loaded."""
    from edge.scorer import EdgeScorer
    from model.inference.predictor import Predictor

    bundle, package = exported
    record = json_records(ham_dir, 1)[0]
    image = ROOT / "dermascan" / "examples" / "ISIC_0025188.jpg"
    code = (
        "import json, sys; from edge.cli import main; code = main(['score', sys.argv[1], '--package', sys.argv[2],"
        " '--age', '55', '--sex', 'male', '--site', 'lower extremity']);"
        f" loaded = [m for m in {FORBIDDEN!r} if m in sys.modules]; assert not loaded, loaded; sys.exit(code)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(image), str(package)], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["bundle_version"] == "tiny-edge" and set(out) >= {"probability", "referred", "assessable", "reason"}
    meta = EdgeScorer(package).prepare_metadata(
        {"age_approx": "55", "sex": "male", "anatom_site_general": "lower extremity"}
    )
    server = Predictor(bundle, batch_sizes=(1,)).score([image.read_bytes()], [meta])[0]
    assert abs(server.probability - out["score"]) <= 1e-4 and server.assessable == out["assessable"]
    assert record  # the HAM fixture is there (the export's own check used it)


def test_bad_input_to_the_edge_scorer_is_a_clear_error(exported, tmp_path):
    _, package = exported
    from edge.cli import main as edge_main

    assert edge_main(["score", str(tmp_path / "missing.jpg"), "--package", str(package)]) == 1
    assert edge_main(["score", str(ROOT / "README.md"), "--package", str(package), "--sex", "unknown-sex"]) == 2
    (tmp_path / "not-a-package").mkdir()
    assert edge_main(["score", str(ROOT / "README.md"), "--package", str(tmp_path / "not-a-package")]) == 2


def test_litert_and_int8_packages_are_smaller_and_check_themselves(exported, ham_dir, tmp_path):
    bundle, onnx = exported
    for args in (["--format", "litert"], ["--format", "onnx", "--int8"]):
        out = tmp_path / "-".join(a.strip("-") for a in args)
        result = CliRunner().invoke(main, ["export", str(bundle), *args, "--out", str(out), "--data", str(ham_dir)])
        check = json.loads((out / "check.json").read_text())
        assert result.exit_code == (0 if check["passed"] else 1), result.output
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["precision"] == ("int8" if "--int8" in args else "fp32")
        if "--format" in args and "litert" in args:
            assert check["passed"]  # fp32 LiteRT matches Keras within 1e-4
        else:  # weights stored as int8 (a network this tiny gains nothing in size: the shipped one does)
            assert b"DequantizeLinear" in (out / manifest["file"]).read_bytes() and "99 %" in check["rule"]
            assert manifest["gate"]["refitted"] and (out / "gate.npz").is_file()


def test_a_result_made_offline_is_uploaded_with_its_version_and_kept_beside_the_servers(
    pg_settings, app_factory, api_token, ham_dir
):
    _, token = api_token()
    client = app_factory(pg_settings).test_client()
    made = {"probability": 0.31, "referred": True, "assessable": True, "reason": None, "threshold": 0.06,
            "bundle_version": "ham10000-nasnet128-student-2026.12.02", "runtime": "onnxruntime",
            "precision": "int8", "made_at": "2026-12-01T09:14:00+00:00"}  # fmt: skip
    records = json_records(ham_dir, 3)
    records[0]["edge_result"] = made
    records[1]["edge_result"] = {**made, "probability": 7}  # refused, the rest kept
    reply = client.post("/api/v1/batches", headers={"Authorization": f"Bearer {token}"}, json={"records": records})
    assert reply.status_code == 201 and reply.json["accepted"] == 2 and reply.json["rejected"] == 1, reply.json
    bad = next(r for r in reply.json["records"] if r["status"] == "rejected")
    assert "edge_result.probability" in bad["reason"]
    first = next(r for r in reply.json["records"] if r["status"] == "accepted" and r["row"] == 1)
    study = client.get(f"/api/v1/studies/{first['study_id']}", headers={"Authorization": f"Bearer {token}"}).json
    assert (
        study["edge_result"]["bundle_version"] == made["bundle_version"] and study["edge_result"]["probability"] == 0.31
    )
    assert study["probability"] is None  # the server's own score comes from its own worker


def test_what_the_scorer_prints_is_what_the_api_takes(exported, embedded_settings, app_factory, capsys):
    """`dermascan-edge score`'s JSON, as printed, uploaded as a study's edge_result: accepted and
    kept (the image's local path is not)."""
    from dermascan.infra.db import session_factory
    from dermascan.security.accounts import create_token
    from dermascan.security.identity import get_or_create_program
    from edge.cli import main as edge_main

    _, package = exported
    image = ROOT / "dermascan" / "examples" / "ISIC_0025188.jpg"
    assert edge_main(["score", str(image), "--package", str(package), "--sex", "male"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["missing_fields"] == ["age_approx", "anatom_site_general"]
    with session_factory(embedded_settings.database_url)() as session, session.begin():
        _, token = create_token(session, get_or_create_program(session, "tablet").id, "tablet")
    client = app_factory(embedded_settings).test_client()
    record = {"external_id": "offline-1", "sex": "male", "image_base64": base64.b64encode(image.read_bytes()).decode(),
              "edge_result": printed}  # fmt: skip
    reply = client.post("/api/v1/batches", json={"records": [record]}, headers={"Authorization": f"Bearer {token}"})
    assert reply.status_code == 201 and reply.json["accepted"] == 1, reply.json
    study = client.get(
        f"/api/v1/studies/{reply.json['records'][0]['study_id']}", headers={"Authorization": f"Bearer {token}"}
    ).json
    kept = study["edge_result"]
    assert kept["score"] == pytest.approx(printed["score"]) and kept["bundle_version"] == printed["bundle_version"]
    assert "image" not in kept and kept["missing_fields"] == printed["missing_fields"]


def test_a_package_that_failed_its_check_is_not_scored_with_unless_asked(exported, tmp_path):
    import shutil

    from edge.scorer import EdgeScorer
    from model.errors import ModelError

    _, package = exported
    failed = tmp_path / "failed"
    shutil.copytree(package, failed)
    manifest = json.loads((failed / "manifest.json").read_text())
    manifest["check"] = {"n": 1073, "referral_agreement": 1062 / 1073, "auc_server": 0.883, "auc_edge": 0.882,
                         "passed": False, "rule": "referral decisions agree on >= 99 % of the held-out calibration set, AUC within 0.005"}  # fmt: skip
    (failed / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match=r"referrals agree 98\.97 % \(the rule: at least 99 %\)"):
        EdgeScorer(failed)
    assert EdgeScorer(failed, allow_failed_check=True).version == manifest["version"]


def test_gradcam_on_onnx_runtime_is_the_keras_gradcam(exported, ham_dir):
    """The serving processes' Grad-CAM (the ONNX file extended backwards, on ONNX Runtime) gives
    the feature maps, the log-odds' gradient and the heat map that Keras's GradientTape gives."""
    import numpy as np

    from model.inference.data import IsicDataset
    from model.inference.gradcam import GradCam, OnnxGradCam, for_predictor
    from model.inference.predictor import Predictor

    bundle, package = exported
    on_keras = Predictor(bundle, batch_sizes=(1,))
    on_onnx = Predictor(bundle, batch_sizes=(1,), onnx_package=package)
    keras_cam, onnx_cam = for_predictor(on_keras), for_predictor(on_onnx)
    assert isinstance(keras_cam, GradCam) and isinstance(onnx_cam, OnnxGradCam)
    dataset = IsicDataset.open(ham_dir, limit=4)
    records = dataset.metadata.to_dict("records")
    for image, record in zip(dataset.read_bytes(dataset.ids), records, strict=True):
        prepared = on_onnx.pre_process([image], [record])
        views = np.concatenate([prepared.pixels] * 2)
        meta = np.concatenate([prepared.meta] * 2)
        by_keras, by_onnx = keras_cam.features_and_gradients(views, meta), onnx_cam.features_and_gradients(views, meta)
        assert len(by_keras) == len(by_onnx) == 2  # the tiny bundle is an ensemble of its two folds
        for fk, gk in by_keras:  # the members, in whatever order each graph lists them
            fo, go = min(by_onnx, key=lambda pair, fk=fk: np.abs(pair[0] - fk).max())
            assert fo.shape == fk.shape and go.shape == gk.shape
            np.testing.assert_allclose(fo, fk, atol=1e-4 * max(1.0, np.abs(fk).max()))
            np.testing.assert_allclose(go, gk, atol=1e-4 * np.abs(gk).max())
        heat_keras, heat_onnx = (
            keras_cam.heatmap(prepared.pixels, prepared.meta),
            onnx_cam.heatmap(prepared.pixels, prepared.meta),
        )
        assert heat_onnx.shape == (32, 40) and np.abs(heat_onnx - heat_keras).max() < 1e-3


def _server_and_edge_feed_their_networks_alike(server, edge, images, records, prepared) -> None:
    """The edge scorer's network is given the server's prepared pixels, and both score the same."""
    import numpy as np

    fed, run = [], edge.run
    edge.run = lambda pixels, meta: fed.append(pixels.copy()) or run(pixels, meta)  # what the edge's network is given
    by_edge = [r["score"] for r in edge.score_many(images, records)]
    by_server = [s.probability for s in server.score(images, records)]
    np.testing.assert_allclose(by_edge, by_server, atol=1e-4)
    np.testing.assert_array_equal(fed[0][: len(images)], prepared.pixels)


def test_a_circular_field_of_view_is_filled_alike_on_the_server_and_the_edge(exported, ham_dir):
    """A contact dermatoscope's black surround (model.inference.field, which every new bundle's
    manifest asks for): the Predictor fills it before the network and so does the edge scorer, so
    both score the same; the score is the filled image's, not the black-cornered one's."""
    import io

    import numpy as np
    from PIL import Image

    from edge.scorer import EdgeScorer
    from model.inference.data import IsicDataset, decode_image
    from model.inference.predictor import Predictor
    from model.training.evaluate import shifted

    bundle, package = exported
    assert read_manifest(bundle)["preprocessing"]["field_of_view"]
    dataset = IsicDataset.open(ham_dir, limit=6)
    records = dataset.metadata[["age_approx", "sex", "anatom_site_general"]].to_dict("records")
    circular = []
    for image in dataset.read_bytes(dataset.ids):
        with Image.open(io.BytesIO(image)) as opened:
            pixels = np.asarray(opened.convert("RGB"))
        out = io.BytesIO()
        Image.fromarray(shifted(pixels[None], "field-of-view")[0]).save(out, "JPEG", quality=95)
        circular.append(out.getvalue())
    server, edge = Predictor(bundle), EdgeScorer(package)
    prepared = server.pre_process(circular, records)
    assert prepared.pixels[:, :2, :2].max(axis=-1).min() > 40  # filled: no black corner reaches the network
    _server_and_edge_feed_their_networks_alike(server, edge, circular, records, prepared)
    as_decoded = np.stack([decode_image(c, server.image_size) for c in circular])
    assert as_decoded[:, :2, :2].max() < 40  # the corners were black before the fill
    raw_filled, raw_black = (
        server.predict_raw(prepared.pixels, prepared.meta)[0],
        server.predict_raw(as_decoded, prepared.meta)[0],
    )
    assert np.abs(raw_filled - raw_black).max() > 1e-4  # the network's answer is the filled image's


def test_a_camera_clamp_fitted_on_the_development_images_is_applied_alike_on_the_server_and_the_edge(
    exported, ham_dir, tmp_path
):
    """dermascan camera-fit writes the development images' exposure and colour ranges into a copy of
    the bundle under a new version; its ONNX package carries them; a darker picture (another camera)
    is brightened towards the range before the network on the server and on the edge alike, while
    the quality checks measure it as it came and an image inside the range reaches the network as
    decoded."""
    import io
    import shutil

    import numpy as np
    from PIL import Image

    from edge.scorer import EdgeScorer
    from model.inference import camera, quality
    from model.inference.data import IsicDataset, decode_image
    from model.inference.predictor import Predictor

    source, _ = exported
    bundle = tmp_path / "bundle"
    shutil.copytree(source, bundle)
    same = CliRunner().invoke(main, ["camera-fit", str(bundle), "--data", str(ham_dir), "--version", "tiny-edge"])
    assert same.exit_code != 0 and "needs a new version" in same.output
    odd = ["camera-fit", str(bundle), "--data", str(ham_dir), "--version", "v2", "--exposure-percentile", "20:x"]
    refused = CliRunner().invoke(main, odd)
    assert refused.exit_code != 0 and "one percentile (20) or two" in refused.output
    result = CliRunner().invoke(
        main, ["camera-fit", str(bundle), "--data", str(ham_dir), "--version", "tiny-edge-camera"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = read_manifest(bundle)
    block = manifest["preprocessing"]["camera"]
    assert (
        manifest["version"] == "tiny-edge-camera"
        and manifest["weights_sha256"] == read_manifest(source)["weights_sha256"]
    )
    assert block["exposure"]["percentile"] == [20, 20] and block["colour_cast"]["percentile"] == 5
    assert 0.3 < block["development_images_moved"] < 0.8  # 20 % below, 20 % above, 5 %+5 % per colour ratio
    package = tmp_path / "onnx"
    result = CliRunner().invoke(
        main, ["export", str(bundle), "--format", "onnx", "--out", str(package), "--data", str(ham_dir)]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((package / "manifest.json").read_text())["preprocessing"]["camera"] == block

    dataset = IsicDataset.open(ham_dir, limit=8)
    records = dataset.metadata[["age_approx", "sex", "anatom_site_general"]].to_dict("records")
    darker = []
    for image in dataset.read_bytes(dataset.ids):
        with Image.open(io.BytesIO(image)) as opened:
            pixels = np.asarray(opened.convert("RGB"), np.float32)
        out = io.BytesIO()
        Image.fromarray(np.clip(np.rint(pixels * 0.6), 0, 255).astype(np.uint8)).save(out, "PNG")
        darker.append(out.getvalue())
    server, edge = Predictor(bundle), EdgeScorer(package)
    as_decoded = np.stack([decode_image(d, server.image_size) for d in darker])
    prepared = server.pre_process(darker, records)
    low = block["exposure"]["range"][0]
    assert np.all(camera.statistics(as_decoded)[0] < low)  # every one darker than the development range
    gain = prepared.pixels.astype(np.float64).mean(axis=(1, 2, 3)) / as_decoded.astype(np.float64).mean(axis=(1, 2, 3))
    assert np.all(gain > 1.05) and np.all(gain < camera.MAX_GAIN + 0.02)  # brightened, at most 25 %
    np.testing.assert_allclose(prepared.measured["brightness"], quality.measure(as_decoded)["brightness"])
    _server_and_edge_feed_their_networks_alike(server, edge, darker, records, prepared)
    raw_moved, raw_dark = (server.predict_raw(prepared.pixels, prepared.meta)[0], server.predict_raw(as_decoded, prepared.meta)[0])  # fmt: skip
    assert np.abs(raw_moved - raw_dark).max() > 1e-4  # the network's answer is the moved image's
    filled = server.fill(dataset.load_images(server.image_size))
    inside = np.flatnonzero(~np.any(np.abs(server.correct.gains(filled) - 1) > 1e-6, axis=1))
    assert len(inside)  # some of the pictures as taken are inside every range: they reach the network as decoded
    as_taken = server.pre_process(dataset.read_bytes([dataset.ids[i] for i in inside]), [records[i] for i in inside])
    np.testing.assert_array_equal(as_taken.pixels, filled[inside])


def test_a_worker_s_inference_threads_reach_its_forward_pass_and_its_heat_maps(exported, ham_dir, tmp_path):
    """DERMASCAN_INFERENCE_THREADS: the threads of one call of the worker's forward pass (ONNX
    Runtime, or OpenVINO unpinned, so that single-threaded worker processes spread over the cores)
    and of its Grad-CAM; the scores are those of the runtime on every core; 0 threads is refused."""
    import platform
    import shutil

    from dermascan.config import Settings
    from model.errors import ModelError
    from model.inference.gradcam import for_predictor
    from model.inference.loader import package_folder
    from model.inference.predictor import Predictor
    from worker.runtime import load_predictor, packages_dir

    bundle, package = exported

    settings = Settings.from_env(
        env={"DERMASCAN_INFERENCE_THREADS": "1", "DERMASCAN_RUNTIME": "auto", "DERMASCAN_TTA": "0"},
        data_dir=tmp_path, model_bundle=bundle,
    )  # fmt: skip
    assert settings.inference_threads == 1 and Settings.from_env(env={}).inference_threads == 0
    # the package as `dermascan bundle register` leaves it in the data folder, then loaded as a worker does
    shutil.copytree(package, package_folder(packages_dir(settings), read_manifest(bundle)))
    one = load_predictor(settings)
    assert one.threads == 1
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert one.runtime == "openvino"
        assert one._onnx.compiled.get_property("INFERENCE_NUM_THREADS") == 1
        assert one._onnx.compiled.get_property("ENABLE_CPU_PINNING") is False
    assert for_predictor(one).session.get_session_options().intra_op_num_threads == 1
    on_ort = Predictor(bundle, onnx_package=package, onnx_runtime="onnxruntime", threads=1)
    assert on_ort._onnx.session.get_session_options().intra_op_num_threads == 1
    every_core = Predictor(bundle, onnx_package=package, onnx_runtime="onnxruntime")
    images = [base64.b64decode(r["image_base64"]) for r in json_records(ham_dir, 6)]
    metas = [{"age_approx": 60, "sex": "male", "anatom_site_general": "trunk"}] * len(images)
    for threaded in (one, on_ort):
        a, b = threaded.score(images, metas), every_core.score(images, metas)
        assert max(abs(x.probability - y.probability) for x, y in zip(a, b, strict=True)) <= 1e-4
    with pytest.raises(ModelError, match="inference threads 0"):
        Predictor(bundle, onnx_package=package, onnx_runtime="onnxruntime", threads=0)
