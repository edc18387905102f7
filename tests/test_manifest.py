"""Manifest: the three naming schemes, metadata joins, bit depths, channel counts, bad input."""

import json
import logging

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import cell_image, save, write_imagexpress_plate, write_phenix_plate, write_platemap

from phenoprofiler_core.cli import main
from phenoprofiler_core.config import load_config, validate_config
from phenoprofiler_core.errors import ConfigError, DataError
from phenoprofiler_core.io import read_image
from phenoprofiler_core.manifest import (
    LAYOUT_PATTERNS,
    assemble_manifest,
    build_manifest,
    scan_images,
    sites_table,
)

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
    """The layout alone (the data has one treated well and no control, so no manifest can be built)."""
    src = shared_data / "bbbc022_20585_A01_s2_png8bit"
    images = scan_images(src / "images", LAYOUT_PATTERNS["imagexpress"], plate="20585", layout="imagexpress")
    manifest = sites_table(images, {str(k): v for k, v in CH5.items()}, list(CH5.values()))
    assert len(manifest) == 1
    row = manifest.iloc[0]
    assert (row.Metadata_Plate, row.Metadata_Well, row.Metadata_Site) == ("20585", "A01", 2)
    assert "_w1" in row.Path_DNA and "_w5" in row.Path_Mito
    assert read_image(row.Path_DNA).shape == (520, 696)


def test_pattern_real_jump_tiffs_16bit(shared_data, tmp_path):
    src = shared_data / "jump_rab30_mini" / "tiff"
    pattern = r"(?P<plate>.+)_(?P<well>[A-P]\d\d)_s(?P<site>\d+)_(?P<channel>[A-Za-z]+)\.tif$"
    cmap = {c: c for c in ("DNA", "ER", "RNA", "AGP", "Mito")}
    _config(src, "pattern", {}, channel_map=cmap, pattern=pattern)  # the config validates
    manifest = sites_table(scan_images(src, pattern), cmap, list(CH5.values()))
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


def test_imaged_well_without_plate_map_row_is_counted_and_left_out(tmp_path):
    write_phenix_plate(tmp_path / "img", "P1", wells=("A01", "B02", "C03"))
    meta = write_platemap(tmp_path / "meta", "P1", {"A01": "DMSO", "B02": "cpd", "H12": "cpd2"})
    manifest, summary = assemble_manifest(_config(tmp_path / "img", "phenix", meta))
    assert sorted(set(manifest.Metadata_Well)) == ["A01", "B02"]  # C03 has images but no row
    assert summary["images_without_platemap_row"] == {
        "count": 2,  # C03 sites 1 and 2
        "examples": [{"plate": "P1", "well": "C03", "site": 1}, {"plate": "P1", "well": "C03", "site": 2}],
    }
    assert summary["platemap_wells_without_images"] == {
        "count": 1,
        "examples": [{"plate": "P1", "well": "H12", "treatment": "cpd2"}],
    }
    assert any("C03" in w for w in summary["warnings"]) and any("H12" in w for w in summary["warnings"])


@pytest.mark.parametrize("unmatched", ["image", "platemap"])
def test_missing_wells_error_stops_the_manifest(tmp_path, unmatched):
    write_phenix_plate(tmp_path / "img", "P1")
    wells = {"A01": "DMSO"} if unmatched == "image" else {"A01": "DMSO", "B02": "c", "D04": "c"}
    meta = write_platemap(tmp_path / "meta", "P1", wells)
    meta["missing_wells"] = "error"
    expected = r"well B02" if unmatched == "image" else r"plate-map well\(s\) have no images.*D04"
    with pytest.raises(DataError, match=expected + r".*missing_wells: error"):
        build_manifest(_config(tmp_path / "img", "phenix", meta))


def test_empty_treatment_cell_says_how_to_fix(tmp_path):
    write_phenix_plate(tmp_path / "img", "P1")
    meta = write_platemap(tmp_path / "meta", "P1", {"A01": "", "B02": "cpd"})
    with pytest.raises(DataError, match=r"empty 'broad_sample'.*well A01.*metadata\.empty_treatment"):
        build_manifest(_config(tmp_path / "img", "phenix", meta))
    meta["empty_treatment"] = "DMSO"
    manifest = build_manifest(_config(tmp_path / "img", "phenix", meta))
    assert set(manifest.loc[manifest.Metadata_Well == "A01", "Metadata_pert_type"]) == {"negcon"}


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


# ----------------------------------------------------------------------------- issue 10: first tries


