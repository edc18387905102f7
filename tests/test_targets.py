"""Regression targets from a tree of single-cell embedding files laid out like cpg0019's
``workspace_dl/embeddings/105281_zenodo7114558/<collection>/<plate>/<well>/<site>/embedding.npz``.

Every expected median below is worked by hand from a few cells with known values.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import loopback_s3, upload_tree

from phenoprofiler_core import cli
from phenoprofiler_core.config import load_config, validate_config
from phenoprofiler_core.errors import ConfigError, DataError
from phenoprofiler_core.targets import (
    build_targets,
    find_sites,
    manifest_sites,
    plate_glob,
    read_cell_embeddings,
    site_file,
    site_median,
)
from phenoprofiler_core.train import TrainConfig, load_training_data, read_targets

NAN = np.nan
BIN = str(Path(sys.executable).parent)

# (plate, well, site) -> cells x 3 features.  Hand-worked medians in EXPECTED.
CELLS = {
    # 4 cells, one with a NaN: the median of the other 3 per column: [1,7,10] [2,8,11] [3,9,0]
    ("P1", "A01", 1): [[1, 2, 3], [4, NAN, 6], [7, 8, 9], [10, 11, 0]],
    # 2 cells: the median of two numbers is their mean
    ("P1", "A01", 2): [[1, 10, -4], [3, 20, -2]],
    # 1 cell
    ("P1", "B12", 1): [[0.5, -1.5, 2.0]],
    # zero cells: no target
    ("P1", "B12", 2): np.zeros((0, 3)),
    # every cell has a NaN: no target
    ("P2", "A01", 1): [[NAN, 1, 1], [2, NAN, 2]],
    # 3 cells, one NaN row dropped -> 2 left: means [5, 5, 5]
    ("P2", "A01", 2): [[4, 6, 5], [NAN, NAN, NAN], [6, 4, 5]],
    # 5 cells: odd count, middle value per column (unsorted input)
    ("P2", "C03", 9): [[5, 1, 0], [1, 2, 0], [4, 3, 0], [2, 4, 0], [3, 5, 7]],
}
EXPECTED = {
    ("P1", "A01", 1): ([7, 8, 3], 3, 1),
    ("P1", "A01", 2): ([2, 15, -3], 2, 0),
    ("P1", "B12", 1): ([0.5, -1.5, 2.0], 1, 0),
    ("P2", "A01", 2): ([5, 5, 5], 2, 1),
    ("P2", "C03", 9): ([3, 3, 0], 5, 0),
}
EMPTY = [("P1", "B12", 2), ("P2", "A01", 1)]
# in the manifest, but its file was never written
ABSENT = ("P2", "D04", 1)


def write_tree(root: Path, cells=CELLS, pattern="{plate}/{well}/{site}/embedding.npz") -> Path:
    for (plate, well, site), values in cells.items():
        path = root / site_file(pattern, plate=plate, well=well, site=site)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, features=np.asarray(values, dtype=np.float32))
    return root


def manifest_of(sites) -> pd.DataFrame:
    rows = [
        {"Metadata_Plate": p, "Metadata_Well": w, "Metadata_Site": s, "Path_DNA": f"/x/{p}_{w}_{s}.png"}
        for p, w, s in sites
    ]
    return pd.DataFrame(rows)


def write_manifest(path: Path, sites) -> Path:
    manifest_of(sites).to_parquet(path, index=False)
    return path


def expected_rows(plate):
    return {k: v for k, v in EXPECTED.items() if k[0] == plate}


def check_table(table: pd.DataFrame, plate: str) -> None:
    expected = expected_rows(plate)
    assert list(table.columns[:5]) == [
        "Metadata_Plate",
        "Metadata_Well",
        "Metadata_Site",
        "Metadata_Cells",
        "Metadata_CellsWithNaN",
    ]
    features = [c for c in table.columns if not c.startswith("Metadata_")]
    assert features == ["embedding_000", "embedding_001", "embedding_002"]
    assert all(table[c].dtype == np.float32 for c in features)
    got = {(r.Metadata_Plate, r.Metadata_Well, int(r.Metadata_Site)): r for r in table.itertuples()}
    assert set(got) == set(expected)
    for key, (median, used, dropped) in expected.items():
        row = table.loc[
            (table.Metadata_Well == key[1]) & (table.Metadata_Site == key[2]), features
        ].to_numpy()[0]
        np.testing.assert_array_equal(row, np.asarray(median, dtype=np.float32))
        assert (got[key].Metadata_Cells, got[key].Metadata_CellsWithNaN) == (used, dropped)


# ----------------------------------------------------------------------------- medians


def test_site_median_drops_nan_rows_then_takes_the_median():
    median, used = site_median(np.array(CELLS[("P1", "A01", 1)], dtype=np.float32))
    np.testing.assert_array_equal(median, [7, 8, 3])
    assert used == 3
    median, used = site_median(np.array([[1, np.inf], [3, 4], [5, 6]]))  # an infinite value drops its cell
    np.testing.assert_array_equal(median, [4, 5])
    assert used == 2
    assert site_median(np.zeros((0, 672))) == (None, 0)
    assert site_median(np.full((3, 2), np.nan)) == (None, 0)


def test_cli_builds_plates_from_a_cpg0019_tree(tmp_path, caplog):
    root = write_tree(tmp_path / "embeddings")
    manifest = write_manifest(tmp_path / "manifest.parquet", list(CELLS))
    for plate in ("P1", "P2"):
        out = tmp_path / "targets" / f"{plate}.parquet"
        with caplog.at_level(logging.INFO):
            code = cli.main(
                [
                    "targets",
                    "--root",
                    str(root),
                    "--plate",
                    plate,
                    "--out",
                    str(out),
                    "--manifest",
                    str(manifest),
                ]
            )
        assert code == 0
        check_table(pd.read_parquet(out), plate)
    # the two sites without usable cells are skipped, counted and named in the log
    log = caplog.text
    assert "plate P1: 1 of 4 sites skipped" in log and "plate P2: 1 of 3 sites skipped" in log
    assert "P1 B12 site 2: no cells left after dropping rows with NaN" in log
    assert "P2 A01 site 1: no cells left after dropping rows with NaN" in log


def test_train_reads_the_tables_and_pairs_each_site_with_its_median(tmp_path):
    root = write_tree(tmp_path / "embeddings")
    manifest = write_manifest(tmp_path / "manifest.parquet", list(CELLS))
    for plate in ("P1", "P2"):
        out = tmp_path / "targets" / f"{plate}.parquet"
        assert (
            cli.main(
                [
                    "targets",
                    "--root",
                    str(root),
                    "--plate",
                    plate,
                    "--out",
                    str(out),
                    "--manifest",
                    str(manifest),
                ]
            )
            == 0
        )
    table = read_targets(["P1", "P2"], targets_dir=str(tmp_path / "targets"))
    # the cell counts are Metadata_ columns: not regression targets
    assert list(table.columns) == [
        "Metadata_Plate",
        "Metadata_Well",
        "Metadata_Site",
        "embedding_000",
        "embedding_001",
        "embedding_002",
    ]
    # site tiles for exactly the sites that have a target, as train pairs them
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for plate in ("P1", "P2"):
        keys = sorted(k for k in EXPECTED if k[0] == plate)
        np.save(tiles / f"{plate}.npy", np.zeros((len(keys), 5, 8, 8), np.float16))
        sites = pd.DataFrame(keys, columns=["Metadata_Plate", "Metadata_Well", "Metadata_Site"])
        sites["Metadata_Treatment"] = ["DMSO", "drug", "drug2"][: len(keys)]
        sites.to_parquet(tiles / f"{plate}.sites.parquet", index=False)
    cfg = TrainConfig.from_dict({"level": "site", "val_fraction": 0})
    data = load_training_data(tiles, ["P1", "P2"], table, cfg, seed=0)
    restored = data.targets * data.target_std + data.target_mean  # train standardizes; undo it
    for i, (plate, row) in enumerate(zip(data.plate_of, data.row_of, strict=True)):
        key = sorted(k for k in EXPECTED if k[0] == plate)[row]
        np.testing.assert_allclose(restored[i], EXPECTED[key][0], atol=1e-5)


def test_a_672_wide_teacher_needs_no_regression_head(tmp_path):
    """With the Cell Painting CNN-1 width the profile itself is regressed (model.py adds a head otherwise)."""
    from phenoprofiler_core.model import create_model

    rng = np.random.default_rng(0)
    cells = {
        ("P1", "A01", 1): rng.normal(size=(4, 672)).astype(np.float32),
        ("P1", "A01", 2): rng.normal(size=(2, 672)).astype(np.float32),
    }
    root = write_tree(tmp_path / "emb", cells)
    out = tmp_path / "P1.parquet"
    assert cli.main(["targets", "--root", str(root), "--plate", "P1", "--out", str(out), "--dim", "672"]) == 0
    table = read_targets(["P1"], targets_dir=str(tmp_path))
    width = table.shape[1] - 3
    assert width == 672
    np.testing.assert_allclose(
        table.iloc[0, 3:].to_numpy(float), np.median(cells[("P1", "A01", 1)].astype(float), axis=0), rtol=1e-6
    )
    model = create_model({"backbone": "resnet10t", "transformer_ffn": 64}, in_channels=5, target_dim=width)
    assert model.regression_head is None
    assert create_model({"backbone": "resnet10t"}, in_channels=5, target_dim=3).regression_head is not None


# ----------------------------------------------------------------------------- missing files and bad files


def test_a_manifest_site_without_a_file_is_an_error_naming_it(tmp_path, capsys):
    root = write_tree(tmp_path / "embeddings")
    manifest = write_manifest(tmp_path / "manifest.parquet", list(CELLS) + [ABSENT])
    out = tmp_path / "P2.parquet"
    code = cli.main(
        ["targets", "--root", str(root), "--plate", "P2", "--out", str(out), "--manifest", str(manifest)]
    )
    assert code == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1  # one line
    assert str(root / "P2" / "D04" / "1" / "embedding.npz") in message
    assert "1 of 4 sites have no embedding file" in message and "targets.missing: skip" in message
    assert not out.exists()


def test_missing_skip_counts_the_site_and_keeps_the_rest(tmp_path, caplog):
    root = write_tree(tmp_path / "embeddings")
    manifest = write_manifest(tmp_path / "manifest.parquet", list(CELLS) + [ABSENT])
    out = tmp_path / "P2.parquet"
    with caplog.at_level(logging.INFO):
        code = cli.main(
            [
                "targets",
                "--root",
                str(root),
                "--plate",
                "P2",
                "--out",
                str(out),
                "--manifest",
                str(manifest),
                "--missing",
                "skip",
            ]
        )
    assert code == 0
    check_table(pd.read_parquet(out), "P2")
    assert "plate P2: 2 of 4 sites skipped" in caplog.text
    assert "P2 D04 site 1: no embedding file" in caplog.text


def test_a_plate_with_no_usable_site_is_an_error(tmp_path):
    root = write_tree(tmp_path / "e", {("P3", "A01", 1): np.zeros((0, 3)), ("P3", "A01", 2): [[NAN, 0, 0]]})
    with pytest.raises(DataError, match="none of 2 sites has a usable embedding"):
        build_targets(find_sites(root, "{plate}/{well}/{site}/embedding.npz", plate="P3"))


def test_bad_files_name_the_file(tmp_path):
    wrong_key = tmp_path / "a.npz"
    np.savez(wrong_key, embeddings=np.zeros((2, 3)))
    with pytest.raises(DataError, match=r"a\.npz: no array 'features' \(arrays: \['embeddings'\]\)"):
        read_cell_embeddings(wrong_key)
    truncated = tmp_path / "b.npz"
    np.savez_compressed(truncated, features=np.ones((50, 672)))
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(DataError, match=r"cannot read embedding file .*b\.npz"):
        read_cell_embeddings(truncated)
    flat = tmp_path / "c.npz"
    np.savez(flat, features=np.ones((2, 3, 4)))
    with pytest.raises(DataError, match=r"c\.npz: 'features' has shape \(2, 3, 4\)"):
        read_cell_embeddings(flat)


def test_width_must_match_dim_and_be_the_same_in_every_file(tmp_path):
    root = write_tree(tmp_path / "e", {("P1", "A01", 1): np.ones((2, 3)), ("P1", "A01", 2): np.ones((2, 4))})
    sites = find_sites(root, "{plate}/{well}/{site}/embedding.npz", plate="P1")
    with pytest.raises(DataError, match=r"A01/2/embedding\.npz: 4 features per cell, expected 3"):
        build_targets(sites)
    with pytest.raises(
        DataError, match=r"A01/1/embedding\.npz: 3 features per cell, expected 672 \(targets\.dim\)"
    ):
        build_targets(sites, dim=672)


# ----------------------------------------------------------------------------- naming patterns


def test_site_file_follows_the_cpg0019_naming_and_other_patterns():
    assert site_file("{plate}/{well}/{site}/embedding.npz", plate="20585", well="A01", site=1) == (
        "20585/A01/1/embedding.npz"
    )
    assert site_file("{plate}/{row}{col}/s{site:02d}.npz", plate="P", well="B07", site=3) == "P/B7/s03.npz"
    assert site_file("{plate}/{well!l}/{site}.npz", plate="24277", well="A01", site=2) == "24277/a01/2.npz"
    assert plate_glob("{plate}/{well}/{site}/embedding.npz", plate="20585") == "20585/*/*/embedding.npz"
    assert plate_glob("{plate!l}/{well}_{site}.npz", plate="SQ1") == "sq1/*_*.npz"


@pytest.mark.parametrize(
    "pattern, message",
    [
        ("{plate}/{well}/{field}/embedding.npz", r"unknown field\(s\) \['field'\]"),
        ("{plate}/{well}/embedding.npz", "needs {site}"),
        ("{plate}/{row}/{site}.npz", "needs {site} and {well}"),
        ("{plate}/{well/{site}.npz", "targets.pattern"),
        ("{plate}/{well!x}/{site}.npz", r"unknown conversion\(s\) \['x'\]"),
    ],
)
def test_bad_patterns_are_config_errors(pattern, message):
    with pytest.raises(ConfigError, match=message):
        plate_glob(pattern, plate="P")


def test_without_a_manifest_the_tree_gives_the_sites(tmp_path):
    """find_sites reads the same keys back from other namings (lower-case row, unpadded column, padded site)."""
    pattern = "{plate}/{row!l}{col}/site_{site:02d}/embedding.npz"
    root = write_tree(tmp_path / "e", pattern=pattern)
    (root / "P1" / "notes.txt").write_text("not an embedding")
    sites = find_sites(root, pattern, plate="P1")
    assert [
        tuple(r) for r in sites[["Metadata_Plate", "Metadata_Well", "Metadata_Site"]].itertuples(index=False)
    ] == [
        ("P1", "A01", 1),
        ("P1", "A01", 2),
        ("P1", "B12", 1),
        ("P1", "B12", 2),
    ]
    assert sites.path.iloc[2] == str(root / "P1" / "b12" / "site_01" / "embedding.npz")
    table, skipped = build_targets(sites)
    check_table(table, "P1")
    assert skipped[["Metadata_Well", "Metadata_Site", "reason"]].values.tolist() == [
        ["B12", 2, "no cells left after dropping rows with NaN"]
    ]
    # the manifest route finds the same files
    from_manifest = manifest_sites(manifest_of(list(CELLS)), root, pattern, plate="P1")
    pd.testing.assert_frame_equal(from_manifest, sites)


def test_an_empty_plate_is_an_error_naming_the_glob(tmp_path):
    root = write_tree(tmp_path / "e")
    with pytest.raises(
        DataError, match=r"no embedding file of plate P9 under .* \(looked for P9/\*/\*/embedding\.npz\)"
    ):
        find_sites(root, "{plate}/{well}/{site}/embedding.npz", plate="P9")


# ----------------------------------------------------------------------------- fetching the tree


def test_fetch_from_local_sources_takes_the_first_holding_the_plate(tmp_path):
    """Like leave-dataset-out: two datasets' trees; each plate is linked from the one that has it."""
    first = write_tree(tmp_path / "bbbc022", {k: v for k, v in CELLS.items() if k[0] == "P1"})
    second = write_tree(tmp_path / "cdrp", {k: v for k, v in CELLS.items() if k[0] == "P2"})
    root = tmp_path / "lodo"
    for plate in ("P1", "P2"):
        out = tmp_path / "targets" / f"{plate}.parquet"
        args = ["targets", "--root", str(root), "--plate", plate, "--out", str(out)]
        assert cli.main(args + ["--source", str(first), "--source", str(second)]) == 0
        check_table(pd.read_parquet(out), plate)
    assert (root / "P1" / "A01" / "1" / "embedding.npz").resolve() == (
        first / "P1/A01/1/embedding.npz"
    ).resolve()
    assert (root / "P2" / "C03" / "9" / "embedding.npz").is_symlink()
    assert sorted(p.name for p in root.iterdir()) == ["P1", "P2"]


