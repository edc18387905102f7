"""Shared pytest fixtures.

Real-data tests use ``../shared/data`` beside the checkout; a user's clone has no ``../shared``,
so those tests skip with a printed reason instead of failing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data, or skip the test when it is absent."""
    if not SHARED_DATA.is_dir():
        reason = f"real data folder {SHARED_DATA} is absent (only present beside the project's own checkout)"
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    return SHARED_DATA


def checkout_copy(repo_root: Path, dest: Path) -> Path:
    """A copy of the checkout (what a user's clone holds) at ``dest``."""
    ignore = shutil.ignore_patterns(
        ".venv", ".git", "results", ".snakemake", "mutants", "__pycache__", "*.pyc"
    )
    shutil.copytree(repo_root, dest, ignore=ignore, symlinks=True)
    return dest


@pytest.fixture(scope="session")
def demo_results(tmp_path_factory) -> Path:
    """The whole embedded demo through Snakemake (``--cores 2``), once per test session, run from a copy
    of the checkout and into a results folder whose paths contain spaces; returns results/.../demo.
    The workflow tests read it, and the SLURM test compares its own run with it."""
    base = tmp_path_factory.mktemp("space test")
    checkout = checkout_copy(REPO, base / "my checkout" / "pheno profiler")
    results = base / "My Results"
    bin_dir = str(Path(sys.executable).parent)
    run = subprocess.run(
        [
            f"{bin_dir}/snakemake",
            "--cores",
            "2",
            "--configfile",
            "config/demo.yaml",
            "--config",
            f"results={results}",
        ],
        cwd=checkout,
        env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"),
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        raise AssertionError(f"the demo failed:\n{run.stdout[-4000:]}\n{run.stderr[-6000:]}")
    return results / "demo"