@pytest.mark.parametrize(
    "channel_map",
    [
        {1: "DNA", 2: "ER", 3: "RNA", 4: "AGP", 5: "Mito"},  # YAML integers: `1: DNA`
        {"1": "DNA", "2": "ER", "3": "RNA", "4": "AGP", "5": "Mito"},
        {"ch1": "DNA", "ch2": "ER", "ch3": "RNA", "ch4": "AGP", "ch5": "Mito"},
        {"w1": "DNA", "w2": "ER", "w3": "RNA", "w4": "AGP", "w5": "Mito"},
        {"01": "DNA", "CH2": "ER", "W3": "RNA", "c4": "AGP", 5: "Mito"},
    ],
    ids=["int", "str", "ch", "w", "mixed"],
)
@pytest.mark.parametrize("layout", ["phenix", "imagexpress"])
def test_channel_map_accepts_what_people_write(tmp_path, channel_map, layout):
    writer = write_phenix_plate if layout == "phenix" else write_imagexpress_plate
    writer(tmp_path / "img", "P1")
    meta = write_platemap(tmp_path / "meta", "P1", {"A01": "DMSO", "B02": "cpd"})
    manifest = build_manifest(_config(tmp_path / "img", layout, meta, channel_map=channel_map))
    assert len(manifest) == 4
    token = "-ch{}sk" if layout == "phenix" else "_w{}"
    for number, name in enumerate(["DNA", "ER", "RNA", "AGP", "Mito"], start=1):
        assert all(token.format(number) in p for p in manifest[f"Path_{name}"])


def test_channel_map_as_a_user_writes_it_in_yaml(tmp_path):
    """`5: DNA` in a YAML file (an integer key) used to drop every image; now it maps channel 5."""
    write_phenix_plate(tmp_path / "img", "P1")
    meta = write_platemap(tmp_path / "meta", "P1", {"A01": "DMSO", "B02": "cpd"})
    text = (
        f"dataset: t\nimages:\n  root: {tmp_path / 'img'}\n  layout: phenix\n  channel_map:\n"
        "    5: DNA\n    4: ER\n    3: RNA\n    2: AGP\n    1: Mito\n"
        f"metadata: {json.dumps(meta)}\n"
    )
    (tmp_path / "c.yaml").write_text(text)
    assert list(yaml.safe_load(text)["images"]["channel_map"]) == [5, 4, 3, 2, 1]
    manifest = build_manifest(load_config(tmp_path / "c.yaml"))
    assert all(p.endswith("-ch5sk1fk1fl1.png") for p in manifest.Path_DNA)
    assert all(p.endswith("-ch1sk1fk1fl1.png") for p in manifest.Path_Mito)


def test_no_file_matches_the_channel_map_names_tokens_and_map(tmp_path):
    # layout pattern capturing stain names, but the map is written with channel numbers
    write_phenix_plate(tmp_path / "img", "P1", channels=2)
    for path in (tmp_path / "img" / "P1").iterdir():
        path.rename(path.with_name(path.name.replace("-ch1sk", "-Hoechst_").replace("-ch2sk", "-Syto_")))
    meta = write_platemap(tmp_path / "meta", "P1", {"A01": "DMSO", "B02": "cpd"})
    cfg = _config(
        tmp_path / "img",
        "pattern",
        meta,
        channel_map={"1": "DNA", "2": "RNA"},
        channels=["DNA", "RNA"],
        pattern=r"r(?P<row>\d\d)c(?P<col>\d\d)f(?P<site>\d+)p01-(?P<channel>[A-Za-z]+)_",
    )
    with pytest.raises(DataError, match=r"tokens found.*\['Hoechst', 'Syto'\].*\{'1': 'DNA', '2': 'RNA'\}"):
        build_manifest(cfg)


def test_images_plate_wins_over_the_folder_name(tmp_path):
    """The issue: a folder 'images' under root became the plate, then 'plate images is not listed'."""
    write_phenix_plate(tmp_path / "root", "images")
    meta = write_platemap(tmp_path / "meta", "SQ00015198", {"A01": "DMSO", "B02": "cpd"})
    manifest = build_manifest(_config(tmp_path / "root", "phenix", meta, plate="SQ00015198"))
    assert set(manifest.Metadata_Plate) == {"SQ00015198"} and len(manifest) == 4
    # without images.plate the folder is the plate, and the error says what to do
    with pytest.raises(DataError, match=r"plate images is not listed.*set images\.plate"):
        build_manifest(_config(tmp_path / "root", "phenix", meta))


def test_wells_table_plate_column_is_configurable(tmp_path):
    write_phenix_plate(tmp_path / "img", "P1")
    write_phenix_plate(tmp_path / "img", "P2")
    table = tmp_path / "wells.csv"
    table.write_text(
        "Metadata_Plate,well_position,broad_sample\nP1,A01,DMSO\nP1,B02,cpdA\nP2,A01,DMSO\nP2,B02,cpdB\n"
    )
    meta = {"wells": str(table), "plate_column": "Metadata_Plate"}
    manifest = build_manifest(_config(tmp_path / "img", "phenix", meta))
    got = manifest.drop_duplicates(["Metadata_Plate", "Metadata_Well"]).set_index(
        ["Metadata_Plate", "Metadata_Well"]
    )["Metadata_Treatment"]
    assert got.to_dict() == {
        ("P1", "A01"): "DMSO",
        ("P1", "B02"): "cpdA",
        ("P2", "A01"): "DMSO",
        ("P2", "B02"): "cpdB",
    }
    # with the default plate column ('plate', absent here) the table would apply to every plate and
    # give each well two treatments: the error names the well
    with pytest.raises(DataError, match=r"more than one treatment.*\['cpdA', 'cpdB'\]"):
        build_manifest(_config(tmp_path / "img", "phenix", {"wells": str(table)}))