def test_fetch_error_names_every_source(tmp_path, capsys):
    first = write_tree(tmp_path / "a", {("P1", "A01", 1): [[1.0]]})
    args = ["targets", "--root", str(tmp_path / "r"), "--plate", "P7", "--out", str(tmp_path / "o.parquet")]
    code = cli.main(args + ["--source", str(first), "--source", str(tmp_path / "b")])
    message = capsys.readouterr().err
    assert code == 2 and "no embedding files of plate P7 in any targets.source" in message
    assert f"{first / 'P7'} (no folder" in message and f"{tmp_path / 'b' / 'P7'} (no folder" in message
    assert not (tmp_path / "o.parquet").exists()


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """A moto S3 server on loopback holding the tree under cpg0019's embeddings prefix."""
    pytest.importorskip("boto3")
    pytest.importorskip("moto.server")
    prefix = "cpg0019-moshkov-deepprofiler/broad/workspace_dl/embeddings/105281_zenodo7114558/BBBC022/"
    with loopback_s3() as (endpoint, client):
        upload_tree(client, write_tree(tmp_path_factory.mktemp("tree")), prefix)
        yield endpoint, f"s3://cellpainting-gallery/{prefix}"


def test_fetch_from_s3_mirrors_only_the_plate_then_builds(tmp_path, gallery):
    endpoint, source = gallery
    root = tmp_path / "embeddings"
    manifest = write_manifest(tmp_path / "manifest.parquet", list(CELLS))
    out = tmp_path / "targets" / "P1.parquet"
    args = ["targets", "--root", str(root), "--plate", "P1", "--out", str(out), "--manifest", str(manifest)]
    args += ["--source", source, "--endpoint-url", endpoint, "--workers", "2"]
    assert cli.main(args) == 0
    check_table(pd.read_parquet(out), "P1")
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert files == [f"P1/{w}/{s}/embedding.npz" for (p, w, s) in sorted(CELLS) if p == "P1"]
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.npz")}
    assert cli.main(args) == 0  # rerun: complete files are not downloaded again
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.npz")} == before


