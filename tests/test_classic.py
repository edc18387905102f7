"""Hand-crafted per-site features (phenoprofiler_core.classic)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image
from skimage.feature import graycomatrix
from skimage.measure import regionprops
from skimage.segmentation import expand_labels

from phenoprofiler_core import classic
from phenoprofiler_core.cells import segment_nuclei
from phenoprofiler_core.cli import main as cli_main

LINCS = "lincs_SQ000152xx_4wells_png8bit"
CHANNELS = ["DNA", "ER", "RNA", "AGP", "Mito"]


def blob_labels(shape=(80, 90), n=6, seed=0):
    """Irregular touching objects: random seeds grown by a fixed distance."""
    rng = np.random.default_rng(seed)
    seeds = np.zeros(shape, np.int32)
    for i in range(1, n + 1):
        seeds[rng.integers(8, shape[0] - 8), rng.integers(8, shape[1] - 8)] = i
    return expand_labels(seeds, distance=9)


def test_intensity_statistics_match_regionprops_and_numpy():
    labels = blob_labels()
    rng = np.random.default_rng(1)
    image = rng.random((2, *labels.shape)).astype(np.float32)
    n = int(labels.max())
    stats = classic._intensity_stats(labels, image, n)
    for region in regionprops(labels):
        i = region.label - 1
        for c in range(2):
            values = image[c][labels == region.label].astype(np.float64)
            assert stats["MeanIntensity"][i, c] == pytest.approx(values.mean(), rel=1e-9)
            assert stats["StdIntensity"][i, c] == pytest.approx(values.std(), rel=1e-6)
            assert stats["IntegratedIntensity"][i, c] == pytest.approx(values.sum(), rel=1e-9)
            for name, q in (
                ("LowerQuartileIntensity", 25),
                ("MedianIntensity", 50),
                ("UpperQuartileIntensity", 75),
            ):
                assert stats[name][i, c] == np.percentile(values, q, method="lower")
        assert stats["MeanIntensity"][i, 0] == pytest.approx(
            regionprops(labels, intensity_image=image[0])[i].intensity_mean, rel=1e-6
        )


def test_texture_matches_scikit_image_cooccurrence():
    labels = np.zeros((60, 70), np.int32)
    labels[5:30, 8:40] = 1
    labels[35:58, 20:65] = 2
    rng = np.random.default_rng(2)
    plane = rng.random(labels.shape).astype(np.float32)
    plane[35:58, 20:65] = np.linspace(0, 1, 45)[None, :]  # a smooth ramp: low contrast, high correlation
    levels, distance = 8, 3
    features = classic._texture(labels, plane, 2, levels, distance)
    grey = classic.quantize(plane, labels > 0, levels)
    for label, (rows, cols) in {1: (slice(5, 30), slice(8, 40)), 2: (slice(35, 58), slice(20, 65))}.items():
        # The 4 directions pooled (counts summed, then normalised) = our per-object matrix.  Our diagonal
        # offsets are (d, d) as in CellProfiler; scikit-image rounds d·sin/cos, so it needs d·√2 there.
        crop = grey[rows, cols].astype(np.uint8)
        axes = graycomatrix(crop, [distance], [0, np.pi / 2], levels=levels, symmetric=True, normed=False)
        diagonals = graycomatrix(
            crop,
            [distance * np.sqrt(2)],
            [np.pi / 4, 3 * np.pi / 4],
            levels=levels,
            symmetric=True,
            normed=False,
        )
        p = (axes.sum(axis=(2, 3)) + diagonals.sum(axis=(2, 3))).astype(float)
        p /= p.sum()
        i, j = np.indices(p.shape)
        mi, mj = (p * i).sum(), (p * j).sum()
        si, sj = np.sqrt((p * (i - mi) ** 2).sum()), np.sqrt((p * (j - mj) ** 2).sum())
        expected = {
            "Contrast": (p * (i - j) ** 2).sum(),
            "AngularSecondMoment": (p**2).sum(),
            "InverseDifferenceMoment": (p / (1 + (i - j) ** 2)).sum(),
            "Correlation": (p * (i - mi) * (j - mj)).sum() / (si * sj),
            "Entropy": -(p[p > 0] * np.log2(p[p > 0])).sum(),
        }
        for name, value in expected.items():
            assert features[name][label - 1] == pytest.approx(value, rel=1e-9), name
    assert features["Correlation"][1] > 0.9 > features["Correlation"][0]


def test_channel_correlation_within_objects():
    labels = blob_labels(n=4)
    rng = np.random.default_rng(3)
    a = rng.random(labels.shape)
    image = np.stack([a, 2 * a + 1, -a, rng.random(labels.shape)]).astype(np.float64)
    correlations = classic._correlations(labels, image, int(labels.max()))
    np.testing.assert_allclose(correlations[(0, 1)], 1, atol=1e-9)
    np.testing.assert_allclose(correlations[(0, 2)], -1, atol=1e-9)
    assert np.all(np.abs(correlations[(0, 3)]) < 0.3)


def synthetic_site(radius=10):
    """A 5-channel site with 6 round nuclei in a dimmer cytoplasm halo."""
    centres = [(30, 30), (90, 30), (150, 40), (40, 110), (110, 120), (160, 150)]
    rows, cols = np.indices((190, 200))
    dna = np.full(rows.shape, 0.02)
    agp = np.full(rows.shape, 0.01)
    for x, y in centres:
        distance = np.hypot(cols - x, rows - y)
        dna[distance <= radius] = 0.8
        agp[(distance > radius) & (distance <= radius + 12)] = 0.3
    rng = np.random.default_rng(4)
    image = np.stack([dna, agp * 0.5 + 0.05, agp * 0.7, agp, rng.random(rows.shape) * 0.1]).astype(np.float32)
    return image, centres


def test_site_features_on_synthetic_cells():
    image, centres = synthetic_site(radius=10)
    nuclei = segment_nuclei(image[0], min_area=50, min_distance=8)
    features, objects = classic.site_features(image, CHANNELS, nuclei)
    assert list(features) == classic.feature_names(CHANNELS)
    assert features["Count_Nuclei"] == len(centres) == len(objects)
    assert features["Nuclei_AreaShape_Area"] == pytest.approx(np.pi * 10**2, rel=0.1)
    assert 0.85 < features["Nuclei_AreaShape_FormFactor"] <= 1.1
    assert features["Nuclei_AreaShape_Eccentricity"] < 0.3
    # Cells reach into the AGP halo (radius 22 disc), not beyond: background is excluded.
    assert features["Cells_AreaShape_Area"] == pytest.approx(np.pi * 22**2, rel=0.15)
    assert features["Nuclei_Intensity_MedianIntensity_DNA"] == pytest.approx(0.8)
    assert features["Cytoplasm_Intensity_MedianIntensity_AGP"] == pytest.approx(0.3)
    assert features["Cytoplasm_Intensity_MeanIntensity_DNA"] < 0.1
    # Texture: the smooth DNA disc is spatially correlated, the pixel noise in Mito is not.
    assert (
        features["Cells_Texture_Correlation_DNA_3"] > 0.5 > abs(features["Cells_Texture_Correlation_Mito_3"])
    )
    assert np.isfinite([features[k] for k in features if "Mito" in k]).all()
    # No nuclei: a count of 0 and NaN per-cell features rather than invented values.
    empty, _ = classic.site_features(image, CHANNELS, np.zeros(image.shape[1:], np.int32))
    assert empty["Count_Nuclei"] == 0 and np.isnan(empty["Nuclei_AreaShape_Area"])


def test_classic_cli_writes_one_row_per_site(tmp_path, capsys):
    image, _centres = synthetic_site()
    rows = []
    for site in (1, 2):
        row = {
            "Metadata_Plate": "P9",
            "Metadata_Well": "C03",
            "Metadata_Site": site,
            "Metadata_Treatment": "DMSO",
        }
        for c, channel in enumerate(CHANNELS):
            path = tmp_path / f"s{site}_{channel}.tif"
            plane = image[c] if site == 1 else image[c][:, ::-1]  # site 2: mirrored (same cells)
            tifffile.imwrite(path, (plane * 65535).astype(np.uint16))
            row[f"Path_{channel}"] = str(path)
        rows.append(row)
    manifest = tmp_path / "manifest.parquet"
    pd.DataFrame(rows).to_parquet(manifest, index=False)
    out = tmp_path / "features" / "classic" / "P9.parquet"
    assert (
        cli_main(
            [
                "classic",
                str(manifest),
                "--plate",
                "P9",
                "--out",
                str(out),
                "--min-area",
                "50",
                "--min-distance",
                "8",
                "--workers",
                "2",
            ]
        )
        == 0
    )
    table = pd.read_parquet(out)
    assert list(table.columns[:4]) == [
        "Metadata_Plate",
        "Metadata_Well",
        "Metadata_Site",
        "Metadata_Treatment",
    ]
    assert not any(c.startswith("Path_") for c in table.columns)
    features = [c for c in table.columns if not c.startswith("Metadata_")]
    assert features == classic.feature_names(CHANNELS)
    assert all(table[c].dtype == np.float32 for c in features)
    assert table["Count_Nuclei"].tolist() == [6, 6]
    # Mirroring changes no rotation-invariant statistic (shape, intensity) of the site.
    np.testing.assert_allclose(table["Nuclei_AreaShape_Area"][0], table["Nuclei_AreaShape_Area"][1])
    np.testing.assert_allclose(
        table["Cells_Intensity_MeanIntensity_AGP"][0],
        table["Cells_Intensity_MeanIntensity_AGP"][1],
        rtol=1e-5,
    )
    # --channels restricts and reorders; a missing channel is named.
    assert (
        cli_main(
            [
                "classic",
                str(manifest),
                "--plate",
                "P9",
                "--out",
                str(out),
                "--channels",
                "DNA",
                "Mito",
                "--min-area",
                "50",
            ]
        )
        == 0
    )
    assert "Cells_Correlation_Correlation_DNA_Mito" in pd.read_parquet(out).columns
    assert (
        cli_main(["classic", str(manifest), "--plate", "P9", "--out", str(out), "--channels", "DNA", "Golgi"])
        == 2
    )
    assert "Golgi" in capsys.readouterr().err


def test_lonafarnib_reduces_nucleus_count(shared_data, tmp_path):
    """Real LINCS data: lonafarnib (P13) leaves fewer cells than DMSO (A01, J18).

    Central 480² crops of the 3 sites of each well, 5 replicate plates, full classic features.  On these
    sites the effect is not universal (plate SQ00015233: lonafarnib ≈ DMSO mean, README), so the test
    asserts what the data supports: fewer than the DMSO mean on ≥ 4 of 5 plates, and a pooled ratio < 1.
    """
    root = shared_data / LINCS
    index = pd.read_csv(root / "images.csv")
    index = index[index["well"].isin(["A01", "J18", "P13"])]
    rows = []
    for (plate, well, site), group in index.groupby(["plate", "well", "site"]):
        row = {
            "Metadata_Plate": plate,
            "Metadata_Well": well,
            "Metadata_Site": int(site),
            "Metadata_Treatment": group["pert_iname"].iloc[0],
        }
        for item in group.itertuples():
            path = tmp_path / f"{plate}_{well}_{site}_{item.channel_name}.png"
            Image.fromarray(np.asarray(Image.open(root / item.path))[300:780, 300:780]).save(path)
            row[f"Path_{item.channel_name}"] = str(path)
        rows.append(row)
    manifest = tmp_path / "manifest.parquet"
    pd.DataFrame(rows).to_parquet(manifest, index=False)
    tables = [
        classic.run_classic(manifest, plate, tmp_path / f"{plate}.parquet", channels=CHANNELS, workers=2)
        for plate in sorted(index["plate"].unique())
    ]
    features = pd.concat(tables)
    counts = features.groupby(["Metadata_Plate", "Metadata_Well"])["Count_Nuclei"].sum().unstack()
    print("nuclei per well (3 central 480² crops):\n" + counts.astype(int).to_string())
    dmso_mean = counts[["A01", "J18"]].mean(axis=1)
    assert (counts["P13"] < dmso_mean).sum() >= 4
    assert counts["P13"].sum() / dmso_mean.sum() < 1
    assert np.isfinite(features.filter(like="Nuclei_AreaShape").to_numpy()).all()


def test_shape_measures_match_regionprops():
    labels = blob_labels(n=8, seed=5)
    shape = classic._shape(labels, int(labels.max()))
    for region in regionprops(labels):
        i = region.label - 1
        assert shape["Area"][i] == region.area
        assert shape["Perimeter"][i] == pytest.approx(region.perimeter)
        assert shape["Solidity"][i] == pytest.approx(region.solidity)
        assert shape["Extent"][i] == pytest.approx(region.extent)
        assert shape["MajorAxisLength"][i] == pytest.approx(region.axis_major_length, rel=1e-6)
        assert shape["MinorAxisLength"][i] == pytest.approx(region.axis_minor_length, rel=1e-6)
        assert shape["Eccentricity"][i] == pytest.approx(region.eccentricity, rel=1e-6, abs=1e-6)
        assert shape["FormFactor"][i] == pytest.approx(4 * np.pi * region.area / region.perimeter**2)
