"""The not-assessable gate and calibrated probabilities: pure logic on real HAM10000 images and
the negatives the gate is checked with, then end to end through the REST API, a real worker,
PostgreSQL and Redis."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import requests
from PIL import Image

from dermascan.screening import referral_policy
from model.inference import calibration, quality
from model.inference.data import IsicDataset, resize
from model.inference.ood import FeatureDistance
from model.training import gate_data
from tests.ham_files import json_records, read_csv_text
from tests.services import wait_for_batch


@pytest.fixture(scope="module")
def ham_pixels(ham_dir):
    dataset = IsicDataset.open(ham_dir, limit=600)
    sizes = np.zeros((600, 2), np.float32)
    return dataset.load_images(128, sizes=sizes), sizes


# -- quality checks -------------------------------------------------------------------------------


def test_quality_thresholds_pass_real_dermoscopy_and_catch_unusable_frames(ham_pixels):
    pixels, sizes = ham_pixels
    fit, held = slice(0, 400), slice(400, 600)
    thresholds = quality.fit_thresholds(quality.measure(pixels[fit], sizes[fit]))
    assert thresholds.failures(quality.measure(pixels[held], sizes[held])).count(None) == 200
    frames = {
        "gray card": np.full((300, 400, 3), 128, np.uint8),
        "white frame": np.full((300, 400, 3), 255, np.uint8),
        "black frame": np.zeros((300, 400, 3), np.uint8),
        "rgb noise": np.random.default_rng(0).integers(0, 256, (300, 400, 3)).astype(np.uint8),
        "blurred lesion": np.asarray(Image.fromarray(pixels[450]).resize((16, 16)).resize((400, 300))),
        "tiny": pixels[451][:20, :20],
        "grey-scale lesion": np.repeat(pixels[452].mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2),
    }
    found = thresholds.failures(
        quality.measure(
            np.stack([resize(f, 128) for f in frames.values()]),
            np.array([[f.shape[1], f.shape[0]] for f in frames.values()]),
        )
    )
    reasons = dict(zip(frames, found, strict=True))
    assert reasons["gray card"].startswith("no contrast")
    assert reasons["white frame"] == "overexposed"
    assert reasons["black frame"] == "too dark"
    assert reasons["rgb noise"] == "too noisy"
    assert reasons["blurred lesion"] == "blurred"
    assert reasons["tiny"] == "image too small"
    assert "no colour" in reasons["grey-scale lesion"]
    again = quality.QualityThresholds.from_dict(thresholds.to_dict())
    assert again.failures(quality.measure(pixels[held], sizes[held])).count(None) == 200


def test_the_measures_of_a_batch_are_each_images_own_measures(ham_pixels):
    """Measured a few images at a time, with the block means written out: the same bits as one
    image at a time and as the strided mean, at square, oblong and odd sizes."""
    pixels, sizes = ham_pixels
    for size in (128, [144, 192], [97, 131]):
        batch = np.stack([resize(p, size) for p in pixels[:61]])  # not a multiple of the chunk
        together = quality.measure(batch, sizes[:61])
        alone = [quality.measure(batch[i : i + 1], sizes[i : i + 1]) for i in range(len(batch))]
        for key, values in together.items():
            assert np.array_equal(values, np.concatenate([a[key] for a in alone])), (size, key)
        luma = quality._luma(batch)
        n, h, w = len(luma), luma.shape[1] // 2 * 2, luma.shape[2] // 2 * 2
        strided = luma[:, :h, :w].reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
        assert np.array_equal(quality._half(luma), strided), size


def test_default_thresholds_of_bundles_without_a_gate(ham_pixels):
    """Old bundles: the resolution-free checks only; real dermoscopy passes at any input size."""
    pixels, sizes = ham_pixels
    defaults = quality.QualityThresholds()
    for size in (32, 128):
        small = np.stack([resize(p, size) for p in pixels])
        assert defaults.failures(quality.measure(small, sizes)).count(None) == len(pixels)
    frames = np.stack([np.full((128, 128, 3), v, np.uint8) for v in (0, 128, 255)])
    assert defaults.failures(quality.measure(frames)) == [
        "too dark",
        "no contrast (blank or uniform image)",
        "overexposed",
    ]
    assert quality.QualityThresholds.from_dict(defaults.to_dict()) == defaults  # infinite limits survive JSON


def test_degraded_lesions_fail_the_quality_checks(ham_pixels, ham_dir):
    pixels, sizes = ham_pixels
    thresholds = quality.fit_thresholds(quality.measure(pixels, sizes))
    dataset = IsicDataset.open(ham_dir, limit=40)
    originals = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in dataset.read_bytes(dataset.ids)]
    kinds, images = zip(*gate_data.degraded(np.stack(originals)), strict=True)
    found = thresholds.failures(quality.measure(np.stack([resize(i, 128) for i in images])))
    assert all(found), [k for k, f in zip(kinds, found, strict=True) if f is None]


# -- feature distance -------------------------------------------------------------------------------


def test_feature_distance_threshold_and_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    inside = rng.normal(size=(2000, 40)) @ rng.normal(size=(40, 40))
    held = rng.normal(size=(500, 40)) @ rng.normal(size=(40, 40))
    distance = FeatureDistance.fit(inside, components=16)
    distance.choose_threshold(inside[:500], 0.02)
    assert np.mean(distance.score(inside[:500]) > distance.threshold) <= 0.02
    far = inside[:200] + rng.normal(0, 25, size=(200, 40))
    assert np.mean(distance.score(far) > distance.threshold) > 0.95
    distance.save(tmp_path / "gate.npz")
    again = FeatureDistance.load(tmp_path / "gate.npz")
    np.testing.assert_allclose(again.score(held), distance.score(held), rtol=1e-4)
    assert again.threshold == pytest.approx(distance.threshold)


def test_the_lesion_check_separates_what_it_learned_and_flags_at_its_rate(tmp_path):
    """The explicit is-this-dermoscopy check on made-up features: lesions in one region, other
    pictures offset along a few directions the distance's PCA keeps; the threshold flags its rate
    of held-out lesions, most of the other pictures, and survives a save and load."""
    from model.inference.ood import LesionCheck

    rng = np.random.default_rng(2)
    mix = rng.normal(size=(40, 40))
    lesions, held = rng.normal(size=(2000, 40)) @ mix, rng.normal(size=(600, 40)) @ mix
    shift = np.zeros(40)
    shift[:3] = 2.5
    others = (rng.normal(size=(300, 40)) + shift) @ mix
    fresh = (rng.normal(size=(300, 40)) + shift) @ mix
    check = LesionCheck.fit(lesions, others, components=40)
    check.choose_threshold(held, 0.01)
    assert np.mean(check.score(held) < check.threshold) <= 0.012
    assert np.mean(check.score(fresh) < check.threshold) > 0.85
    check.save(tmp_path / "lesion_check.npz")
    again = LesionCheck.load(tmp_path / "lesion_check.npz")
    np.testing.assert_allclose(again.score(fresh), check.score(fresh), rtol=1e-4, atol=1e-4)


# -- calibration ------------------------------------------------------------------------------------


def test_calibration_is_chosen_by_held_out_log_loss_and_stays_monotone():
    rng = np.random.default_rng(1)
    y = (rng.random(3000) < 0.2).astype(int)
    truth = np.where(y == 1, rng.beta(5, 2, y.size), rng.beta(2, 5, y.size))
    raw = truth**3  # overconfident low scores: a monotone distortion of a well-ranked score
    chosen, report = calibration.choose(y, raw)
    assert chosen.method != "none"
    assert report[chosen.method]["cv_log_loss"] == min(r["cv_log_loss"] for r in report.values())
    assert calibration.ece(y, chosen(raw)) < calibration.ece(y, raw)
    grid = np.linspace(0, 1, 501)
    for method in calibration.METHODS:
        mapped = calibration.Calibrator.fit(method, y, raw)(grid)
        assert np.all(np.diff(mapped) >= -1e-12), method
    # a map fitted to scores that rank backwards still increases (never flips the ranking)
    assert np.all(np.diff(calibration.Calibrator.fit("platt", 1 - y, raw)(grid)) >= 0)
    again = calibration.Calibrator.from_dict(chosen.to_dict())
    np.testing.assert_allclose(again(raw), chosen(raw))
    with pytest.raises(ValueError):
        calibration.Calibrator.from_dict({"method": "magic"})


def test_prior_shift_moves_the_probability_with_the_prevalence():
    p = np.array([0.05, 0.2, 0.5, 0.9])
    low = calibration.at_prevalence(p, 0.19, 0.02)
    assert np.all(low < p) and np.all(np.diff(low) > 0)
    np.testing.assert_allclose(calibration.at_prevalence(p, 0.19, 0.19), p)
    with pytest.raises(ValueError):
        calibration.at_prevalence(p, 0.19, 0.0)


# -- the referral rule --------------------------------------------------------------------------------


def test_referral_policy_never_clears_an_image_it_cannot_assess():
    assert referral_policy.decide(0.01, 0.1, assessable=False).category == "not_assessable"
    assert referral_policy.decide(0.99, 0.1, assessable=False).category == "not_assessable"
    assert referral_policy.decide(0.05, 0.1) is None
    assert referral_policy.decide(0.1, 0.1) == referral_policy.Referral("high_risk", 3)
    assert referral_policy.decide(0.6, 0.1).tier == 2 and referral_policy.decide(0.8, 0.1).tier == 1


def test_the_follow_up_reasons_have_their_own_tiers():
    """Newly high risk is seen first; changed since last visit (below the threshold) after every
    high-risk tier; a change never clears an image it cannot assess, nor lowers a high risk."""
    assert referral_policy.decide(0.2, 0.1, newly_high_risk=True) == referral_policy.Referral("newly_high_risk", 0)
    assert referral_policy.decide(0.9, 0.1, newly_high_risk=False).category == "high_risk"
    assert referral_policy.decide(0.05, 0.1, changed=True) == referral_policy.Referral("changed", 4)
    assert referral_policy.decide(0.05, 0.1, newly_high_risk=False, changed=False) is None
    assert referral_policy.decide(0.9, 0.1, changed=True) == referral_policy.Referral("high_risk", 1)
    assert referral_policy.decide(0.05, 0.1, assessable=False, changed=True).category == "not_assessable"
    tiers = [referral_policy.NEWLY_HIGH_RISK_TIER, *[t for _, t in referral_policy.TIERS],
             referral_policy.LOW_HIGH_RISK_TIER, referral_policy.CHANGED_TIER]  # fmt: skip
    assert tiers == sorted(set(tiers)) and referral_policy.NOT_ASSESSABLE_TIER == 3  # as before follow-up


# -- end to end -----------------------------------------------------------------------------------------


def _b64_image(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_unusable_images_come_back_not_assessable_and_go_to_the_specialists(
    pg_settings, live_server, start_worker, api_token, ham_dir
):
    """A gray card and a black frame through the REST API: done, ``assessable: false`` with a
    reason, no probability and no referral decision, in JSON and CSV; each waits in the
    specialists' queue as "not assessable"; real lesions are assessable."""
    from dermascan.infra.db import session_factory
    from dermascan.infra.schema import Referral

    server = live_server(pg_settings)
    _, token = api_token()
    headers = {"Authorization": f"Bearer {token}"}
    records = json_records(ham_dir, 3)
    records.append({"external_id": "gray-card", "image_base64": _b64_image(np.full((300, 400, 3), 128, np.uint8))})
    records.append({"external_id": "black-frame", "image_base64": _b64_image(np.zeros((300, 400, 3), np.uint8))})
    reply = requests.post(f"{server.url}/api/v1/batches", headers=headers, json={"records": records}, timeout=60)
    assert reply.status_code == 201, reply.text
    batch_id = reply.json()["batch_id"]
    start_worker(pg_settings)

    status = wait_for_batch(server.url, headers, batch_id, 300, "batch scored")
    assert status["counts"]["done"] == 5 and status["counts"]["not_assessable"] == 2
    results = requests.get(f"{server.url}/api/v1/batches/{batch_id}/results", headers=headers, timeout=30).json()
    by_id = {r["external_id"]: r for r in results["results"]}
    assert by_id["gray-card"]["assessable"] is False
    assert by_id["gray-card"]["not_assessable_reason"].startswith("no contrast")
    assert by_id["black-frame"]["not_assessable_reason"] == "too dark"
    for bad in ("gray-card", "black-frame"):
        row = by_id[bad]
        assert row["status"] == "done" and row["probability"] is None and row["referred"] is None
        assert row["referral_category"] == "not_assessable"
    lesions = [r for r in results["results"] if r["external_id"].startswith("ISIC_")]
    assert len(lesions) == 3 and all(r["assessable"] is True and r["probability"] is not None for r in lesions)
    assert all(r["referred"] is (r["referral_category"] == "high_risk") for r in lesions)
    one = requests.get(f"{server.url}/api/v1/studies/{by_id['gray-card']['study_id']}", headers=headers, timeout=30)
    assert one.json()["assessable"] is False
    csv_rows = read_csv_text(
        requests.get(f"{server.url}/api/v1/batches/{batch_id}/results?format=csv", headers=headers, timeout=30).text
    )
    csv_by_id = {r["external_id"]: r for r in csv_rows}
    assert csv_by_id["black-frame"]["assessable"] == "False" and csv_by_id["black-frame"]["probability"] == ""
    assert csv_by_id["black-frame"]["not_assessable_reason"] == "too dark"
    with session_factory(pg_settings.database_url)() as session:
        queued = {r.study_id: r for r in session.query(Referral).all()}
    for bad in ("gray-card", "black-frame"):
        referral = queued[by_id[bad]["study_id"]]
        assert referral.category == "not_assessable" and referral.status.value == "open"
    # a specialist sees them in the queue in their own category, and the case page says why
    import re

    from dermascan.security.accounts import create_user
    from dermascan.security.identity import get_or_create_program

    with session_factory(pg_settings.database_url)() as session, session.begin():
        create_user(session, "dr-check", "long-enough-pass", "specialist", get_or_create_program(session, "s").id)
    browser = requests.Session()
    token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', browser.get(f"{server.url}/login").text)
    browser.post(
        f"{server.url}/login",
        data={"username": "dr-check", "password": "long-enough-pass", "csrf_token": token.group(1)},
        timeout=30,
    )
    queue = browser.get(f"{server.url}/referrals/", timeout=30).text
    assert 'id="waiting-not-assessable">2<' in queue and "not assessable — check the image" in queue
    case = browser.get(f"{server.url}/referrals/{queued[by_id['black-frame']['study_id']].id}", timeout=30).text
    assert 'id="not-assessable-reason">too dark<' in case and 'id="probability"' not in case