# ----------------------------------------------------------------------------- workflow


def _snakemake(repo_root, *args):
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    return subprocess.run(
        [f"{BIN}/snakemake", "--cores", "2", *args],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _jobs(text: str) -> dict[str, int]:
    import re

    table = text.split("Job stats:", 1)[1].split("\n\n", 1)[0] if "Job stats:" in text else ""
    jobs = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}
    jobs.pop("total", None)
    return jobs


# cdrp/taorf list no plates (they are found after the fetch): two made-up names make the plan concrete
PLAN_PLATES = {
    "cdrp": ["24277", "24278"],
    "taorf": ["41744", "41745"],
    "leave_dataset_out": ["20585", "24277"],
}


@pytest.mark.parametrize("dataset", ["bbbc022", "cdrp", "taorf", "lincs"])
def test_benchmark_configs_train_on_the_teacher(repo_root, tmp_path, dataset):
    """`snakemake -n` for the trained model: one targets job per plate feeds train, classic does not."""
    config = load_config(repo_root / "config" / f"{dataset}.yaml")
    assert config["targets"]["activate"] is True and config["targets"]["dim"] == 672
    plates = config["images"]["plates"] or PLAN_PLATES[dataset]
    overrides = [f"results={tmp_path}"]
    if not config["images"]["plates"]:
        overrides.append("images=" + yaml.safe_dump({"plates": plates}, default_flow_style=True).strip())
    model = tmp_path / config["dataset"] / "model" / "phenoprofiler" / "stage1.pt"
    result = _snakemake(
        repo_root, "-n", "--configfile", f"config/{dataset}.yaml", "--config", *overrides, "--", str(model)
    )
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-4000:]
    jobs = _jobs(text)
    assert jobs.get("targets") == len(plates) and jobs.get("train") == 1, jobs
    assert "classic" not in jobs, jobs  # the hand-crafted features are no longer train's input


