"""Nucleus segmentation and single-cell crops (phenoprofiler_core.cells)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from phenoprofiler_core import cells
from phenoprofiler_core.cli import main as cli_main
from phenoprofiler_core.errors import ConfigError, DataError, ImageError
from phenoprofiler_core.io import read_image

LINCS = "lincs_SQ000152xx_4wells_png8bit"
CROP = slice(300, 780)  # the central 480² of a 1080² LINCS site, as in resources/demo


def disc_image(shape, centres, radius, value=200, dtype=np.uint8):
    """An image with bright discs on a dim background."""
    rows, cols = np.indices(shape)
    image = np.full(shape, 10, dtype=np.float64)
    for x, y in centres:
        image[(cols - x) ** 2 + (rows - y) ** 2 <= radius**2] = value
    return image.astype(dtype)


def write_site(
    folder: Path, plate: str, well: str, site: int, planes: dict[str, np.ndarray], **metadata
) -> dict:
    """Write one site's channels as TIFF files and return its manifest row."""
    row = {"Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": site}
    row.update({f"Metadata_{k}": v for k, v in metadata.items()})
    for channel, plane in planes.items():
        path = folder / f"{plate}_{well}_s{site}_{channel}.tif"
        tifffile.imwrite(path, plane)
        row[f"Path_{channel}"] = str(path)
    return row


@pytest.fixture()
def synthetic_plate(tmp_path):
    """Two 160² sites, channels DNA (discs), ER (x ramp), RNA (y ramp); one nucleus touches the left border."""
    shape = (160, 160)
    ramp_x = np.tile(np.linspace(0, 60000, shape[1]), (shape[0], 1)).astype(np.uint16)
    ramp_y = ramp_x.T.copy()
    sites = {1: [(80, 80), (4, 40), (120, 130)], 2: [(50, 60), (110, 100)]}
    rows = []
    for site, centres in sites.items():
        dna = disc_image(shape, centres, radius=9, value=50000, dtype=np.uint16)
        rows.append(
            write_site(
                tmp_path,
                "P1",
                "B02",
                site,
                {"DNA": dna, "ER": ramp_x, "RNA": ramp_y},
                Treatment="DMSO",
                pert_type="negcon",
            )
        )
    manifest = tmp_path / "manifest.parquet"
    pd.DataFrame(rows).to_parquet(manifest, index=False)
    return manifest, sites


# ----------------------------------------------------------------------------- segmentation


def test_segment_nuclei_finds_and_splits_touching_discs():
    centres = [(30, 30), (90, 40), (111, 40), (60, 100)]  # the 2nd and 3rd discs overlap (distance 21 < 2 r)
    image = disc_image((140, 140), centres, radius=12)
    labels = cells.segment_nuclei(image, min_area=50, min_distance=8)
    assert labels.dtype == np.int32
    assert labels.max() == 4
    for x, y in centres:
        assert labels[y, x] > 0
    assert labels[40, 90] != labels[40, 111]  # touching discs split by the watershed
    # Tiny specks are removed, a blank image gives no nuclei (rather than an Otsu error).
    speck = image.copy()
    speck[5:7, 130:132] = 200
    assert cells.segment_nuclei(speck, min_area=50, min_distance=8).max() == 4
    assert cells.segment_nuclei(np.zeros((50, 50))).max() == 0


def test_given_centres_seed_one_object_each():
    image = disc_image((100, 100), [(30, 30), (70, 70)], radius=10)
    centres = np.array([[30.2, 29.8], [70.0, 70.0], [5.0, 90.0]])  # the third lies in background
    labels = cells.segment_nuclei(image, centres_xy=centres)
    assert labels.max() == 3
    assert labels[30, 30] == 1 and labels[70, 70] == 2 and labels[90, 5] == 3
    assert (labels == 1).sum() > 250  # the object fills the disc, not just the seed


def test_segmentation_agrees_with_cellprofiler_centres(shared_data):
    """All 60 LINCS sites, central 480² crops: counts and centre coverage against CellProfiler."""
    root = shared_data / LINCS
    index = pd.read_csv(root / "images.csv")
    dna = index[index["channel_name"] == "DNA"]
    errors, inside = [], []
    for row in dna.itertuples():
        image = read_image(root / row.path)[CROP, CROP].astype(np.float32) / 255
        labels = cells.segment_nuclei(image)
        centres = (
            cells.read_locations(
                root / "locations" / row.plate / f"{row.well}-{row.site}-Nuclei.csv",
                "Nuclei_Location_Center_X",
                "Nuclei_Location_Center_Y",
            )
            - 300
        )
        keep = ((centres >= 0) & (centres < 480)).all(axis=1)
        x, y = np.round(centres[keep]).astype(int).clip(0, 479).T
        errors.append(abs(labels.max() - keep.sum()) / keep.sum())
        inside.append(np.mean(labels[y, x] > 0))
    print(
        f"60 crops: median |relative count error| {np.median(errors):.3f}, "
        f"CellProfiler centres inside our nuclei {np.mean(inside):.4f} (worst site {np.min(inside):.3f})"
    )
    assert len(errors) == 60
    assert np.median(errors) <= 0.15
    assert np.mean(inside) >= 0.90


