"""Bad input through the CLI, as a user meets it: one clear line naming the culprit, exit code 2,
and no partial output left behind.  (Config typos: test_config.py; the model's bad inputs:
test_train.py / test_checkpoint.py.)"""

import logging
import re

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import cell_image, save, write_phenix_plate, write_platemap

from phenoprofiler_core.cli import main

CH = {"1": "DNA", "2": "ER", "3": "RNA", "4": "AGP", "5": "Mito"}


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


@pytest.fixture()
def dataset(tmp_path):
    """A 2-well Phenix plate (DMSO + compound) with its config file."""
    write_phenix_plate(tmp_path / "img", "P1", shape=(96, 96))
    meta = write_platemap(tmp_path / "meta", "P1", {"A01": "DMSO", "B02": "cpd"})
    config = {
        "dataset": "bad",
        "images": {"root": str(tmp_path / "img"), "layout": "phenix", "channel_map": CH},
        "metadata": meta,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return tmp_path, path, config


def manifest_of(capsys, tmp_path, configfile):
    out = tmp_path / "manifest.parquet"
    code, err = run(capsys, "manifest", "--configfile", configfile, "--out", out)
    assert code == 0, err
    return out


def image_path(tmp_path, well="r02c02", site=1, ch=3):
    return tmp_path / "img" / "P1" / f"{well}f{site:02d}p01-ch{ch}sk1fk1fl1.png"


def test_missing_channel_file(capsys, dataset):
    tmp_path, configfile, _ = dataset
    image_path(tmp_path).unlink()
    code, err = run(capsys, "manifest", "--configfile", configfile, "--out", tmp_path / "m.parquet")
    assert code == 2 and "P1/B02/site 1" in err and "RNA" in err
    assert not (tmp_path / "m.parquet").exists()


@pytest.mark.parametrize("stage", ["illumination", "tiles"])
def test_truncated_png(capsys, dataset, stage):
    tmp_path, configfile, _ = dataset
    manifest = manifest_of(capsys, tmp_path, configfile)
    bad = image_path(tmp_path)
    bad.write_bytes(bad.read_bytes()[:80])
    out = tmp_path / "out" / ("P1.npy" if stage == "tiles" else "P1")
    code, err = run(capsys, stage, manifest, "--plate", "P1", "--out", out)
    assert code == 2 and bad.name in err and "cannot decode" in err
    assert not out.exists()
    leftovers = list((tmp_path / "out").iterdir()) if (tmp_path / "out").exists() else []
    assert leftovers == [], leftovers


def test_corrupt_tiff_in_a_tiff_plate(capsys, tmp_path):
    write_phenix_plate(tmp_path / "img", "P1", suffix=".tif", dtype=np.uint16, shape=(64, 64))
    meta = write_platemap(tmp_path / "meta", "P1", {"A01": "DMSO", "B02": "cpd"})
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "dataset": "t",
                "images": {"root": str(tmp_path / "img"), "layout": "phenix", "channel_map": CH},
                "metadata": meta,
            }
        )
    )
    manifest = manifest_of(capsys, tmp_path, cfg)
    bad = tmp_path / "img" / "P1" / "r01c01f02p01-ch5sk1fk1fl1.tif"
    bad.write_bytes(b"II*\x00" + b"\x00" * 20)
    code, err = run(capsys, "tiles", manifest, "--plate", "P1", "--out", tmp_path / "t" / "P1.npy")
    assert code == 2 and bad.name in err
    assert not (tmp_path / "t" / "P1.npy").exists()


def test_wrong_size_and_bit_depth_within_a_plate(capsys, dataset):
    tmp_path, configfile, _ = dataset
    manifest = manifest_of(capsys, tmp_path, configfile)
    save(cell_image((96, 120), dtype=np.uint8), image_path(tmp_path, ch=2))
    code, err = run(capsys, "tiles", manifest, "--plate", "P1", "--out", tmp_path / "P1.npy")
    assert code == 2 and image_path(tmp_path, ch=2).name in err and "other images of this plate" in err
    save(cell_image((96, 96), dtype=np.uint16), image_path(tmp_path, ch=2))
    code, err = run(capsys, "illumination", manifest, "--plate", "P1", "--out", tmp_path / "illum")
    assert code == 2 and "mixed bit depth" in err and not (tmp_path / "illum").exists()


def test_nan_image(capsys, tmp_path):
    rows = []
    for s in range(2):
        row = {"Metadata_Plate": "P", "Metadata_Well": "A01", "Metadata_Site": s + 1}
        image = np.ones((32, 32), np.float32)
        if s == 1:
            image[5, 5] = np.nan
        row["Path_DNA"] = str(save(image, tmp_path / f"s{s}.tif"))
        rows.append(row)
    pd.DataFrame(rows).to_parquet(tmp_path / "m.parquet")
    code, err = run(capsys, "tiles", tmp_path / "m.parquet", "--plate", "P", "--out", tmp_path / "P.npy")
    assert code == 2 and "s1.tif" in err and "NaN" in err