def test_leave_dataset_out_trains_on_the_teachers_of_the_training_datasets_only(repo_root, tmp_path):
    """The evaluated dataset (TA-ORF) gets no targets job; BBBC022's and CDRP's plates each get one."""
    cdrp = yaml.safe_load((repo_root / "config" / "cdrp.yaml").read_text())
    cdrp["images"]["plates"] = PLAN_PLATES["cdrp"]  # found after the fetch in a real run
    (tmp_path / "cdrp.yaml").write_text(yaml.safe_dump(cdrp))
    lodo = yaml.safe_load((repo_root / "config" / "leave_dataset_out.yaml").read_text())
    lodo["train"]["datasets"] = ["config/bbbc022.yaml", str(tmp_path / "cdrp.yaml")]
    lodo["images"]["plates"] = PLAN_PLATES["taorf"]
    lodo["results"] = str(tmp_path / "results")
    (tmp_path / "lodo.yaml").write_text(yaml.safe_dump(lodo))
    model = tmp_path / "results" / "lodo_taorf" / "model" / lodo["train"]["name"] / "stage1.pt"
    result = _snakemake(repo_root, "-n", "-p", "--configfile", str(tmp_path / "lodo.yaml"), "--", str(model))
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-4000:]
    jobs = _jobs(text)
    bbbc022 = load_config(repo_root / "config" / "bbbc022.yaml")["images"]["plates"]
    assert jobs.get("targets") == len(bbbc022) + 2 and jobs.get("train") == 1, jobs
    assert "lodo_taorf/targets" not in text and "results/cdrp/targets/24277.parquet" in text
    assert "--tiles-dir" in text and str(tmp_path / "results" / "bbbc022" / "tiles") in text


