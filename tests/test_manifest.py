"""Manifest: the three naming schemes, metadata joins, bit depths, channel counts, bad input."""

import numpy as np
import pandas as pd
import pytest
from helpers import cell_image, save, write_imagexpress_plate, write_phenix_plate, write_platemap

from phenoprofiler_core.config import load_config, validate_config
from phenoprofiler_core.errors import ConfigError, DataError
from phenoprofiler_core.io import read_image
from phenoprofiler_core.manifest import build_manifest

CH5 = {"1": "DNA", "2": "ER", "3": "RNA", "4": "AGP", "5": "Mito"}


def _config(root, layout, metadata, channel_map=CH5, channels=None, **images):
    cfg = {
        "dataset": "t",
        "images": {"root": str(root), "layout": layout, "channel_map": channel_map, **images},
        "metadata": metadata,
    }
    if channels:
        cfg["channels"] = channels
    return validate_config(cfg)


def test_demo_manifest_from_shipped_metadata(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    manifest = build_manifest(load_config("config/demo.yaml"))
    assert len(manifest) == 60  # 5 plates x 4 wells x 3 sites
    assert manifest.Metadata_Plate.nunique() == 5
    per_well = manifest.drop_duplicates(["Metadata_Plate", "Metadata_Well"]).groupby("Metadata_Well")
    treatments = per_well["Metadata_Treatment"].agg(set).to_dict()
    assert treatments == {"A01": {"DMSO"}, "J18": {"DMSO"}, "A13": {"orantinib"}, "P13": {"lonafarnib"}}
    moa = manifest.set_index("Metadata_Well")["Metadata_moa"].to_dict()
    assert moa["P13"] == "farnesyltransferase inhibitor"
    assert set(moa["A13"].split("|")) == {
        "FGFR inhibitor",
        "PDGFR tyrosine kinase receptor inhibitor",
        "VEGFR inhibitor",
    }
    assert set(manifest.loc[manifest.Metadata_Treatment == "DMSO", "Metadata_pert_type"]) == {"negcon"}
    assert set(manifest.loc[manifest.Metadata_Treatment != "DMSO", "Metadata_pert_type"]) == {"trt"}
    # channel order follows the config, and the channel map (ch1 = DNA) comes from it
    assert [c for c in manifest.columns if c.startswith("Path_")] == [
        "Path_DNA",
        "Path_ER",
        "Path_RNA",
        "Path_AGP",
        "Path_Mito",
    ]
    row = manifest.iloc[0]
    assert row.Path_DNA.endswith("r01c01f01p01-ch1sk1fk1fl1.png") and row.Path_Mito.endswith(
        "-ch5sk1fk1fl1.png"
    )


def test_phenix_real_lincs_sites(shared_data, tmp_path):
    src = shared_data / "lincs_SQ000152xx_4wells_png8bit"
    meta = {
        "barcode_platemap": str(src / "metadata/barcode_platemap_rows.csv"),
        "platemap_dir": str(src / "metadata"),
        "empty_treatment": "DMSO",
        "treatments": str(src / "metadata/moa_rows_repurposing_info_external_moa_map_resolved.tsv"),
        "treatment_name_column": "pert_iname",
    }
    manifest = build_manifest(_config(src / "images", "phenix", meta))
    expected = pd.read_csv(src / "images.csv")
    assert len(manifest) == len(expected) // 5 == 60
    # every site's treatment agrees with the table shipped with the data
    truth = expected.drop_duplicates(["plate", "well"]).set_index(["plate", "well"])["pert_iname"]
    got = manifest.drop_duplicates(["Metadata_Plate", "Metadata_Well"]).set_index(
        ["Metadata_Plate", "Metadata_Well"]
    )["Metadata_Treatment"]
    assert got.sort_index().tolist() == truth.sort_index().tolist()
    # each channel path is the file the data's own index lists for that channel
    lookup = expected.set_index(["plate", "well", "site", "channel_name"])["path"]
    for row in manifest.itertuples():
        for ch in ("DNA", "Mito"):
            assert getattr(row, f"Path_{ch}").endswith(
                lookup[(row.Metadata_Plate, row.Metadata_Well, row.Metadata_Site, ch)]
            )


def test_imagexpress_real_bbbc022_site(shared_data, tmp_path):
    src = shared_data / "bbbc022_20585_A01_s2_png8bit"
    # the well's treatment (README: niflumic acid, BRD-K98763141) as a one-row wells table
    table = tmp_path / "wells.csv"
    table.write_text("well_position,broad_sample\nA01,BRD-K98763141-001-06-8\n")
    cfg = _config(src / "images", "imagexpress", {"wells": str(table)}, plate="20585")
    manifest = build_manifest(cfg)
    assert len(manifest) == 1
    row = manifest.iloc[0]
    assert (row.Metadata_Plate, row.Metadata_Well, row.Metadata_Site) == ("20585", "A01", 2)
    assert "_w1" in row.Path_DNA and "_w5" in row.Path_Mito
    assert read_image(row.Path_DNA).shape == (520, 696)


def test_pattern_real_jump_tiffs_16bit(shared_data, tmp_path):
    src = shared_data / "jump_rab30_mini" / "tiff"
    table = tmp_path / "wells.csv"
    table.write_text(
        "plate,well_position,broad_sample\nBR00123947,G01,RAB30_ORF\nCP-CC9-R1-05,L07,RAB30_CRISPR\n"
    )
    cmap = {c: c for c in ("DNA", "ER", "RNA", "AGP", "Mito")}
    cfg = _config(
        src,
        "pattern",
        {"wells": str(table)},
        channel_map=cmap,
        pattern=r"(?P<plate>.+)_(?P<well>[A-P]\d\d)_s(?P<site>\d+)_(?P<channel>[A-Za-z]+)\.tif$",
    )
    manifest = build_manifest(cfg)
    assert len(manifest) == 2
    assert set(manifest.Metadata_Plate) == {"BR00123947", "CP-CC9-R1-05"}
    assert read_image(manifest.Path_DNA[0]).dtype == np.uint16


def test_phenix_generated_16bit_tiff(tmp_path):
    write_phenix_plate(tmp_path / "img", "P1", suffix=".tiff", dtype=np.uint16)
    meta = write_platemap(tmp_path / "meta", "P1", {"A01": "DMSO", "B02": "cpd1"})
    manifest = build_manifest(_config(tmp_path / "img", "phenix", meta))
    assert len(manifest) == 4
    assert manifest.set_index("Metadata_Well")["Metadata_pert_type"].to_dict() == {
        "A01": "negcon",
        "B02": "trt",
    }
    assert read_image(manifest.Path_ER[0]).dtype == np.uint16


def test_imagexpress_generated_three_channels(tmp_path):
    # BBBC021-like: 3 channels, 16-bit TIFF, channel tokens w1..w3
    write_imagexpress_plate(tmp_path / "img", "Week1_22123", channels=3)
    meta = write_platemap(tmp_path / "meta", "Week1_22123", {"A01": "DMSO", "B02": "taxol"})
    cfg = _config(
        tmp_path / "img",
        "imagexpress",
        meta,
        channel_map={"1": "DNA", "2": "Tubulin", "3": "Actin"},
        channels=["DNA", "Tubulin", "Actin"],
    )
    manifest = build_manifest(cfg)
    assert len(manifest) == 4
    assert [c for c in manifest.columns if c.startswith("Path_")] == [
        "Path_DNA",
        "Path_Tubulin",
        "Path_Actin",
    ]
    assert all("_w2" in p for p in manifest.Path_Tubulin)


def test_loaddata_csv(tmp_path):
    rows = []
    for well in ("A01", "B02"):
        for site in (1, 2):
            row = {"Metadata_Plate": "P9", "Metadata_Well": well, "Metadata_Site": site}
            for k, ch in enumerate(("OrigDNA", "OrigER")):
                name = f"{well}_{site}_{ch}.tif"
                save(cell_image((32, 32), seed=k + site), tmp_path / "images" / name)
                row[f"FileName_{ch}"] = name
                row[f"PathName_{ch}"] = "images"
            rows.append(row)
    pd.DataFrame(rows).to_csv(tmp_path / "load_data.csv", index=False)
    meta = write_platemap(tmp_path / "meta", "P9", {"A01": "DMSO", "B02": "x"})
    cfg = _config(
        tmp_path,
        "loaddata",
        meta,
        channel_map={"OrigDNA": "DNA", "OrigER": "ER"},
        channels=["DNA", "ER"],
        loaddata=str(tmp_path / "load_data.csv"),
    )
    manifest = build_manifest(cfg)
    assert len(manifest) == 4
    assert manifest.Path_ER[0].endswith("A01_1_OrigER.tif")


def test_missing_channel_file_names_the_site(tmp_path):
    write_phenix_plate(tmp_path / "img", "P1")
    (tmp_path / "img" / "P1" / "r02c02f02p01-ch3sk1fk1fl1.png").unlink()
    meta = write_platemap(tmp_path / "meta", "P1", {"A01": "DMSO", "B02": "cpd1"})
    with pytest.raises(DataError, match=r"P1/B02/site 2.*RNA"):
        build_manifest(_config(tmp_path / "img", "phenix", meta))


def test_well_without_treatment_fails(tmp_path):
    write_phenix_plate(tmp_path / "img", "P1")
    meta = write_platemap(tmp_path / "meta", "P1", {"A01": "DMSO"})
    with pytest.raises(DataError, match="B02"):
        build_manifest(_config(tmp_path / "img", "phenix", meta))


def test_duplicate_site_images_fail(tmp_path):
    write_phenix_plate(tmp_path / "img", "P1")
    tmp_path / "img" / "P1" / "r01c01f01p01-ch1sk1fk1fl1.png"
    (tmp_path / "img" / "P1" / "r01c01f01p01-ch1sk1fk1fl1.tiff").write_bytes(b"")  # same site/channel twice
    meta = write_platemap(tmp_path / "meta", "P1", {"A01": "DMSO", "B02": "c"})
    with pytest.raises(DataError, match="more than one DNA"):
        build_manifest(_config(tmp_path / "img", "phenix", meta))


def test_missing_image_root_names_the_key(tmp_path):
    meta = write_platemap(tmp_path / "meta", "P1", {"A01": "DMSO"})
    with pytest.raises(ConfigError, match=r"images\.root"):
        build_manifest(_config(tmp_path / "nope", "phenix", meta))
