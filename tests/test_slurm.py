"""The demo through a real single-node SLURM cluster with the shipped profile (`--profile slurm`).

Needs the Debian packages slurm-wlm and munge (.ci/run installs them) and root to start the daemons
(profiles/slurm/local_cluster.sh); skips with a printed reason otherwise.  The SLURM run builds the
image stage (manifest, 5 illumination functions, 5 tile stacks: 11 jobs) and must give the same bytes /
arrays as a local run of the same targets.  Training/embedding are left out: they ask for a GPU
(`gpu: 1`) that a CPU-only test node cannot grant.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slow
BIN = str(Path(sys.executable).parent)
PLATES = ["SQ00015198", "SQ00015230", "SQ00015231", "SQ00015232", "SQ00015233"]


def _skip(reason: str):
    print(f"SKIP: {reason}")
    pytest.skip(reason)


def _targets(results: Path) -> list[str]:
    demo = results / "demo"
    return [str(demo / "manifest.parquet")] + [str(demo / "tiles" / f"{p}.npy") for p in PLATES]


def _env() -> dict:
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    env.pop("SLURM_CONF", None)  # the cluster config is at the default path (see local_cluster.sh)
    return env


def _run(repo_root: Path, args: list[str], timeout: int = 1200) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    result = subprocess.run(
        [f"{BIN}/snakemake", *args],
        cwd=repo_root,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    elapsed = time.monotonic() - start
    if result.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
        )
    return result, elapsed


@pytest.fixture(scope="module")
def slurm_cluster(repo_root):
    """A running SLURM controller + node (started here when needed)."""
    missing = [
        b
        for b in ("sbatch", "squeue", "sinfo", "slurmctld", "slurmd", "munged")
        if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()
    ]
    if missing:
        _skip(f"SLURM binaries absent ({', '.join(missing)}): install slurm-wlm and munge (see .ci/run)")
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        _skip("snakemake-executor-plugin-slurm is not installed")
    up = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if up.returncode != 0 or not any(s in up.stdout for s in ("idle", "mixed", "alloc")):
        if os.geteuid() != 0:
            _skip("no SLURM cluster is running and starting one needs root")
        started = subprocess.run(
            [str(repo_root / "profiles/slurm/local_cluster.sh"), "start"], capture_output=True, text=True
        )
        if started.returncode != 0:
            pytest.fail(f"could not start the local SLURM cluster:\n{started.stdout}\n{started.stderr}")
    return True


def test_profile_is_found_by_bare_name_and_by_path(repo_root):
    """`--profile slurm` (bare name, from the repo root) and `--profile profiles/slurm` are the same profile."""
    assert (repo_root / "slurm").resolve() == (repo_root / "profiles" / "slurm").resolve()
    profile = yaml.safe_load((repo_root / "profiles/slurm/config.yaml").read_text())
    assert profile["executor"] == "slurm"
    rules = set(profile["set-resources"])
    assert {
        "manifest",
        "illumination",
        "tiles",
        "cells",
        "classic",
        "train",
        "embed",
        "profiles",
        "evaluate",
        "report",
    } <= rules
    assert profile["set-resources"]["embed"]["gpu"] == 1
    # train's GPU count is the rule's own (train.distributed.processes), so the profile must not pin it
    assert "gpu" not in profile["set-resources"]["train"]
    assert "gpu=TRAIN_PROCESSES" in (repo_root / "workflow/rules/model.smk").read_text()
    for entry in rules:
        assert {"mem_mb", "runtime"} <= set(profile["set-resources"][entry]), entry


def test_dry_run_with_profile(repo_root, tmp_path):
    """Planning through the profile (no cluster needed): both spellings, together with profiles/default."""
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        _skip("snakemake-executor-plugin-slurm is not installed")
    for profile in ("slurm", "profiles/slurm"):
        # targets first: --config takes every following word as a key=value pair
        result, _ = _run(
            repo_root,
            [
                *_targets(tmp_path),
                "--profile",
                profile,
                "-n",
                "--configfile",
                "config/demo.yaml",
                "--config",
                f"results={tmp_path}",
            ],
        )
        text = result.stdout + result.stderr
        assert "workflow specific profile profiles/default" in text
        assert "tiles" in text and "illumination" in text


def test_demo_through_slurm_matches_local(repo_root, tmp_path, slurm_cluster):
    local, slurm = tmp_path / "local", tmp_path / "slurm"
    _, local_s = _run(
        repo_root,
        [
            *_targets(local),
            "--cores",
            "2",
            "--configfile",
            "config/demo.yaml",
            "--config",
            f"results={local}",
        ],
    )
    result, slurm_s = _run(
        repo_root,
        [
            *_targets(slurm),
            "--profile",
            "slurm",
            # a test node has no accounting database, so sacct cannot report job states
            "--slurm-status-command",
            "squeue",
            "--slurm-init-seconds-before-status-checks",
            "1",
            "--slurm-logdir",
            str(tmp_path / "slurm_logs"),
            "--configfile",
            "config/demo.yaml",
            "--config",
            f"results={slurm}",
        ],
    )
    text = result.stdout + result.stderr
    submitted = text.count("has been submitted with SLURM jobid")
    print(f"\nSLURM: {submitted} jobs submitted, {slurm_s:.0f} s wall; local --cores 2: {local_s:.0f} s wall")
    assert submitted == 11, text[-3000:]

    lm, sm = (
        pd.read_parquet(local / "demo/manifest.parquet"),
        pd.read_parquet(slurm / "demo/manifest.parquet"),
    )
    pd.testing.assert_frame_equal(lm, sm)
    for plate in PLATES:
        a = np.load(local / f"demo/tiles/{plate}.npy")
        b = np.load(slurm / f"demo/tiles/{plate}.npy")
        assert a.shape == b.shape == (12, 5, 448, 448)
        np.testing.assert_array_equal(a, b)
        pd.testing.assert_frame_equal(
            pd.read_parquet(local / f"demo/tiles/{plate}.sites.parquet"),
            pd.read_parquet(slurm / f"demo/tiles/{plate}.sites.parquet"),
        )
        for channel in ("DNA", "ER", "RNA", "AGP", "Mito"):
            np.testing.assert_array_equal(
                np.load(local / f"demo/illum/{plate}/{channel}.npy"),
                np.load(slurm / f"demo/illum/{plate}/{channel}.npy"),
            )
    # every SLURM job left its rule log and benchmark, like a local run
    assert len(list((slurm / "demo/benchmarks").rglob("*.tsv"))) == 11
