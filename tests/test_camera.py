"""The camera clamp (model.inference.camera): pure logic on made-up pixels."""

from __future__ import annotations

import numpy as np
import pytest

from model.inference import camera


def _images(n: int, level: float, cast=(1.0, 1.0, 1.0), seed: int = 0) -> np.ndarray:
    """``n`` textured images around ``level`` (0–255), each channel scaled by ``cast``."""
    rng = np.random.default_rng(seed)
    base = level * (0.7 + 0.3 * rng.random((n, 24, 32, 1)))
    return np.clip(np.rint(base * np.asarray(cast)), 0, 255).astype(np.uint8)


def test_the_statistics_are_the_median_of_the_brightest_channel_and_shades_of_gray():
    x = np.random.default_rng(1).integers(0, 256, (37, 20, 30, 3), dtype=np.uint8)  # over a chunk: parts joined
    exposure, cast = camera.statistics(x)
    f = x.astype(np.float64)
    np.testing.assert_allclose(exposure, np.median(f.max(axis=-1).reshape(37, -1), axis=1))
    norm = np.mean((f / 255).reshape(37, -1, 3) ** 6, axis=1) ** (1 / 6) * 255
    np.testing.assert_allclose(cast, np.log(norm[:, [0, 2]] / norm[:, [1]]), atol=1e-5)


def test_an_image_inside_the_range_is_left_exactly_as_it_is_and_one_outside_moves_to_its_edge():
    development = np.concatenate([_images(50, 150 + 2 * i, seed=i) for i in range(10)])
    block = camera.fit(development, 20, 5)
    low, high = block["exposure"]["range"]
    clamp = camera.CameraClamp(block)
    inside = _images(4, (low + high) / 2 / 0.85, seed=99)  # texture mean 0.85 of the level
    assert np.all((camera.statistics(inside)[0] > low) & (camera.statistics(inside)[0] < high))
    assert clamp(inside) is inside  # nothing moved: not even a copy
    dark = _images(4, 0.9 * low / 0.85, seed=98)
    moved = clamp(dark)
    assert np.abs(camera.statistics(moved)[0] - low).max() <= 2  # at the range's low end (rounding)
    bright = _images(4, 1.1 * high / 0.85, seed=97)
    assert np.abs(camera.statistics(clamp(bright))[0] - high).max() <= 2
    very_dark = _images(2, 0.3 * low / 0.85, seed=96)  # far outside: at most +25 %
    gains = clamp.gains(very_dark)
    np.testing.assert_allclose(gains, camera.MAX_GAIN)
    assert camera.statistics(clamp(very_dark))[0].max() < 0.4 * low  # still dark: the gate judges it as it came


def test_a_cooler_white_balance_is_moved_back_towards_the_development_colours():
    development = np.concatenate(
        [_images(40, 150, cast=(1.0 + 0.01 * i, 1.0, 1.0 - 0.01 * i), seed=i + 5) for i in range(-5, 6)]
    )
    block = camera.fit(development, 0, 5)
    assert "exposure" not in block and "colour_cast" in block
    cooler = _images(6, 150, cast=(0.85, 1.0, 1.15), seed=7)
    before = camera.statistics(cooler)[1]
    after = camera.statistics(camera.CameraClamp(block)(cooler))[1]
    (r_low, b_low), (r_high, b_high) = block["colour_cast"]["range"]
    assert np.all(before[:, 0] < r_low) and np.all(before[:, 1] > b_high)
    np.testing.assert_allclose(after[:, 0], r_low, atol=0.01)
    np.testing.assert_allclose(after[:, 1], b_high, atol=0.01)


def test_a_manifest_without_the_clamp_leaves_the_pixels_and_a_bad_range_is_refused():
    x = _images(2, 100)
    assert camera.for_manifest({})(x) is x
    assert camera.for_manifest({"preprocessing": {"field_of_view": "…"}})(x) is x
    with pytest.raises(ValueError, match="low end is above"):
        camera.CameraClamp({"exposure": {"range": [200, 100]}})
    with pytest.raises(ValueError, match="max_gain"):
        camera.CameraClamp({"exposure": {"range": [100, 200]}, "max_gain": 0.5})


def test_an_open_side_leaves_the_brightest_images_alone_and_survives_the_manifest():
    import json

    development = np.concatenate([_images(50, 150 + 2 * i, seed=i) for i in range(10)])
    block = json.loads(json.dumps(camera.fit(development, (20, 0), 0)))  # as written to and read from a manifest
    assert block["exposure"]["percentile"] == [20, 0] and block["exposure"]["range"][1] is None
    assert "colour_cast" not in block
    clamp = camera.for_manifest({"preprocessing": {"camera": block}})
    bright = _images(3, 250, seed=5)
    assert clamp(bright) is bright
    dark = _images(3, 0.9 * block["exposure"]["range"][0] / 0.85, seed=6)
    assert np.all(camera.statistics(clamp(dark))[0] > camera.statistics(dark)[0])


def test_a_colour_cast_beyond_the_largest_gain_is_left_for_the_gate():
    development = np.concatenate(
        [_images(40, 150, cast=(1.0 + 0.01 * i, 1.0, 1.0 - 0.01 * i), seed=i + 5) for i in range(-5, 6)]
    )
    clamp = camera.CameraClamp(camera.fit(development, 0, 5))
    green = _images(3, 150, cast=(0.5, 1.0, 0.5), seed=8)  # a photograph's cast, not a dermatoscope's
    assert clamp(green) is green
    cooler = _images(3, 150, cast=(0.9, 1.0, 1.1), seed=9)
    assert np.all(np.abs(clamp.gains(cooler) - 1).max(axis=1) > 0.02)  # a white balance's: moved
