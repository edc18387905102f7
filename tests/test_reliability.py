"""Reliability: bounded memory, interruption and determinism on CPU."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

BIN = str(Path(sys.executable).parent)


def _start(repo_root, args, log: Path) -> subprocess.Popen:
    """Start Snakemake in its own process group, its output going to ``log`` (a pipe nobody reads
    while we poll would fill up and stall the run)."""
    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    with open(log, "ab") as handle:
        return subprocess.Popen(
            [f"{BIN}/snakemake", *args],
            cwd=repo_root,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _finish(proc: subprocess.Popen, log: Path, timeout: int = 1500) -> None:
    assert proc.wait(timeout=timeout) == 0, log.read_text()[-5000:]


def _snakemake(repo_root, results, *targets):
    return _start(
        repo_root, [*targets, "--cores", "1", "--config", f"results={results}"], Path(f"{results}.log")
    )


@pytest.mark.slow
def test_killed_run_resumes_to_identical_tiles(repo_root, tmp_path):
    plates = ["SQ00015198", "SQ00015230", "SQ00015231"]

    def targets(results):
        return [f"{results}/demo/tiles/{p}.npy" for p in plates]

    reference = tmp_path / "reference"
    _finish(_snakemake(repo_root, reference, *targets(reference)), Path(f"{reference}.log"))

    interrupted = tmp_path / "interrupted"
    proc = _snakemake(repo_root, interrupted, *targets(interrupted))
    deadline = time.time() + 300
    # kill the whole run as soon as the first tiles job has started (its log exists) but not all finished
    while time.time() < deadline:
        logs = (
            list((interrupted / "demo" / "logs" / "tiles").glob("*.log"))
            if (interrupted / "demo" / "logs" / "tiles").exists()
            else []
        )
        if logs:
            time.sleep(0.5)
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = [p for p in plates if (interrupted / "demo" / "tiles" / f"{p}.npy").exists()]
    assert len(done) < len(plates), "the run finished before it could be killed"
    # whatever was left is either complete or invisible under the final name
    for leftover in (interrupted / "demo" / "tiles").glob("*"):
        assert not leftover.name.endswith(".npy") or leftover.name.startswith(".") or leftover.stem in plates

    subprocess.run(
        [f"{BIN}/snakemake", "--unlock", "--config", f"results={interrupted}"],
        cwd=repo_root,
        env=dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}"),
        capture_output=True,
    )
    _finish(_snakemake(repo_root, interrupted, *targets(interrupted)), Path(f"{interrupted}.log"))
    for plate in plates:
        a = np.load(reference / "demo" / "tiles" / f"{plate}.npy")
        b = np.load(interrupted / "demo" / "tiles" / f"{plate}.npy")
        assert np.array_equal(a, b), plate  # deterministic and complete after the kill
        ta = pd.read_parquet(reference / "demo" / "tiles" / f"{plate}.sites.parquet")
        tb = pd.read_parquet(interrupted / "demo" / "tiles" / f"{plate}.sites.parquet")
        pd.testing.assert_frame_equal(ta, tb)


def _tables_equal(a: Path, b: Path) -> None:
    pd.testing.assert_frame_equal(pd.read_parquet(a), pd.read_parquet(b), check_exact=True)


@pytest.mark.slow
def test_killed_training_resumes_and_the_whole_run_is_deterministic(repo_root, tmp_path):
    """Kill Snakemake during training, rerun: the model, features, profiles and metrics equal those of
    an uninterrupted run with the same config and seed (identical bytes on CPU)."""
    quick = tmp_path / "quick.yaml"  # the demo with shorter training (merged over config/demo.yaml)
    quick.write_text("train: {epochs_stage1: 4, epochs_stage2: 2}\n")

    def snakemake_all(results):
        args = [
            "--cores",
            "2",
            "--configfile",
            "config/demo.yaml",
            str(quick),
            "--config",
            f"results={results}",
        ]
        return _start(repo_root, args, Path(f"{results}.log"))

    reference = tmp_path / "reference"
    _finish(snakemake_all(reference), Path(f"{reference}.log"))

    interrupted = tmp_path / "interrupted"
    proc = snakemake_all(interrupted)
    state = interrupted / "demo" / "model" / "phenoprofiler_demo" / "state"
    deadline = time.time() + 900
    # kill the whole run once training has checkpointed at least one epoch, before it finished
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and any(state.iterdir()):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before training could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (interrupted / "demo" / "model" / "phenoprofiler_demo" / "stage2.pt").exists()

    env = dict(os.environ, PATH=f"{BIN}:{os.environ['PATH']}")
    subprocess.run(
        [f"{BIN}/snakemake", "--unlock", "--config", f"results={interrupted}"],
        cwd=repo_root,
        env=env,
        capture_output=True,
    )
    _finish(snakemake_all(interrupted), Path(f"{interrupted}.log"))

    import torch

    a = torch.load(
        reference / "demo/model/phenoprofiler_demo/stage2.pt", map_location="cpu", weights_only=False
    )
    b = torch.load(
        interrupted / "demo/model/phenoprofiler_demo/stage2.pt", map_location="cpu", weights_only=False
    )
    sa, sb = a["model_state"], b["model_state"]
    tensors = list(sa)
    assert tensors and all(torch.equal(sa[k], sb[k]) for k in tensors)
    pd.testing.assert_frame_equal(
        pd.read_csv(reference / "demo/model/phenoprofiler_demo/history.csv"),
        pd.read_csv(interrupted / "demo/model/phenoprofiler_demo/history.csv"),
    )
    compared = 0
    for sub in ("features", "profiles", "eval"):
        for ref in sorted((reference / "demo" / sub).rglob("*.parquet")):
            _tables_equal(ref, interrupted / "demo" / ref.relative_to(reference / "demo"))
            compared += 1
    assert compared >= 5 * 3 + 3 * 4 + 3 * 3 + 1  # features, profiles, eval tables of 3 sets + summary
