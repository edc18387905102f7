"""Illumination function vs a direct full-resolution CellProfiler recipe on a vignetted plate."""

import numpy as np
import pytest
from helpers import cell_image, save
from scipy import ndimage

from phenoprofiler_core.errors import ImageError
from phenoprofiler_core.illumination import (
    illumination_function,
    illumination_qc,
    mean_image,
    robust_rescale,
)

SHAPE = (250, 250)


def vignette(shape=SHAPE):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    cy, cx = shape[0] * 0.45, shape[1] * 0.55  # off-centre, as on real scopes
    r2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / (0.6 * shape[0]) ** 2
    return 0.35 + 0.65 * np.exp(-r2)  # corners ~ 1/3 of the centre


@pytest.fixture(scope="module")
def plate(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vignetted")
    v = vignette()
    paths = []
    for k in range(24):
        flat = cell_image(SHAPE, n_cells=60, seed=k, dtype=np.float64, background=400.0, peak=2500.0)
        paths.append(save(np.clip(flat * v, 0, 65535).astype(np.uint16), folder / f"site{k}.tif"))
    return paths, v


def direct_recipe(average, downsample=0.2, median_size=20, robust_quantile=0.02):
    """CellProfiler's recipe written out at full resolution: median of size 20/0.2 = 100 px."""
    smooth = ndimage.median_filter(average, size=round(median_size / downsample), mode="nearest")
    positive = smooth[smooth > 0]
    robust_min = np.quantile(positive, robust_quantile)
    return np.maximum(smooth, robust_min) / robust_min


def test_matches_direct_full_resolution_recipe(plate):
    paths, _ = plate
    average = mean_image(paths)
    ours = illumination_function(average)
    direct = direct_recipe(average)
    assert ours.shape == average.shape and ours.dtype == np.float32
    assert ours.min() >= 1.0 and direct.min() >= 1.0
    r = np.corrcoef(ours.ravel(), direct.ravel())[0, 1]
    assert r > 0.99, r


def test_function_tracks_the_vignetting(plate):
    paths, v = plate
    ours = illumination_function(mean_image(paths))
    # the robust-minimum floor flattens the darkest 2 %, so not a perfect match
    assert np.corrcoef(ours.ravel(), v.ravel())[0, 1] > 0.95


def test_correction_flattens_vignetting(plate):
    paths, _v = plate
    function = illumination_function(mean_image(paths))
    images = np.stack([np.asarray(__import__("tifffile").imread(p), np.float64) for p in paths])

    def centre_to_corner(stack):
        # medians pick the background level, which is what vignetting modulates
        c = np.median(stack[:, 100:150, 110:160])
        corners = [stack[:, :30, :30], stack[:, :30, -30:], stack[:, -30:, :30], stack[:, -30:, -30:]]
        return c / np.median(np.concatenate([k.ravel() for k in corners]))

    before, after = centre_to_corner(images), centre_to_corner(images / function)
    assert before > 1.8
    assert abs(after - 1.0) < 0.15, (before, after)


def test_robust_rescale_is_at_least_one():
    f = robust_rescale(np.linspace(0, 10, 1000).reshape(10, 100))
    assert f.min() == pytest.approx(1.0) and f.max() > 1


def test_mixed_sizes_and_bit_depths_fail_naming_the_file(tmp_path):
    a = save(cell_image((40, 40), seed=1), tmp_path / "a.tif")
    b = save(cell_image((40, 48), seed=2), tmp_path / "b.tif")
    with pytest.raises(ImageError, match=r"b\.tif"):
        mean_image([a, b])
    c = save(cell_image((40, 40), seed=3, dtype=np.uint8), tmp_path / "c.tif")
    with pytest.raises(ImageError, match=r"c\.tif.*uint8"):
        mean_image([a, c])


def test_corrupt_and_missing_images_fail_naming_the_file(tmp_path):
    good = save(cell_image((40, 40)), tmp_path / "good.png")
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ImageError, match=r"trunc\.png"):
        mean_image([good, truncated])
    bad_tiff = tmp_path / "bad.tif"
    bad_tiff.write_bytes(b"II*\x00garbage")
    with pytest.raises(ImageError, match=r"bad\.tif"):
        mean_image([bad_tiff])
    with pytest.raises(ImageError, match=r"absent\.png"):
        mean_image([tmp_path / "absent.png"])


def test_nan_image_fails(tmp_path):
    image = np.ones((20, 20), np.float32)
    image[3, 4] = np.nan
    path = save(image, tmp_path / "nan.tif")
    with pytest.raises(ImageError, match=r"nan\.tif.*NaN"):
        mean_image([path])


# ----------------------------------------------------------------------------- QC (qc.json)


def test_qc_flags_few_sites_and_implausible_ratios():
    flat = np.ones((10, 10), np.float32)
    steep = np.ones((10, 10), np.float32)
    steep[:2, :2] = 4.0  # max / min = 4 / 1, above a limit of 3
    qc = illumination_qc(
        {"DNA": flat * 1.5, "Mito": steep}, plate="P1", n_sites=12, min_sites=50, max_ratio=3.0
    )
    assert list(qc) == ["plate", "n_sites", "min_sites", "max_ratio_limit", "channels", "warnings"]
    assert (qc["plate"], qc["n_sites"], qc["min_sites"], qc["max_ratio_limit"]) == ("P1", 12, 50, 3.0)
    assert qc["channels"]["DNA"] == {"max_over_min": 1.0, "warnings": []}
    assert qc["channels"]["Mito"]["max_over_min"] == 4.0
    assert len(qc["channels"]["Mito"]["warnings"]) == 1 and "4.00" in qc["channels"]["Mito"]["warnings"][0]
    assert len(qc["warnings"]) == 2
    assert "12 site(s)" in qc["warnings"][0] and qc["warnings"][1] == qc["channels"]["Mito"]["warnings"][0]
    # enough sites and a plausible function: no warning at all
    ok = illumination_qc({"DNA": steep}, plate="P1", n_sites=50, min_sites=50, max_ratio=4.0)
    assert ok["warnings"] == [] and ok["channels"]["DNA"]["warnings"] == []


def test_cli_writes_qc_json_beside_the_functions(tmp_path, capsys, caplog):
    import json
    import logging

    import pandas as pd

    from phenoprofiler_core.cli import main

    rows = []
    for k in range(3):
        row = {"Metadata_Plate": "P1", "Metadata_Well": "A01", "Metadata_Site": k + 1}
        row["Path_DNA"] = str(save(cell_image((60, 60), seed=k), tmp_path / f"dna{k}.tif"))
        rows.append(row)
    pd.DataFrame(rows).to_parquet(tmp_path / "m.parquet")
    out = tmp_path / "illum" / "P1"
    with caplog.at_level(logging.WARNING):
        code = main(
            [
                "illumination",
                str(tmp_path / "m.parquet"),
                "--plate",
                "P1",
                "--out",
                str(out),
                "--min-sites",
                "5",
            ]
        )
    assert code == 0, capsys.readouterr().err
    qc = json.loads((out / "qc.json").read_text())
    function = np.load(out / "DNA.npy")
    assert qc["n_sites"] == 3 and qc["min_sites"] == 5 and qc["max_ratio_limit"] == 3.0
    assert qc["channels"]["DNA"]["max_over_min"] == pytest.approx(function.max() / function.min(), rel=1e-6)
    assert "3 site(s)" in qc["warnings"][0] and "3 site(s)" in caplog.text
