"""One command per experiment (issue 13): a leave-dataset-out config runs from an empty folder to its report
in ONE Snakemake invocation, fetching two datasets from a stand-in Cell Painting Gallery.

The loopback S3 server holds two tiny datasets in cpg0019's key layout: images
(``images/<collection>/images/<plate>/IXMtest_<well>_s<site>_w<ch><UUID>.png``, real LINCS pixels from the
demo), DeepProfiler's per-site ``index.csv`` (``workspace/metadata/<collection>/``) and, for the training
dataset, the Cell Painting CNN-1 embeddings (``workspace_dl/embeddings/105281_zenodo7114558/<collection>/
<plate>/<well>/<site>/embedding.npz``).  Treatments carry real compound / ORF ids of the shipped MoA tables.
The run must fetch both, build their metadata tables, discover the plates (no images.plates), train on the
training dataset only, embed and evaluate the other one, and write the report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import loopback_s3, upload_tree
from PIL import Image

pytestmark = pytest.mark.slow
BIN = str(Path(sys.executable).parent)
ROOT = "cpg0019-moshkov-deepprofiler/broad/"
EMBEDDINGS = ROOT + "workspace_dl/embeddings/105281_zenodo7114558/"
# (well, label, MoA key) per plate; the keys are real ids of resources/moa/*_MOA_MATCHES_official.csv
TRAIN_WELLS = [
    ("A01", "DMSO@0", "DMSO"),
    ("A02", "DMSO@0", "DMSO"),
    ("B01", "BRD-A10715913-001-05-0@10.0", "BRD-A10715913-001-05-0"),  # dopamine receptor antagonist
    ("B02", "BRD-A14395271-001-01-3@10.0", "BRD-A14395271-001-01-3"),  # dopamine receptor antagonist
    ("C01", "BRD-A01643550-001-01-1@10.0", "BRD-A01643550-001-01-1"),  # glucocorticoid receptor agonist
    ("C02", "BRD-A13133631-001-01-6@10.0", "BRD-A13133631-001-01-6"),  # glucocorticoid receptor agonist
]
EVAL_WELLS = [
    ("A01", "EMPTY_", "EMPTY"),
    ("A02", "EMPTY_", "EMPTY"),
    ("B01", "GENE1", "BRDN0000464882"),  # MAPK
    ("B02", "GENE2", "BRDN0000464898"),  # MAPK
    ("C01", "GENE3", "BRDN0000464862"),  # TOR
    ("C02", "GENE4", "BRDN0000464863"),  # TOR
]
DEMO_SITES = ["r01c01f01p01", "r01c13f01p01", "r10c18f01p01", "r16c13f01p01", "r01c01f02p01", "r10c18f02p01"]


def _write_collection(repo: Path, out: Path, collection: str, plates, wells, label_col, key_col, teacher):
    """One dataset in the Gallery layout under ``out`` (as the bucket's keys below ROOT)."""
    rng = np.random.default_rng(len(collection))
    demo = repo / "resources" / "demo" / "images"
    rows, k = [], 0
    for p, plate in enumerate(plates):
        for w, (well, label, key) in enumerate(wells):
            source = demo / ["SQ00015198", "SQ00015230"][p % 2] / DEMO_SITES[w]
            for ch in range(1, 6):
                k += 1
                pixels = Image.open(f"{source}-ch{ch}sk1fk1fl1.png").resize((96, 96), Image.BILINEAR)
                name = f"IXMtest_{well}_s1_w{ch}{str(uuid.UUID(int=k)).upper()}.png"
                path = out / "images" / collection / "images" / plate / name
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels.save(path)
            rows.append(
                {
                    "Metadata_Plate": plate,
                    "Metadata_Well": well,
                    "Metadata_Site": 1,
                    label_col: label,
                    key_col: key,
                }
            )
            if teacher:
                emb = out / "workspace_dl/embeddings/105281_zenodo7114558" / collection / plate / well / "1"
                emb.mkdir(parents=True, exist_ok=True)
                np.savez(emb / "embedding.npz", features=rng.normal(size=(5, 672)).astype(np.float32))
    index = out / "workspace" / "metadata" / collection / "index.csv"
    index.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(index, index=False)


def _dataset_config(
    tmp: Path, endpoint: str, name: str, collection: str, index: dict, negcon, teacher
) -> dict:
    data = tmp / "data" / name
    return {
        "dataset": name,
        "results": str(tmp / "results"),
        "images": {
            "root": str(data / "images"),
            "layout": "imagexpress",
            "channel_map": {"1": "DNA", "2": "ER", "3": "RNA", "4": "AGP", "5": "Mito"},
        },
        "metadata": {"index": {"path": str(data / "metadata" / "index.csv"), **index}, "negcon": negcon},
        "illumination": {"activate": False},  # DeepProfiler-prepared PNGs, as in the benchmark configs
        "tiles": {"size": 64},
        "targets": {
            "activate": teacher,
            "root": str(data / "embeddings"),
            "source": f"s3://cellpainting-gallery/{EMBEDDINGS}{collection}/",
        },
        "fetch": {
            "activate": True,
            "source": f"s3://cellpainting-gallery/{ROOT}images/{collection}/images/",
            "include": ["{plate}/*.png"],
            "endpoint_url": endpoint,
            "workers": 2,
            "metadata": [
                {
                    "source": f"s3://cellpainting-gallery/{ROOT}workspace/metadata/{collection}/",
                    "dest": str(data / "metadata"),
                    "include": ["index.csv"],
                }
            ],
        },
    }


@pytest.fixture(scope="module")
def experiment(repo_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lodo")
    bucket = tmp / "bucket"
    _write_collection(repo_root, bucket, "TRAINSET", ["T1", "T2"], TRAIN_WELLS, "Treatment", "Compound", True)
    _write_collection(
        repo_root, bucket, "EVALSET", ["E1", "E2"], EVAL_WELLS, "pert_name", "broad_sample", False
    )
    moa = repo_root / "resources" / "moa"
    with loopback_s3() as (endpoint, client):
        upload_tree(client, bucket, ROOT)
        trainset = _dataset_config(
            tmp,
            endpoint,
            "trainset",
            "TRAINSET",
            {
                "treatment_column": "Treatment",
                "moa_key_column": "Compound",
                "moa_key_length": 13,
                "moa_table": str(moa / "BBBC022_MOA_MATCHES_official.csv"),
            },
            ["DMSO@0"],
            True,
        )
        (tmp / "trainset.yaml").write_text(yaml.safe_dump(trainset))
        lodo = _dataset_config(
            tmp,
            endpoint,
            "lodo_eval",
            "EVALSET",
            {
                "treatment_column": "pert_name",
                "moa_key_column": "broad_sample",
                "moa_table": str(moa / "TAORF_MOA_MATCHES_official.csv"),
            },
            ["EMPTY_"],
            False,
        )
        lodo["model"] = {"backbone": "test_resnet", "input_size": 64, "transformer_ffn": 64}
        lodo["train"] = {
            "name": "lodo_model",
            "datasets": [str(tmp / "trainset.yaml")],
            "epochs_stage1": 1,
            "epochs_stage2": 1,
            "batch_size": 4,
            "missing_targets": "skip",
            "standardize_targets": False,
        }
        lodo["evaluate"] = {"null_size": 200}
        lodo["report"] = {"umap_min_wells": 1000}  # no UMAP for 12 wells: keeps the test quick
        (tmp / "lodo.yaml").write_text(yaml.safe_dump(lodo))
        env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
        run = subprocess.run(
            [f"{BIN}/snakemake", "--cores", "2", "--configfile", str(tmp / "lodo.yaml")],
            cwd=repo_root,
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
    if run.returncode != 0:
        raise AssertionError(f"one invocation failed:\n{run.stdout[-4000:]}\n{run.stderr[-8000:]}")
    return tmp / "results", run


def test_one_invocation_reaches_the_report(experiment):
    results, run = experiment
    page = (results / "lodo_eval" / "report.html").read_text()
    assert "lodo_model" in page and "untrained" in page
    summary = pd.read_parquet(results / "lodo_eval" / "eval" / "summary.parquet")
    assert set(summary["set"]) == {"classic", "lodo_model", "untrained"}
    assert "Nothing to be done" not in run.stderr  # it did the work in this one run


def test_plates_were_found_and_metadata_built_from_the_published_index(experiment):
    results, _ = experiment
    treatments = pd.read_csv(results / "trainset" / "metadata" / "treatments.csv", keep_default_na=False)
    moa = dict(zip(treatments.treatment, treatments.moa))
    assert moa["BRD-A10715913-001-05-0@10.0"] == "dopamine receptor antagonist"
    assert moa["BRD-A01643550-001-01-1@10.0"] == "glucocorticoid receptor agonist"
    assert moa["DMSO@0"] == ""
    evaluated = pd.read_parquet(results / "lodo_eval" / "manifest.parquet")
    assert sorted(evaluated.Metadata_Plate.unique()) == ["E1", "E2"]
    assert dict(zip(evaluated.Metadata_Treatment, evaluated.Metadata_moa))["GENE3"] == "TOR"
    assert set(evaluated.loc[evaluated.Metadata_pert_type == "negcon", "Metadata_Treatment"]) == {"EMPTY_"}


def test_model_is_trained_on_the_other_dataset_only(experiment):
    results, _ = experiment
    # the training dataset's own stages, under its own results folder; its teacher targets fetched
    for plate in ("T1", "T2"):
        assert (results / "trainset" / "tiles" / f"{plate}.npy").is_file()
        targets = pd.read_parquet(results / "trainset" / "targets" / f"{plate}.parquet")
        assert len(targets) == len(TRAIN_WELLS)
    assert not (results / "lodo_eval" / "targets").exists()  # the evaluated dataset is never a teacher
    stats = json.loads((results / "lodo_eval" / "features" / "lodo_model" / "E1.embed.json").read_text())
    assert stats["trained_on"] == {"datasets": {"trainset": ["T1", "T2"]}}
    assert stats["weights"].endswith("lodo_eval/model/lodo_model/stage2.pt")


def test_report_says_what_trained_each_set(experiment):
    results, _ = experiment
    page = (results / "lodo_eval" / "report.html").read_text()
    assert "trained on" in page and "trainset (2 plates)" in page