def test_negcon_matching_no_well_names_the_key_and_closest_labels(tmp_path):
    write_phenix_plate(tmp_path / "img", "P1")
    meta = write_platemap(tmp_path / "meta", "P1", {"A01": "DMSO", "B02": "cpd"})
    meta["negcon"] = ["DMSO@0"]  # the issue: BBBC022's label on a LINCS plate map
    with pytest.raises(ConfigError, match=r"metadata\.negcon.*'DMSO@0'.*closest.*\['DMSO'\]"):
        build_manifest(_config(tmp_path / "img", "phenix", meta))


def test_controls_per_plate_warning_or_error_by_scope(tmp_path, caplog):
    write_phenix_plate(tmp_path / "img", "P1")
    write_phenix_plate(tmp_path / "img", "P2")
    table = tmp_path / "wells.csv"
    table.write_text("plate,well_position,broad_sample\nP1,A01,DMSO\nP1,B02,a\nP2,A01,b\nP2,B02,a\n")
    cfg = _config(tmp_path / "img", "phenix", {"wells": str(table)})
    with caplog.at_level(logging.WARNING):
        _, summary = assemble_manifest(cfg)
    assert summary["controls_per_plate"] == {"P1": 1, "P2": 0}
    assert any("P2" in w and "no negative-control" in w for w in summary["warnings"])
    assert "P2" in caplog.text
    cfg["profiles"]["normalize_scope"] = "plate"  # per-plate normalization needs controls on every plate
    with pytest.raises(DataError, match=r"\['P2'\].*normalize_scope is 'plate'"):
        assemble_manifest(cfg)
    table.write_text("plate,well_position,broad_sample\nP1,A01,a\nP1,B02,b\nP2,A01,b\nP2,B02,a\n")
    with pytest.raises(DataError, match=r"no plate has negative-control wells"):
        assemble_manifest(_config(tmp_path / "img", "phenix", {"wells": str(table), "negcon": []}))


def test_manifest_cli_writes_the_summary(tmp_path, capsys):
    write_phenix_plate(tmp_path / "img", "P1", wells=("A01", "B02", "C03"), sites=(1, 2, 3))
    meta = write_platemap(tmp_path / "meta", "P1", {"A01": "DMSO", "B02": "cpd", "C03": "cpd", "E05": "x"})
    config = {
        "dataset": "t",
        "images": {"root": str(tmp_path / "img"), "layout": "phenix", "channel_map": {"1": "DNA"}},
        "channels": ["DNA"],
        "metadata": meta,
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    out, summary_path = tmp_path / "m.parquet", tmp_path / "m.summary.json"
    code = main(
        [
            "manifest",
            "--configfile",
            str(tmp_path / "c.yaml"),
            "--out",
            str(out),
            "--summary",
            str(summary_path),
        ]
    )
    assert code == 0, capsys.readouterr().err
    summary = json.loads(summary_path.read_text())
    assert list(summary) == [
        "sites",
        "plates",
        "wells",
        "treatments",
        "controls_per_plate",
        "platemap_wells_without_images",
        "images_without_platemap_row",
        "warnings",
    ]
    # 3 wells x 3 sites; treatments DMSO and cpd; E05 is mapped but not imaged
    assert (summary["sites"], summary["plates"], summary["wells"], summary["treatments"]) == (9, 1, 3, 2)
    assert summary["controls_per_plate"] == {"P1": 1}
    assert summary["platemap_wells_without_images"]["count"] == 1
    assert summary["images_without_platemap_row"] == {"count": 0, "examples": []}
    # channel tokens 2..5 are on disk but not mapped: said once
    assert any("['2', '3', '4', '5']" in w for w in summary["warnings"])


def test_summary_examples_are_capped_at_ten(tmp_path):
    write_phenix_plate(tmp_path / "img", "P1", channels=1)
    wells = {"A01": "DMSO", "B02": "cpd"} | {f"C{c:02d}": "other" for c in range(1, 25)}
    meta = write_platemap(tmp_path / "meta", "P1", wells)
    _, summary = assemble_manifest(
        _config(tmp_path / "img", "phenix", meta, channel_map={"1": "DNA"}, channels=["DNA"])
    )
    missing = summary["platemap_wells_without_images"]
    assert missing["count"] == 24 and len(missing["examples"]) == 10
    assert missing["examples"][0] == {"plate": "P1", "well": "C01", "treatment": "other"}
