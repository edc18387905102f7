"""Checks before any job, config overlays, and the cluster-fit requests (issues 13 and 14)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from helpers import write_phenix_plate

from phenoprofiler_core.cluster import Request, requests_of_jobs
from phenoprofiler_core.config import load_config
from phenoprofiler_core.errors import ConfigError
from phenoprofiler_core.manifest import LAYOUT_PATTERNS, scan_images
from phenoprofiler_core.workflow_checks import (
    check_plate_folders,
    check_pretrained_weights,
    check_training_datasets,
)

BIN = str(Path(sys.executable).parent)
DEMO_PLATES = ["SQ00015198", "SQ00015230", "SQ00015231", "SQ00015232", "SQ00015233"]


def _snakemake(repo_root, *args, timeout=600):
    return subprocess.run(
        [f"{BIN}/snakemake", "--cores", "1", *args],
        cwd=repo_root,
        env=dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_training_datasets_must_fit_the_evaluated_one(repo_root):
    main = load_config(repo_root / "config" / "taorf.yaml")
    other = load_config(repo_root / "config" / "bbbc022.yaml")
    check_training_datasets(main, {"bbbc022": other})  # same channels and tile size: fine
    with pytest.raises(ConfigError, match="channels"):
        check_training_datasets(main, {"bbbc022": {**other, "channels": ["DNA", "ER", "RNA"]}})
    with pytest.raises(ConfigError, match=r"tiles\.size 224"):
        check_training_datasets(main, {"bbbc022": {**other, "tiles": {**other["tiles"], "size": 224}}})
    with pytest.raises(ConfigError, match="evaluated dataset itself"):
        check_training_datasets(main, {"taorf": main})


def test_listed_plates_need_their_folders(tmp_path):
    write_phenix_plate(tmp_path / "images", "P1")
    config = {
        "dataset": "d",
        "images": {
            "root": str(tmp_path / "images"),
            "layout": "phenix",
            "plates": ["P1", "P2"],
            "plate": None,
        },
    }
    with pytest.raises(
        ConfigError, match=r"images.plates' lists 1 plate\(s\) with no folder.*\['P2'\].*\['P1'\]"
    ):
        check_plate_folders(config)
    check_plate_folders({**config, "images": {**config["images"], "plates": ["P1"]}})


def test_pretrained_weights_missing_offline_fail_at_once(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.pretrained_file"):
        check_pretrained_weights(
            {"pretrained": True, "pretrained_file": str(tmp_path / "none.pth"), "backbone": "resnet18"}
        )
    check_pretrained_weights({"pretrained": False, "backbone": "resnet18"})  # nothing to check


def test_symlinked_plate_folders_are_followed(tmp_path):
    store = tmp_path / "store"
    write_phenix_plate(store, "P1", wells=("A01",), sites=(1,))
    root = tmp_path / "images"
    root.mkdir()
    (root / "P1").symlink_to(store / "P1", target_is_directory=True)  # a plate folder linked from a store
    (root / "loop").symlink_to(root, target_is_directory=True)  # a link loop must not hang the scan
    images = scan_images(root, LAYOUT_PATTERNS["phenix"], layout="phenix")
    assert set(images.plate) == {"P1"} and len(images) == 5


def test_requests_of_jobs_take_each_rules_largest_job_and_the_config_for_unplanned_rules():
    def job(rule, threads, **resources):
        return SimpleNamespace(rule=SimpleNamespace(name=rule), threads=threads, resources=resources)

    jobs = [
        job("tiles", 2, mem_mb=2000),
        job("tiles", 4, mem_mb=3000),
        job("embed", 2, mem_mb=8000, gpu=1, slurm_partition="gpu"),
        job("train", 8, mem_mb=32000, gres="gpu:a100:2"),
    ]
    planned = {
        "classic": {"threads": 8, "mem_mb": 16000, "runtime": 60},
        "tiles": {"threads": 1, "mem_mb": 1},
    }
    requests = {r.rule: r for r in requests_of_jobs(jobs, planned)}
    assert requests["tiles"] == Request("tiles", cpus=4, memory_mb=3000)  # the planned job, not the config
    assert requests["embed"] == Request("embed", cpus=2, memory_mb=8000, gpus=1, partition="gpu")
    assert requests["train"].gpus == 2
    assert requests["classic"] == Request("classic", cpus=8, memory_mb=16000)  # not planned yet: the config


def test_overlay_configs_merge_key_by_key(repo_root, tmp_path):
    """`--configfile config/demo.yaml my.yaml`: my.yaml's keys win, the shipped config's others stay."""
    overlay = tmp_path / "my.yaml"
    overlay.write_text(
        yaml.safe_dump(
            {"results": str(tmp_path / "r"), "images": {"plates": DEMO_PLATES}, "train": {"epochs_stage1": 3}}
        )
    )
    result = _snakemake(repo_root, "-n", "-p", "--configfile", "config/demo.yaml", str(overlay))
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout + result.stderr
    assert '"epochs_stage1": 3' in text and '"epochs_stage2": 10' in text  # overlay + the demo's own key
    assert '"backbone": "resnet18"' in text  # a section the overlay did not touch
    assert str(tmp_path / "r") in text


def test_pretrained_weights_are_checked_before_any_job(repo_root, tmp_path):
    overlay = tmp_path / "pretrained.yaml"
    overlay.write_text(yaml.safe_dump({"results": str(tmp_path / "r"), "model": {"pretrained": True}}))
    result = _snakemake(repo_root, "--configfile", "config/demo.yaml", str(overlay), timeout=300)
    assert result.returncode != 0
    assert "model.pretrained" in result.stderr and "resnet18" in result.stderr
    assert not (tmp_path / "r" / "demo" / "manifest.parquet").exists()  # stopped before the first job