# ----------------------------------------------------------------------------- crops


def test_crop_cells_pads_at_border():
    image = np.ones((2, 50, 50), np.float32)
    image[1] *= 0.5
    crops = np.concatenate(
        list(cells.crop_cells(image, np.array([[25.0, 25.0], [0.0, 10.0]]), box_size=20, crop_size=20))
    )
    assert crops.shape == (2, 2, 20, 20)
    assert np.all(crops[0, 0] == 1) and np.all(crops[0, 1] == 0.5)
    # The box of a centre on the left edge extends 10 px past it: those columns are zero padding.
    assert np.all(crops[1, :, :, :10] == 0) and np.all(crops[1, 0, :, 10:] == 1)
    assert np.isfinite(crops).all()


def test_run_cells_writes_crops_and_table(synthetic_plate, tmp_path):
    manifest, sites = synthetic_plate
    out, table_path = tmp_path / "cells" / "P1.npy", tmp_path / "cells" / "P1.cells.parquet"
    summary = cells.run_cells(
        manifest,
        "P1",
        out,
        table_path,
        channels=["DNA", "ER", "RNA"],
        nuclei=cells.NucleiOptions(min_area=50, min_distance=6),
        box_size=40,
        crop_size=24,
        percentiles=(0.0, 100.0),
    )
    crops = np.load(out)
    n = sum(len(c) for c in sites.values())
    assert crops.shape == (n, 3, 24, 24) and crops.dtype == np.float16
    assert np.isfinite(crops).all() and crops.min() >= 0 and crops.max() <= 1
    saved = pd.read_parquet(table_path)
    assert list(saved.columns[:6]) == list(cells.CELL_ID_COLUMNS)
    assert {"Metadata_Treatment", "Metadata_pert_type"} <= set(saved.columns)
    assert saved["Metadata_ObjectNumber"].tolist() == [1, 2, 3, 1, 2]
    for site, centres in sites.items():
        got = saved.loc[saved["Metadata_Site"] == site, ["Metadata_X", "Metadata_Y"]].to_numpy()
        for x, y in centres:
            assert (
                np.min(np.hypot(got[:, 0] - x, got[:, 1] - y)) < 2
            )  # a disc cut by the border: visible centroid
    assert summary["sites"] == 2 and summary["cells"] == n == len(saved)
    # Channel order: ER ramps along x, RNA along y, in every interior crop.
    interior = crops[(saved["Metadata_X"] > 30).to_numpy() & (saved["Metadata_X"] < 130).to_numpy()]
    assert np.all(np.diff(interior[:, 1].astype(np.float32).mean(axis=1), axis=-1) > 0)
    assert np.all(np.diff(interior[:, 2].astype(np.float32).mean(axis=2), axis=-1) > 0)
    # The nucleus at x=4 is kept and its crop is zero-padded left of the image edge (box 40 -> 20 px pad).
    border = np.flatnonzero(saved["Metadata_X"].to_numpy() < 10)
    assert len(border) == 1
    padded = crops[border[0]].astype(np.float32)
    pad_columns = int(24 * (20 - 4) / 40) - 1  # crop columns lying wholly left of x = 0
    assert np.all(padded[:, :, :pad_columns] == 0)
    assert padded[0, :, pad_columns + 3 :].max() > 0.5  # the nucleus itself is there


def test_run_cells_with_locations_and_illumination(synthetic_plate, tmp_path):
    manifest, sites = synthetic_plate
    locations = tmp_path / "loc" / "P1"
    locations.mkdir(parents=True)
    for site, centres in sites.items():
        pd.DataFrame(centres, columns=["Nuclei_Location_Center_X", "Nuclei_Location_Center_Y"]).to_csv(
            locations / f"B02-{site}-Nuclei.csv", index=False
        )
    illum = tmp_path / "illum" / "P1"
    illum.mkdir(parents=True)
    for channel in ("DNA", "ER", "RNA"):
        np.save(illum / f"{channel}.npy", np.full((160, 160), 2.0, np.float32))
    options = cells.NucleiOptions(method="locations", locations_root=str(tmp_path / "loc"))
    cells.run_cells(
        manifest,
        "P1",
        tmp_path / "c.npy",
        tmp_path / "c.parquet",
        illum_dir=illum,
        nuclei=options,
        box_size=32,
        crop_size=32,
    )
    table = pd.read_parquet(tmp_path / "c.parquet")
    expected = np.concatenate([np.asarray(c, float) for c in sites.values()])
    np.testing.assert_allclose(table[["Metadata_X", "Metadata_Y"]].to_numpy(), expected)
    assert np.load(tmp_path / "c.npy").shape == (5, 3, 32, 32)
    # Correction divides by the function: half the uncorrected value.
    row = pd.read_parquet(manifest).iloc[0]
    np.testing.assert_allclose(
        cells.load_site(row, ["DNA"], {"DNA": np.full((160, 160), 2.0, np.float32)}),
        cells.load_site(row, ["DNA"]) / 2,
        rtol=1e-6,
    )
    # A missing location file or illumination function is named in the error.
    (locations / "B02-2-Nuclei.csv").unlink()
    with pytest.raises(DataError, match=r"B02-2-Nuclei\.csv"):
        cells.run_cells(manifest, "P1", tmp_path / "d.npy", tmp_path / "d.parquet", nuclei=options)
    (illum / "RNA.npy").unlink()
    with pytest.raises(ImageError, match=r"RNA\.npy"):
        cells.run_cells(manifest, "P1", tmp_path / "d.npy", tmp_path / "d.parquet", illum_dir=illum)
    assert not (tmp_path / "d.npy").exists() and not (tmp_path / "d.parquet").exists()
    assert not list(tmp_path.glob(".d.*"))  # nor a temporary file of either