def test_constant_image_site_is_a_counted_skip(capsys, dataset, caplog):
    """An empty (constant) site is not an error: it gets zero cells, logged, and stays in the output."""
    tmp_path, configfile, _ = dataset
    manifest = manifest_of(capsys, tmp_path, configfile)
    for ch in range(1, 6):
        save(np.full((96, 96), 7, np.uint8), image_path(tmp_path, ch=ch))
    out = tmp_path / "classic.parquet"
    with caplog.at_level(logging.WARNING):
        code, err = run(capsys, "classic", manifest, "--plate", "P1", "--out", out)
    assert code == 0, err
    features = pd.read_parquet(out)
    empty = features[(features.Metadata_Well == "B02") & (features.Metadata_Site == 1)]
    assert len(features) == 4 and empty["Count_Nuclei"].item() == 0
    assert "no nuclei" in caplog.text


def test_plate_listed_but_without_images(capsys, dataset):
    tmp_path, configfile, config = dataset
    config["images"]["plates"] = ["P1", "P2"]
    configfile.write_text(yaml.safe_dump(config))
    code, err = run(capsys, "manifest", "--configfile", configfile, "--out", tmp_path / "m.parquet")
    assert code == 2 and "images.plates" in err and "P2" in err


def test_plate_without_negative_controls(capsys, tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for plate, treatments in (("P1", ["DMSO", "a"]), ("P2", ["a", "b"])):
        for well, trt in zip(("A01", "B01"), treatments):
            rows.append(
                {
                    "Metadata_Plate": plate,
                    "Metadata_Well": well,
                    "Metadata_Site": 1,
                    "Metadata_Treatment": trt,
                    "Metadata_TreatmentId": trt,
                    "Metadata_pert_type": "negcon" if trt == "DMSO" else "trt",
                    "Metadata_moa": "",
                    **{f"f{k}": rng.normal() for k in range(5)},
                }
            )
    df = pd.DataFrame(rows)
    for plate, part in df.groupby("Metadata_Plate"):
        part.to_parquet(tmp_path / f"{plate}.parquet")
    out = tmp_path / "profiles"
    code, err = run(
        capsys, "profiles", "--features", tmp_path / "P1.parquet", tmp_path / "P2.parquet", "--out", out
    )
    assert code == 2 and "P2" in err and "negative-control" in err
    assert not out.exists() or list(out.glob("*.parquet")) == []


def test_treatment_without_moa_is_kept_and_reported(capsys, dataset, caplog):
    tmp_path, configfile, config = dataset
    table = tmp_path / "treatments.csv"
    # 'cpd' has a row but no MoA label: kept, reported, left out of the MoA metrics
    table.write_text("broad_sample,pert_iname,moa\ncpd,cpd,\nother,x,some MoA\n")
    config["metadata"].update({"treatments": str(table), "treatment_name_column": "pert_iname"})
    configfile.write_text(yaml.safe_dump(config))
    with caplog.at_level(logging.WARNING):
        manifest = pd.read_parquet(manifest_of(capsys, tmp_path, configfile))
    assert set(manifest.loc[manifest.Metadata_Treatment == "cpd", "Metadata_moa"]) == {""}
    assert "no MoA annotation" in caplog.text and "cpd" in caplog.text


def test_treatments_table_matching_no_treatment_stops_naming_both_keys(capsys, dataset):
    """A MoA table keyed otherwise than the plate maps (BBBC022's 13-character ids against
    '<compound>@<dose>' labels) used to give 0 matches, a warning, and a run dying at evaluate."""
    tmp_path, configfile, config = dataset
    table = tmp_path / "treatments.csv"
    table.write_text("Var1,Metadata_moa.x\nBRD-K98763141,some MoA\n")
    config["metadata"].update(
        {"treatments": str(table), "treatment_id_column": "Var1", "moa_column": "Metadata_moa.x"}
    )
    configfile.write_text(yaml.safe_dump(config))
    code, err = run(capsys, "manifest", "--configfile", configfile, "--out", tmp_path / "m.parquet")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "'broad_sample'" in err and "'Var1'" in err and "BRD-K98763141" in err and "cpd" in err
    assert not (tmp_path / "m.parquet").exists()


def test_unreadable_manifest(capsys, tmp_path):
    code, err = run(
        capsys, "tiles", tmp_path / "absent.parquet", "--plate", "P1", "--out", tmp_path / "P1.npy"
    )
    assert code == 2 and "absent.parquet" in err


# ----------------------------------------------------------------------------- the manifest stops first


def manifest_fails(capsys, tmp_path, configfile) -> str:
    """Run the manifest step expecting a user error: exit 2, one line, no output written."""
    out, summary = tmp_path / "m.parquet", tmp_path / "m.summary.json"
    code, err = run(capsys, "manifest", "--configfile", configfile, "--out", out, "--summary", summary)
    lines = [line for line in err.splitlines() if line.startswith("phenoprofiler manifest: error:")]
    assert code == 2 and len(lines) == 1, err
    assert "Traceback" not in err
    assert not out.exists() and not summary.exists()
    return lines[0]


def test_image_of_another_size_stops_the_manifest(capsys, dataset):
    tmp_path, configfile, _ = dataset
    bad = image_path(tmp_path, well="r02c02", site=2, ch=4)
    save(cell_image((96, 120), dtype=np.uint8), bad)
    line = manifest_fails(capsys, tmp_path, configfile)
    assert bad.name in line and "120x96 px" in line and "96x96 px" in line


def test_mixed_bit_depth_stops_the_manifest(capsys, dataset):
    tmp_path, configfile, _ = dataset
    bad = image_path(tmp_path, well="r02c02", site=1, ch=2)
    save(cell_image((96, 96), dtype=np.uint16), bad)
    line = manifest_fails(capsys, tmp_path, configfile)
    assert bad.name in line and "uint16" in line and "mixed bit depth" in line


def test_colour_image_stops_the_manifest(capsys, dataset):
    tmp_path, configfile, _ = dataset
    bad = image_path(tmp_path, well="r02c02", site=2, ch=1)
    save(np.zeros((96, 96, 3), np.uint8), bad)
    line = manifest_fails(capsys, tmp_path, configfile)
    assert bad.name in line and "one grey channel" in line


def test_undecodable_tiff_stops_the_manifest(capsys, tmp_path):
    """A compression without a decoder (the issue's missing codec) is found by the manifest, not a
    per-plate job: the first image of each plate and channel is decoded, every header is read."""
    import tifffile

    write_phenix_plate(tmp_path / "img", "P1", suffix=".tif", dtype=np.uint16, shape=(64, 64))
    meta = write_platemap(tmp_path / "meta", "P1", {"A01": "DMSO", "B02": "cpd"})
    bad = tmp_path / "img" / "P1" / "r02c02f02p01-ch3sk1fk1fl1.tif"
    tifffile.imwrite(bad, cell_image((64, 64), dtype=np.uint16), compression="adobe_deflate")
    with tifffile.TiffFile(bad) as tif:
        offset = tif.pages[0].tags["Compression"].valueoffset
    data = bytearray(bad.read_bytes())
    data[offset : offset + 2] = (60000).to_bytes(2, "little")
    bad.write_bytes(bytes(data))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "dataset": "t",
                "images": {"root": str(tmp_path / "img"), "layout": "phenix", "channel_map": CH},
                "metadata": meta,
            }
        )
    )
    line = manifest_fails(capsys, tmp_path, cfg)
    assert bad.name in line and "compression 60000 has no decoder" in line


