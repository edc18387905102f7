"""Illumination correction against values derived from the recipe (DESIGN.md §5), not from our code.

CellProfiler's function as used in JUMP production: average the plate's images, downsample x0.2,
median filter of size 20 at that scale (100 px at full resolution), upsample back, floor at the
robust minimum (2nd percentile of the positive values) and divide by it.  Each test below states
the property of that recipe it checks and why the expected numbers follow from it.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import save

from phenoprofiler_core.errors import DataError, ImageError
from phenoprofiler_core.illumination import check_image, illumination_function, mean_image, robust_rescale

# ----------------------------------------------------------------------------- robust_rescale


def test_robust_rescale_by_hand():
    # Values 0..10: the positive ones are 1..10 (10 values).  numpy's linear quantile at q = 0.02:
    # index 0.02 * 9 = 0.18 -> 1 + 0.18 * (2 - 1) = 1.18.  Floor at 1.18, divide by it.
    function = np.arange(11, dtype=np.float64).reshape(1, 11)
    out = robust_rescale(function, 0.02)
    expected = np.maximum(np.arange(11), 1.18) / 1.18
    assert out.dtype == np.float32 and out.shape == (1, 11)
    np.testing.assert_allclose(out, expected.reshape(1, 11), rtol=1e-6)
    assert out[0, 0] == 1.0 and out[0, 1] == 1.0  # zero and values below the floor become exactly 1


def test_robust_rescale_quantile_option_and_default_by_hand():
    # q = 0.5 of 1..10: index 4.5 -> 5.5.  Values <= 5.5 become 1, 10 becomes 10/5.5.
    function = np.arange(11, dtype=np.float64).reshape(11, 1)
    out = robust_rescale(function, 0.5)
    np.testing.assert_allclose(out[:, 0], np.maximum(np.arange(11), 5.5) / 5.5, rtol=1e-6)
    # The default quantile is the 2nd percentile (same result as asking for 0.02 explicitly).
    np.testing.assert_array_equal(robust_rescale(function), robust_rescale(function, 0.02))


def test_robust_rescale_ignores_zeros_and_negatives():
    # Half the pixels are 0 (e.g. a masked border), some negative: the robust minimum is taken over
    # the positive values 4, 5, 6, 7 only: q = 0.02 -> index 0.06 -> 4.06.
    function = np.array([[0.0, 0.0, 0.0, -3.0], [4.0, 5.0, 6.0, 7.0]])
    out = robust_rescale(function, 0.02)
    np.testing.assert_allclose(out, np.maximum(function, 4.06) / 4.06, rtol=1e-6)


def test_robust_rescale_of_a_blank_average_is_an_error():
    message = r"^illumination average is zero everywhere \(all images blank\?\)$"
    with pytest.raises(DataError, match=message):
        robust_rescale(np.zeros((4, 4)))
    with pytest.raises(DataError, match=message):
        robust_rescale(-np.ones((4, 4)))


# ----------------------------------------------------------------------------- mean_image


def test_mean_image_by_hand(tmp_path):
    a = np.array([[0, 2], [4, 6]], dtype=np.uint16)
    b = np.array([[2, 2], [0, 10]], dtype=np.uint16)
    c = np.array([[1, 5], [2, 2]], dtype=np.uint16)
    paths = [save(x, tmp_path / f"{name}.tif") for name, x in zip("abc", (a, b, c))]
    mean = mean_image(paths)
    # (0+2+1)/3 = 1, (2+2+5)/3 = 3, (4+0+2)/3 = 2, (6+10+2)/3 = 6
    assert mean.dtype == np.float64
    np.testing.assert_array_equal(mean, [[1.0, 3.0], [2.0, 6.0]])


def test_mean_image_does_not_overflow_8_bit(tmp_path):
    # 200 + 250 would wrap to 194 in uint8; the mean must be 225 (a float accumulator).
    paths = [
        save(np.full((3, 3), 200, np.uint8), tmp_path / "a.png"),
        save(np.full((3, 3), 250, np.uint8), tmp_path / "b.png"),
    ]
    np.testing.assert_array_equal(mean_image(paths), np.full((3, 3), 225.0))


def test_mean_image_of_nothing_is_an_error():
    with pytest.raises(DataError, match=r"^no images to average$"):
        mean_image([])


def test_mean_image_progress_goes_to_stderr_only_when_asked(tmp_path, capsys):
    paths = [save(np.ones((2, 2), np.uint16), tmp_path / f"{k}.tif") for k in range(3)]
    mean_image(paths)
    assert capsys.readouterr().err == ""
    mean_image(paths, progress=True)
    assert "averaging" in capsys.readouterr().err


def test_check_image_messages_name_the_file_and_both_sizes():
    image = np.zeros((40, 48), np.uint16)  # 40 rows x 48 columns = 48x40 px
    check_image(image, "same.tif", shape=(40, 48), dtype=np.uint16)  # consistent: no error
    with pytest.raises(
        ImageError, match=r"^image odd\.tif is 48x40 px; the other images of this plate are 50x30$"
    ):
        check_image(image, "odd.tif", shape=(30, 50))
    with pytest.raises(
        ImageError, match=r"^image deep\.tif is uint16; the other images of this plate are uint8"
    ):
        check_image(image, "deep.tif", dtype=np.dtype(np.uint8))
    check_image(np.ones((3, 3), np.float32), "finite.tif")  # float images are fine when finite
    bad = np.ones((3, 3), np.float32)
    bad[1, 1] = np.inf
    with pytest.raises(ImageError, match=r"inf\.tif contains NaN or infinite"):
        check_image(bad, "inf.tif")


# ----------------------------------------------------------------------------- illumination_function


def test_flat_average_gives_a_function_of_ones():
    # A flat plate needs no correction: every step keeps a constant, the robust minimum is that
    # constant, so the function is exactly 1 everywhere, at full resolution (odd sizes too).
    for shape in [(250, 250), (123, 77)]:
        out = illumination_function(np.full(shape, 321.0))
        assert out.shape == shape and out.dtype == np.float32
        np.testing.assert_allclose(out, 1.0, rtol=1e-6)


def test_linear_vignetting_is_kept_exactly_away_from_the_borders():
    # A median filter keeps a linear ramp unchanged (the window's middle value is the centre pixel's),
    # and so do the Gaussian anti-aliasing and the linear up/down sampling away from the image border.
    # So for average(y, x) = 100 + x the function is (100 + x) / m with one constant m: the ratio of
    # any two interior columns is (100 + x1) / (100 + x2).  The robust minimum m is near the 2nd
    # percentile of the ramp, 100 + 4.98 (each column holds 250 of the 62,500 pixels).
    x = np.arange(250, dtype=np.float64)
    average = np.tile(100.0 + x, (250, 1))
    out = illumination_function(average).astype(np.float64)
    interior = out[20:230, 20:230]
    expected_ratio = (100.0 + x[20:230]) / (100.0 + 125.0)
    np.testing.assert_allclose(interior / out[20:230, 125:126], np.tile(expected_ratio, (210, 1)), rtol=2e-3)
    m = (100.0 + 125.0) / out[125, 125]
    assert 103.0 < m < 107.0, m


def test_median_not_mean_removes_cells_and_keeps_the_level_step():
    # Left half background 100, right half 300 (a steep illumination difference), plus a fine pattern
    # of bright objects (+400, 5 px wide every 40 px at x = 20..24 mod 40, i.e. 12.5 % of the pixels,
    # like cells).  At the x0.2 scale an object is one bright sample and two partly bright ones (the
    # anti-aliasing blur) every 8 samples: at most 8 of the 20 samples across a median window, fewer
    # than half, so the median is the background.  Away from the step (whose windows mix both halves)
    # the function is therefore flat within each half, and the halves differ by exactly 300/100.  A
    # mean filter would add the objects' average (+50) instead: (300+50)/(100+50) = 2.33.
    x = np.arange(250)
    average = np.where(x < 125, 100.0, 300.0)[None, :] + np.where(x % 40 // 5 == 4, 400.0, 0.0)[None, :]
    average = np.repeat(average, 250, axis=0)
    out = illumination_function(average).astype(np.float64)
    left, right = out[:, 10:60], out[:, 190:240]
    # (1e-3: the Gaussian's far tail lifts the background samples by ~0.03 of 100)
    np.testing.assert_allclose(left, 1.0, rtol=1e-3)  # the left background is the robust minimum
    np.testing.assert_allclose(right, 3.0, rtol=1e-3)
    # Linear upsampling goes from one level to the other without overshoot (a spline would ring).
    assert out.min() >= 1.0 and out[:, 100:160].max() <= 3.0 * 1.001


def test_an_image_smaller_than_the_downsampling_step_gives_a_flat_function():
    # 4 x 4 px at x0.2 is 0.8 px: one pixel (never zero) holds the whole image, so nothing can vary.
    average = np.arange(16, dtype=np.float64).reshape(4, 4) + 10.0
    out = illumination_function(average)
    assert out.shape == (4, 4)
    np.testing.assert_allclose(out, 1.0, rtol=1e-6)


def test_isolated_bright_pixels_leave_the_function_flat():
    # Sparse bright specks (0.03 % of the pixels) never reach half of a median window: the function
    # of a flat background with specks is exactly flat.  A mean filter would show a bump per speck.
    rng = np.random.default_rng(0)
    average = np.full((250, 250), 100.0)
    average[rng.integers(10, 240, 20), rng.integers(10, 240, 20)] = 20000.0
    out = illumination_function(average)
    np.testing.assert_allclose(out, 1.0, rtol=1e-6)


def test_detail_finer_than_the_downsampling_is_averaged_not_aliased():
    # Downsampling x0.2 must average each 5 px neighbourhood (skimage's anti-aliasing: a Gaussian of
    # sigma (1/0.2 - 1)/2 = 2 px before sampling at columns 5j+2), not pick one pixel of it.  Lines
    # 1 px wide every 5 px, 1000 on a background of 100: on the left half at columns 5k+2 (where the
    # samples fall), on the right half at 5k (2 and 3 px from the samples).  With the blur a sample
    # sees 100 + 900 * 0.1995 * sum(exp(-d^2/8)) over the lines at distance d: left d = 0, +-5, ...
    # -> 100 + 900 * 0.217 = 295; right d = 2, 3, 7, 8 -> 100 + 900 * 0.186 = 268: within 10 %.
    # Picking every 5th pixel would see 1000 on the left and 100 on the right: ten times.
    x = np.arange(250)
    lines = np.where(x < 125, x % 5 == 2, x % 5 == 0)
    average = np.repeat(np.where(lines, 1000.0, 100.0)[None, :], 250, axis=0)
    out = illumination_function(average).astype(np.float64)
    left, right = np.median(out[:, 10:60]), np.median(out[:, 190:240])
    assert left / right == pytest.approx(295.3 / 267.6, rel=0.01)


def test_defaults_are_the_published_recipe():
    # DESIGN.md §5 / CellProfiler in JUMP: downsample 0.2, median size 20, robust quantile 0.02.
    # The defaults must give the same function as asking for those values, and each value must
    # matter on this average (so the comparison could fail).
    yy, xx = np.mgrid[:200, :240]
    average = 200.0 + 150.0 * np.exp(-((yy - 90.0) ** 2 + (xx - 130.0) ** 2) / 60.0**2)
    average = average + np.where((xx % 37 < 6) & (yy % 29 < 5), 800.0, 0.0)
    default = illumination_function(average)
    explicit = illumination_function(average, downsample=0.2, median_size=20, robust_quantile=0.02)
    np.testing.assert_array_equal(default, explicit)
    for other in [{"downsample": 0.25}, {"median_size": 10}, {"robust_quantile": 0.05}]:
        changed = illumination_function(average, **{**dict(downsample=0.2, median_size=20), **other})
        assert np.abs(changed - default).max() > 1e-3, other
