"""The whole demo through a real single-node SLURM cluster with the shipped profile (`--profile slurm`).

Needs the Debian packages slurm-wlm and munge (.ci/run installs them) and root to start the daemons
(profiles/slurm/local_cluster.sh); skips with a printed reason otherwise.  The test node is what many
users meet first: 2 CPUs, no GPU configured, no accounting.  `snakemake --profile slurm --configfile
config/demo.yaml` plus only the documented site setting for such a cluster (`--slurm-status-command squeue`)
must reach the report, every rule that is not local going through sbatch (train and embed included, on
CPU: cluster.gpus auto finds no GPU node), with the same metrics as a local run.  A job that no node can
run must stop the run before anything is submitted, naming the rule.
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


def test_profile_holds_no_dataset_sizes_and_is_found_by_name(repo_root):
    """`--profile slurm` (bare name, from the repo root) and `--profile profiles/slurm` are the same profile;
    it holds no per-rule sizes (they come from the dataset config) and no GPU requests (cluster section)."""
    assert (repo_root / "slurm").resolve() == (repo_root / "profiles" / "slurm").resolve()
    profile = yaml.safe_load((repo_root / "profiles/slurm/config.yaml").read_text())
    assert profile["executor"] == "slurm"
    assert "set-resources" not in profile and "set-threads" not in profile
    assert "cores" not in yaml.safe_load((repo_root / "profiles/default/config.yaml").read_text())


def test_dry_run_with_profile(repo_root, tmp_path):
    """Planning through the profile (no cluster needed): both spellings, together with profiles/default."""
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        _skip("snakemake-executor-plugin-slurm is not installed")
    for profile in ("slurm", "profiles/slurm"):
        result, _ = _run(
            repo_root,
            [
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
        assert "manifest" in text


def _slurm_args(tmp_path: Path, *configs: str) -> list[str]:
    return [
        "--profile",
        "slurm",
        # the documented site setting for a cluster without accounting (sacct cannot report job states)
        "--slurm-status-command",
        "squeue",
        "--slurm-init-seconds-before-status-checks",
        "1",
        "--slurm-logdir",
        str(tmp_path / "slurm_logs"),
        "--configfile",
        *configs,
    ]


def test_a_job_no_node_can_run_stops_the_run_before_submitting(repo_root, tmp_path, slurm_cluster):
    big = tmp_path / "big.yaml"
    big.write_text(f"results: {tmp_path / 'results'}\nresources: {{classic: {{threads: 64}}}}\n")
    start = time.monotonic()
    result = subprocess.run(
        [f"{BIN}/snakemake", *_slurm_args(tmp_path, "config/demo.yaml", str(big))],
        cwd=repo_root,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    elapsed = time.monotonic() - start
    text = result.stdout + result.stderr
    assert result.returncode != 0, text[-3000:]
    assert "rule 'classic' asks for 64 CPUs" in text and "the largest has" in text, text[-3000:]
    assert "has been submitted with SLURM jobid" not in text  # nothing was sent to the queue
    assert not (tmp_path / "results" / "demo" / "manifest.parquet").exists()
    print(f"\nfit check stopped the run after {elapsed:.0f} s")


def test_demo_through_slurm_reaches_the_report_with_local_metrics(
    repo_root, tmp_path, slurm_cluster, demo_results
):
    results = tmp_path / "slurm"
    overlay = tmp_path / "where.yaml"
    overlay.write_text(f"results: {results}\n")
    start = time.monotonic()
    result, _ = _run(repo_root, _slurm_args(tmp_path, "config/demo.yaml", str(overlay)), timeout=3000)
    elapsed = time.monotonic() - start
    text = result.stdout + result.stderr
    demo = results / "demo"
    assert (demo / "report.html").is_file()
    submitted = text.count("has been submitted with SLURM jobid")
    # every rule that is not local goes through sbatch, train and embed included:
    # 5 plates x (illumination, tiles, cells, classic) + train + 5 plates x 2 embedded sets + 3 x (profiles, evaluate)
    expected = 5 * 4 + 1 + 5 * 2 + 3 * 2
    print(f"\nSLURM: {submitted} jobs submitted, {elapsed:.0f} s wall")
    assert submitted == expected, text[-3000:]
    for rule in ("train", "embed"):
        assert f"rule {rule}:" in text
    # the same metrics as the local run of the same config (CPU runs are deterministic)
    pd.testing.assert_frame_equal(
        pd.read_parquet(demo / "eval" / "summary.parquet"),
        pd.read_parquet(demo_results / "eval" / "summary.parquet"),
    )
    for plate in PLATES:
        np.testing.assert_array_equal(
            np.load(demo / "tiles" / f"{plate}.npy"), np.load(demo_results / "tiles" / f"{plate}.npy")
        )
    # every job left its rule log and benchmark, like a local run
    assert len(list((demo / "benchmarks").rglob("*.tsv"))) >= expected