def test_demo_keeps_the_classic_fallback(repo_root, tmp_path):
    name = load_config(repo_root / "config" / "demo.yaml")["train"]["name"]
    model = tmp_path / "demo" / "model" / name / "stage1.pt"
    plates = yaml.safe_dump(
        {"plates": ["SQ00015198", "SQ00015230", "SQ00015231", "SQ00015232", "SQ00015233"]}
    )
    result = _snakemake(
        repo_root,
        "-n",
        "--configfile",
        "config/demo.yaml",
        "--config",
        f"results={tmp_path}",
        "images=" + plates.strip(),
        "--",
        str(model),
    )
    jobs = _jobs(result.stdout + result.stderr)
    assert result.returncode == 0 and jobs.get("classic") == 5 and "targets" not in jobs, jobs


@pytest.mark.parametrize(
    "targets, train_targets, message",
    [
        ({"activate": True}, None, "config key 'targets.root' is required when targets.activate is true"),
        ({"activate": True, "root": "x"}, "t.parquet", "'train.targets' and 'targets.activate' both choose"),
    ],
)
def test_teacher_config_mistakes_fail_before_any_job(repo_root, tmp_path, targets, train_targets, message):
    config = yaml.safe_load((repo_root / "config" / "demo.yaml").read_text())
    config["results"] = str(tmp_path)
    config["targets"] = targets
    config.setdefault("train", {})["targets"] = train_targets
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = _snakemake(repo_root, "-n", "--configfile", str(path))
    assert result.returncode != 0 and message in result.stdout + result.stderr