def test_cells_cli(synthetic_plate, tmp_path, capsys):
    manifest, _ = synthetic_plate
    out = tmp_path / "cli" / "P1.npy"
    code = cli_main(
        [
            "cells",
            str(manifest),
            "--plate",
            "P1",
            "--out",
            str(out),
            "--table",
            str(tmp_path / "cli" / "P1.cells.parquet"),
            "--channels",
            "RNA",
            "DNA",
            "--workers",
            "2",
            "--min-area",
            "50",
            "--min-distance",
            "6",
            "--box-size",
            "32",
            "--crop-size",
            "16",
        ]
    )
    assert code == 0
    assert np.load(out).shape == (5, 2, 16, 16)
    assert (
        cli_main(
            [
                "cells",
                str(manifest),
                "--plate",
                "NOPE",
                "--out",
                str(out),
                "--table",
                str(tmp_path / "x.parquet"),
            ]
        )
        == 2
    )
    assert "NOPE" in capsys.readouterr().err
    assert (
        cli_main(
            [
                "cells",
                str(manifest),
                "--plate",
                "P1",
                "--out",
                str(out),
                "--table",
                str(tmp_path / "x.parquet"),
                "--nuclei-channel",
                "Hoechst",
            ]
        )
        == 2
    )
    assert "Hoechst" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="locations_root"):
        cells.NucleiOptions(method="locations")


# ----------------------------------------------------------------------------- nucleus label images


def test_save_masks_writes_one_label_image_per_site(synthetic_plate, tmp_path):
    """cells.save_masks: one TIFF per site in the cells table's frame; label i = ObjectNumber i."""
    manifest, sites = synthetic_plate
    masks = tmp_path / "cells" / "P1.masks"
    cells.run_cells(
        manifest,
        "P1",
        tmp_path / "cells" / "P1.npy",
        tmp_path / "cells" / "P1.cells.parquet",
        nuclei=cells.NucleiOptions(min_area=50, min_distance=6),
        box_size=32,
        crop_size=16,
        masks_dir=masks,
    )
    table = pd.read_parquet(tmp_path / "cells" / "P1.cells.parquet")
    assert sorted(p.name for p in masks.iterdir()) == ["B02_s1.tiff", "B02_s2.tiff"]
    assert not list((tmp_path / "cells").glob(".*"))  # no temporary folder left behind
    for site, centres in sites.items():
        with tifffile.TiffFile(masks / f"B02_s{site}.tiff") as tif:
            assert tif.pages[0].compression.name in ("ADOBE_DEFLATE", "DEFLATE")
            labels = tif.asarray()
        assert labels.shape == (160, 160) and labels.dtype == np.uint16
        assert labels.max() == len(centres)
        rows = table[table.Metadata_Site == site]
        for obj, x, y in zip(rows.Metadata_ObjectNumber, rows.Metadata_X, rows.Metadata_Y):
            assert labels[round(float(y)), round(float(x))] == obj  # x = column, y = row
        # each drawn disc (radius 9: ~254 px, less where the border cuts it) is one label
        for x, y in centres:
            label = labels[y, x]
            assert label > 0 and 100 < (labels == label).sum() < 300


def test_save_mask_widens_to_uint32_past_65535_labels(tmp_path):
    labels = np.arange(70000, dtype=np.int64).reshape(350, 200)
    cells.save_mask(labels, tmp_path / "many.tiff")
    back = tifffile.imread(tmp_path / "many.tiff")
    assert back.dtype == np.uint32 and np.array_equal(back, labels)
    cells.save_mask(np.array([[0, 3], [65535, 1]]), tmp_path / "few.tiff")
    assert tifffile.imread(tmp_path / "few.tiff").dtype == np.uint16
