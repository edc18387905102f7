"""Tile arithmetic against values worked out on paper: the histogram percentiles, the rescale to the
storage type, the resize (bilinear, anti-aliased only when shrinking), illumination division.

Expected numbers are derived in the comments from the definitions (bin = int((x - low) * bins /
(high - low)) clipped to the bins; percentile rank q/100 * (N - 1) located in the cumulative counts
and interpolated inside its bin at (rank - before + 1/2) / count; torch's anti-aliased bilinear is
the triangle filter of half-width = scale factor, PIL's rule).
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from phenoprofiler_core.errors import ImageError
from phenoprofiler_core.tiles import (
    DTYPE_SCALE,
    ChannelHistogram,
    ChannelRange,
    _value_range,
    as_float,
    corrected_plane,
    rescale,
    resize_stack,
)

# ----------------------------------------------------------------------------- histogram


def test_histogram_bins_by_hand():
    h = ChannelHistogram(2, 0.0, 10.0, bins=10)  # one bin per unit
    # 0.5 -> 0, 1.5 -> 1 (twice), 9.99 -> 9, 12 -> 12 clipped to 9, -1 -> -1 clipped to 0
    h.add_plane(0, np.array([[0.5, 1.5], [1.5, 9.99]]))
    h.add_plane(0, np.array([12.0, -1.0]))
    assert h.counts[0].tolist() == [2, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert h.counts[1].tolist() == [0] * 10  # the other channel untouched
    assert h.counts.dtype == np.int64


def test_histogram_with_a_nonzero_low_shifts_before_scaling():
    h = ChannelHistogram(1, 2.0, 4.0, bins=4)  # bins of 0.5 from 2: [2, 2.5) [2.5, 3) [3, 3.5) [3.5, 4)
    h.add_plane(0, np.array([2.1, 2.6, 3.9, 3.2, 3.4]))
    assert h.counts[0].tolist() == [1, 1, 2, 1]


def test_add_counts_every_channel_of_a_batch():
    h = ChannelHistogram(2, 0.0, 4.0, bins=4)
    batch = np.zeros((2, 2, 1, 2))
    batch[:, 0] = 0.5  # 4 pixels in bin 0 of channel 0
    batch[:, 1] = 3.5  # 4 pixels in bin 3 of channel 1
    batch[1, 1, 0, 0] = 1.5
    h.add(batch)
    assert h.counts.tolist() == [[4, 0, 0, 0], [0, 1, 0, 3]]


@pytest.mark.parametrize(
    "q, expected",
    [
        # counts [1, 2, 0, 1] over [0, 4), width 1, N = 4, cumulative [1, 3, 3, 4]
        (0, 0.5),  # rank 0: bin 0, before 0, fraction (0 + .5)/1 = .5 -> 0 + .5
        (25, 1.0),  # rank .75: bin 0, fraction (.75 + .5)/1 = 1.25 -> 1 -> 1.0
        (50, 1.5),  # rank 1.5: bin 1, before 1, fraction (1.5 - 1 + .5)/2 = .5 -> 1.5
        (100, 3.5),  # rank 3: bin 3, before 3, fraction .5 -> 3.5
    ],
)
def test_percentiles_by_hand(q, expected):
    h = ChannelHistogram(2, 0.0, 4.0, bins=4)
    h.counts[0] = [1, 2, 0, 1]
    h.counts[1] = [0, 0, 4, 0]  # rank q/100 * 3 in bin 2 at (rank + .5)/4: 2 + (.5 + 3q/100)/4
    got = h.percentiles(q)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [expected, 2 + (0.5 + 3 * q / 100) / 4], rtol=1e-6)


def test_percentiles_with_a_nonzero_low_and_bin_width():
    h = ChannelHistogram(1, 10.0, 12.0, bins=4)  # width 0.5
    h.counts[0] = [0, 3, 0, 1]  # cumulative [0, 3, 3, 4]; q 50: rank 1.5 -> bin 1, before 0,
    # fraction (1.5 + .5)/3 = 2/3 -> 10 + (1 + 2/3) * .5
    np.testing.assert_allclose(h.percentiles(50), [10 + (5 / 3) * 0.5], rtol=1e-6)


def test_channel_range_and_its_histogram():
    r = ChannelRange(2)
    r.add_plane(0, np.array([1.0, 5.0, 3.0]))
    r.add_plane(1, np.array([-2.0, 3.0]))
    r.add_plane(0, np.array([0.5, 2.0]))
    np.testing.assert_array_equal(r.lowest, [0.5, -2.0])
    np.testing.assert_array_equal(r.highest, [5.0, 3.0])
    h = r.histogram()
    assert (h.low, h.high, h.counts.shape) == (-2.0, 5.0, (2, h.bins))
    flat = ChannelRange(1)
    flat.add_plane(0, np.array([3.0, 3.0]))
    h = flat.histogram()  # all pixels equal: a range of 1e-6 instead of a division by zero
    assert h.low == 3.0 and h.high == pytest.approx(3.0 + 1e-6, abs=1e-9) and h.high > h.low


def test_value_range_of_integer_images():
    assert _value_range(np.uint8) == (0.0, 256.0)
    assert _value_range(np.dtype("uint16")) == (0.0, 65536.0)
    assert _value_range(np.int16) == (0.0, 32768.0)
    assert _value_range(np.float32) is None


# ----------------------------------------------------------------------------- rescale


# One site, 2 channels of 1 x 2 pixels.  Channel 0: low 0, high 4 -> [1, 5] / 4 = [.25, 1.25 -> 1].
# Channel 1: low = high = 10 (no spread: span 1) -> [9 - 10, 10.5 - 10] = [-1 -> 0, .5].
TILE = np.array([[[[1.0, 5.0]], [[9.0, 10.5]]]], np.float32)
LOW, HIGH = np.array([0.0, 10.0]), np.array([4.0, 10.0])


def test_rescale_to_floats_by_hand():
    np.testing.assert_array_equal(rescale(TILE, LOW, HIGH, "float32"), [[[[0.25, 1.0]], [[0.0, 0.5]]]])
    half = rescale(TILE, LOW, HIGH, "float16")
    assert half.dtype == np.float16
    np.testing.assert_array_equal(half, np.array([[[[0.25, 1.0]], [[0.0, 0.5]]]], np.float16))


def test_rescale_to_integers_rounds_half_to_even():
    # .25 * 255 = 63.75 -> 64;  .5 * 255 = 127.5 -> 128 (even);  .25 * 65535 = 16383.75 -> 16384;
    # .5 * 65535 = 32767.5 -> 32768 (even)
    got = rescale(TILE, LOW, HIGH, "uint8")
    assert got.dtype == np.uint8 and got.tolist() == [[[[64, 255]], [[0, 128]]]]
    got = rescale(TILE, LOW, HIGH, "uint16")
    assert got.dtype == np.uint16 and got.tolist() == [[[[16384, 65535]], [[0, 32768]]]]
    np.testing.assert_array_equal(TILE, [[[[1.0, 5.0]], [[9.0, 10.5]]]])  # the input is left alone


def test_as_float_undoes_the_storage_scale():
    assert DTYPE_SCALE == {"float16": None, "float32": None, "uint8": 255, "uint16": 65535}
    np.testing.assert_allclose(as_float(np.array([0, 51, 255], np.uint8)), [0.0, 0.2, 1.0], rtol=1e-7)
    np.testing.assert_allclose(as_float(np.array([13107, 65535], np.uint16)), [0.2, 1.0], rtol=1e-7)
    got = as_float(np.array([0.25, 0.5], np.float16))
    assert got.dtype == np.float32 and got.tolist() == [0.25, 0.5]


# ----------------------------------------------------------------------------- resize


def test_resize_upsamples_bilinearly_without_anti_aliasing():
    # 2 -> 4 (align_corners False): output centre j maps to (j + .5)/2 - .5 = -.25, .25, .75, 1.25,
    # clamped to [0, 1]: a row [0, 1] becomes [0, .25, .75, 1]
    stack = np.array([[[[0.0, 1.0], [0.0, 1.0]]]], np.float32)
    got = resize_stack(stack, 4)
    assert got.shape == (1, 1, 4, 4)
    np.testing.assert_allclose(got[0, 0], [[0.0, 0.25, 0.75, 1.0]] * 4, atol=1e-6)


# Shrinking rows 0, 1, 2, 3 by 2 with the triangle filter of half-width 2 (in input pixels): output
# row 0 is centred at 1.0, input centres .5 1.5 2.5 3.5 lie .5 .5 1.5 2.5 away -> weights
# .75 .75 .25 0 -> (0*3 + 1*3 + 2*1)/7 = 5/7;  output row 1 (centre 3.0): weights 0 .25 .75 .75 ->
# (1 + 6 + 9)/7 = 16/7.  Plain bilinear would give .5 and 2.5.
RAMP_ROWS = [5 / 7, 16 / 7]


def test_resize_shrinks_with_anti_aliasing():
    stack = np.repeat(np.arange(4, dtype=np.float32)[:, None], 4, axis=1)[None, None]  # value = row
    got = resize_stack(stack, 2)
    np.testing.assert_allclose(got[0, 0], [[RAMP_ROWS[0]] * 2, [RAMP_ROWS[1]] * 2], atol=1e-6)


def test_resize_anti_aliases_when_only_the_height_shrinks():
    stack = np.repeat(np.arange(4, dtype=np.float32)[:, None], 2, axis=1)[None, None]  # 4 x 2
    got = resize_stack(stack, 2)
    np.testing.assert_allclose(got[0, 0], [[RAMP_ROWS[0]] * 2, [RAMP_ROWS[1]] * 2], atol=1e-6)
    wide = np.ascontiguousarray(np.swapaxes(stack, 2, 3))  # 2 x 4: only the width shrinks
    got = resize_stack(wide, 2)
    np.testing.assert_allclose(got[0, 0], [RAMP_ROWS, RAMP_ROWS], atol=1e-6)


def test_resize_to_the_same_size_is_the_input():
    stack = np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2)
    assert resize_stack(stack, 2) is stack


# ----------------------------------------------------------------------------- illumination division


def test_corrected_plane_divides_by_the_function(tmp_path):
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, np.array([[10, 20], [30, 40]], np.uint16))
    function = np.array([[1.0, 2.0], [4.0, 8.0]], np.float32)
    got = corrected_plane(path, function)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, [[10.0, 10.0], [7.5, 5.0]])
    plain = corrected_plane(path, None, shape=(2, 2), dtype=np.uint16)
    assert plain.dtype == np.float32 and plain.tolist() == [[10.0, 20.0], [30.0, 40.0]]
    with pytest.raises(ImageError, match=r"a\.tif"):
        corrected_plane(path, np.ones((3, 3), np.float32))  # the function's size is the plate's
    with pytest.raises(ImageError, match=r"a\.tif"):
        corrected_plane(path, None, shape=(2, 3))
    with pytest.raises(ImageError, match=r"a\.tif"):  # a 16-bit image on a plate of 8-bit ones
        corrected_plane(path, function, dtype=np.uint8)
