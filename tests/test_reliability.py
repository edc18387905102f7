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

PEAK_SCRIPT = r"""
import resource, sys
import pandas as pd
from phenoprofiler_core.tiles import assemble_tiles
manifest = pd.read_parquet(sys.argv[1])
channels = [c[5:] for c in manifest.columns if c.startswith("Path_")]
assemble_tiles(manifest, channels, sys.argv[2], size=128, batch_size=4, progress=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _plate(folder: Path, n_sites: int) -> Path:
    """A manifest of n_sites 5-channel 512² 16-bit sites (files are reused: memory is what's measured)."""
    from helpers import cell_image, save

    channels = ["DNA", "ER", "RNA", "AGP", "Mito"]
    files = [save(cell_image((512, 512), seed=k, n_cells=40), folder / f"img{k}.tif") for k in range(10)]
    rows = []
    for s in range(n_sites):
        row = {"Metadata_Plate": "P", "Metadata_Well": f"A{s % 24 + 1:02d}", "Metadata_Site": s // 24 + 1}
        for k, ch in enumerate(channels):
            row[f"Path_{ch}"] = str(files[(s + k) % len(files)])
        rows.append(row)
    path = folder / f"manifest{n_sites}.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


def _peak_rss_mb(manifest: Path, out: Path) -> float:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(manifest), str(out)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(result.stdout.strip().splitlines()[-1]) / 1024


def test_tile_memory_is_flat_when_the_plate_grows_4x(tmp_path):
    small = _peak_rss_mb(_plate(tmp_path, 24), tmp_path / "small.npy")
    large = _peak_rss_mb(_plate(tmp_path, 96), tmp_path / "large.npy")
    print(f"peak RSS: 24 sites {small:.0f} MB, 96 sites {large:.0f} MB (ratio {large / small:.2f})")
    # output for 96 sites is 96*5*128*128*2 B = 15 MB; a whole-plate buffer of the 512² inputs would be 500 MB
    assert large < small * 1.25 + 30, (small, large)


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
