"""The real demo through Snakemake, as a user runs it (slow: a few minutes on 2 cores)."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow
BIN = str(Path(sys.executable).parent)


def snakemake(repo_root, *args, check=True):
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    result = subprocess.run(
        [f"{BIN}/snakemake", "--cores", "2", *args], cwd=repo_root, env=env, capture_output=True, text=True
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
        )
    return result


@pytest.fixture(scope="module")
def demo(demo_results):
    """The whole demo, run once per test session (tests/conftest.py: from a checkout and into a results
    folder whose paths contain spaces -- issue 12: "My Data" folders went through unquoted commands)."""
    return demo_results


def test_demo_ran_from_paths_with_spaces(demo):
    assert " " in str(demo.parent) and " " in str(demo.parent.parent / "my checkout")
    manifest = pd.read_parquet(demo / "manifest.parquet")
    assert all(" " in path for path in manifest["Path_DNA"])  # image paths under the spaced checkout
    log = (demo / "logs" / "illumination" / "SQ00015198.log").read_text()
    assert "error" not in log.lower()


def test_demo_manifest(demo):
    manifest = pd.read_parquet(demo / "manifest.parquet")
    assert len(manifest) == 60 and manifest.Metadata_Plate.nunique() == 5


def test_demo_tiles(demo):
    for plate in ("SQ00015198", "SQ00015233"):
        tiles = np.load(demo / "tiles" / f"{plate}.npy", mmap_mode="r")
        sites = pd.read_parquet(demo / "tiles" / f"{plate}.sites.parquet")
        assert tiles.shape == (12, 5, 448, 448) and tiles.dtype == np.float16
        assert len(sites) == 12 and set(sites.Metadata_Plate) == {plate}
        assert 0.0 <= float(tiles.min()) and float(tiles.max()) <= 1.0
        info = json.loads((demo / "tiles" / f"{plate}.rescale.json").read_text())
        assert info["channels"] == ["DNA", "ER", "RNA", "AGP", "Mito"] and info["illumination"]


def test_demo_illumination(demo):
    for channel in ("DNA", "Mito"):
        function = np.load(demo / "illum" / "SQ00015198" / f"{channel}.npy")
        assert function.shape == (480, 480) and function.min() >= 1.0
    assert (demo / "illum" / "SQ00015198" / "qc.png").stat().st_size > 1000


def test_every_job_left_a_log_and_benchmark(demo):
    assert len(list((demo / "benchmarks").rglob("*.tsv"))) >= 11
    assert (demo / "logs" / "tiles" / "SQ00015198.log").is_file()


def test_demo_report(demo, repo_root, tmp_path):
    page = (demo / "report.html").read_text()
    for section in ("summary", "qc", "training", "metrics", "map", "umap", "runtimes"):
        assert f'id="{section}"' in page
    assert "phenoprofiler_demo" in page and "untrained" in page and "classic" in page
    # the page is also carried by `snakemake --report`
    zipped = tmp_path / "report.zip"
    snakemake(
        repo_root,
        "--configfile",
        "config/demo.yaml",
        "--config",
        f"results={demo.parent}",
        "--report",
        str(zipped),
    )
    with zipfile.ZipFile(zipped) as archive:
        assert any(name.endswith("/report.html") for name in archive.namelist())


def test_demo_training_and_embeddings(demo):
    history = pd.read_csv(demo / "model" / "phenoprofiler_demo" / "history.csv")
    assert set(history.stage) == {1, 2} and set(history.split) == {"train", "validation"}
    for name in ("phenoprofiler_demo", "untrained"):
        features = pd.read_parquet(demo / "features" / name / "SQ00015198.parquet")
        columns = [c for c in features.columns if not c.startswith("Metadata_")]
        assert len(features) == 12 and len(columns) == 672
        assert all(features[c].dtype == np.float32 for c in columns)
    trained = pd.read_parquet(demo / "features" / "phenoprofiler_demo" / "SQ00015198.parquet")
    untrained = pd.read_parquet(demo / "features" / "untrained" / "SQ00015198.parquet")
    assert not np.allclose(trained.filter(like="emb").to_numpy(), untrained.filter(like="emb").to_numpy())


def test_demo_evaluation_covers_every_set(demo):
    summary = pd.read_parquet(demo / "eval" / "summary.parquet")
    assert set(summary["set"]) == {"classic", "phenoprofiler_demo", "untrained"}
    activity = summary[summary.metric == "map_activity"].set_index("set")["value"]
    assert activity.notna().all() and ((activity >= 0) & (activity <= 1)).all()
    for name in ("classic", "phenoprofiler_demo", "untrained"):
        for step in ("well", "normalized", "selected", "consensus"):
            assert (demo / "profiles" / name / f"{step}.parquet").is_file()


def test_config_typo_fails_before_any_job(repo_root, tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text((repo_root / "config" / "demo.yaml").read_text().replace("  size: 448", "  sise: 448"))
    result = snakemake(
        repo_root, "-n", "--configfile", str(bad), "--config", f"results={tmp_path}", check=False
    )
    assert result.returncode != 0
    assert "tiles.sise" in result.stderr + result.stdout
    assert not (tmp_path / "demo").exists()


def test_lint_is_clean(repo_root):
    result = snakemake(repo_root, "--lint", check=False)
    assert "Congratulations" in result.stdout + result.stderr, result.stdout + result.stderr