def test_schema_defaults():
    config = validate_config(
        {
            "dataset": "d",
            "images": {"root": "r", "layout": "phenix", "channel_map": {"1": "DNA"}},
            "channels": ["DNA"],
        }
    )
    assert config["targets"] == {
        "activate": False,
        "root": None,
        "source": None,
        "pattern": "{plate}/{well}/{site}/embedding.npz",
        "key": "features",
        "missing": "error",
        "dim": 672,
    }


@pytest.mark.slow
def test_workflow_builds_targets_for_the_demo_plates(repo_root, tmp_path):
    """The rule end to end: the demo's manifest, a tree in a local 'source' folder mirrored into root."""
    from phenoprofiler_core.manifest import build_manifest

    config = yaml.safe_load((repo_root / "config" / "demo.yaml").read_text())
    sites = build_manifest(validate_config(config))[["Metadata_Plate", "Metadata_Well", "Metadata_Site"]]
    # site k of the dataset: 3 cells whose median is k in every feature, plus one NaN cell
    cells = {
        (p, w, int(s)): [[k - 1] * 672, [k] * 672, [NAN] * 672, [k + 5] * 672]
        for k, (p, w, s) in enumerate(sites.itertuples(index=False))
    }
    source = write_tree(tmp_path / "gallery", cells)
    config["results"] = str(tmp_path / "results")
    config["targets"] = {"activate": True, "root": str(tmp_path / "root"), "source": str(source)}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    plates = sorted(sites.Metadata_Plate.unique())
    outputs = [str(tmp_path / "results" / "demo" / "targets" / f"{p}.parquet") for p in plates]
    result = _snakemake(repo_root, "--configfile", str(config_path), "--", *outputs)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    table = pd.concat([pd.read_parquet(o) for o in outputs], ignore_index=True)
    assert len(table) == len(sites) == 60
    for k, (p, w, s) in enumerate(sites.itertuples(index=False)):
        row = table[(table.Metadata_Plate == p) & (table.Metadata_Well == w) & (table.Metadata_Site == s)]
        assert row.shape[0] == 1 and (row.iloc[0, 5:].to_numpy(float) == k).all()
        assert int(row.Metadata_Cells.iloc[0]) == 3 and int(row.Metadata_CellsWithNaN.iloc[0]) == 1
