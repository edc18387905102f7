"""Every shipped dataset config validates and plans (`snakemake -n`) without any image on disk.

Benchmark datasets are fetched by the workflow itself, so their plan must start with the `fetch` job
(and, when `images.plates` is empty, consist of the fetch alone: the plates are known only afterwards).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from phenoprofiler_core.config import load_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "config").glob("*.yaml"))
BIN = str(Path(sys.executable).parent)
CONTROLS = {
    "bbbc022": ["DMSO@0"],
    "cdrp": ["NA@NA"],
    "taorf": ["EMPTY_"],
    "lincs": ["DMSO"],
    "demo": ["DMSO"],
}


def _plan(config_path: Path, results: Path) -> dict[str, int]:
    """Job counts of `snakemake -n` (rule -> count)."""
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    result = subprocess.run(
        [
            f"{BIN}/snakemake",
            "-n",
            "--cores",
            "2",
            "--configfile",
            str(config_path),
            "--config",
            f"results={results}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    text = result.stdout + result.stderr
    assert result.returncode == 0, f"{config_path.name} does not plan:\n{text[-5000:]}"
    table = text.split("Job stats:", 1)[1].split("\n\n", 1)[0] if "Job stats:" in text else ""
    jobs = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}
    jobs.pop("total", None)
    return jobs


def test_there_are_benchmark_configs():
    names = {p.stem for p in CONFIGS}
    assert {"demo", "bbbc022", "cdrp", "taorf", "lincs", "leave_dataset_out"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_validates(path):
    config = load_config(path)
    assert config["dataset"]
    # channel maps come from the config and cover the canonical channels once each
    assert sorted(config["channels"]) == sorted(
        set(config["images"]["channel_map"].values()) & set(config["channels"])
    )
    if path.stem in CONTROLS:
        assert config["metadata"]["negcon"] == CONTROLS[path.stem]
    if config["fetch"]["activate"]:
        assert config["fetch"]["source"], "fetch.activate needs fetch.source"
    if "train" in config and path.stem != "demo":
        # honest splits only: whole plates or whole treatments, never sites of one well
        assert config["train"]["split"] in ("plate", "treatment")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_plans_without_images(path, tmp_path):
    config = load_config(path)
    jobs = _plan(path, tmp_path)
    assert jobs, f"{path.name}: empty plan"
    datasets = 1 + len(config["train"]["datasets"])  # leave-dataset-out also prepares its training datasets
    if config["fetch"]["activate"]:
        assert jobs.get("fetch") == datasets, jobs
        assert jobs.get("manifest") == datasets, jobs
        if config["metadata"]["index"]:
            assert jobs.get("metadata") == datasets, jobs  # wells/treatments built from the published index
        if not config["images"]["plates"]:
            # plates are found by the manifest (a checkpoint): the plan stops there, the run goes on
            assert set(jobs) <= {"fetch", "metadata", "manifest", "all"}, jobs
        else:
            assert jobs.get("tiles") == len(config["images"]["plates"]), jobs
    else:
        assert "fetch" not in jobs and jobs.get("manifest") == 1
    assert not (tmp_path / config["dataset"] / "manifest.parquet").exists()  # a plan runs nothing


def test_moa_tables_in_resources_match_their_readme():
    moa = REPO / "resources" / "moa"
    readme = (moa / "README.md").read_text()
    import hashlib

    import pandas as pd

    for name, rows in (("BBBC022", 995), ("CDRP", 1550), ("TAORF", 205)):
        path = moa / f"{name}_MOA_MATCHES_official.csv"
        table = pd.read_csv(path)
        assert {"Var1", "Metadata_moa.x"} <= set(table.columns) and len(table) == rows
        assert table.Var1.is_unique and table["Metadata_moa.x"].notna().all()
        assert hashlib.sha256(path.read_bytes()).hexdigest() in readme


def test_readme_documents_every_schema_key():
    """config/README.md names every key of the schema (sections and their keys)."""
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    readme = (REPO / "config" / "README.md").read_text()
    missing = []
    for section, sub in schema["properties"].items():
        if f"`{section}`" not in readme:
            missing.append(section)
        for key in sub.get("properties", {}):
            if f"`{key}`" not in readme and f"`{section}.{key}`" not in readme:
                missing.append(f"{section}.{key}")
    assert not missing, f"config/README.md does not document: {missing}"