@pytest.mark.parametrize(
    "change,expected",
    [
        (
            {"images": {"channel_map": {"ch 1": "DNA"}}},
            r"images\.channel_map.*'ch 1'.*write the channel number",
        ),
        ({"images": {"channel_map": {"1": "DNA", "ch1": "ER"}}}, r"keys '1' and 'ch1' both mean channel 1"),
        ({"metadata": {"negcon": ["DMSO@0"]}}, r"metadata\.negcon.*'DMSO@0'.*\['DMSO'\]"),
        ({"images": {"plate": "my plate"}}, r"unsafe plate name 'my plate' from .*'images\.plate'"),
        ({"dataset": "../escape"}, r"unsafe dataset name '\.\./escape'.*starts with '\.'"),
        ({"metadata": {"wells": "absent.csv"}}, r"metadata\.wells.*absent\.csv"),
    ],
    ids=["channel-key", "channel-twice", "negcon", "plate-name", "dataset-name", "wells-file"],
)
def test_config_mistakes_are_one_line(capsys, dataset, change, expected):
    tmp_path, configfile, config = dataset
    for key, value in change.items():
        if isinstance(value, dict):
            section = dict(config[key])
            if "channel_map" in value:
                section["channel_map"] = value["channel_map"]
                config["channels"] = list(dict.fromkeys(value["channel_map"].values()))
            else:
                section.update(value)
            config[key] = section
        else:
            config[key] = value
    configfile.write_text(yaml.safe_dump(config))
    line = manifest_fails(capsys, tmp_path, configfile)
    assert re.search(expected, line), line
