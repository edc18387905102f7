"""``bench/gpu_check.py``: the prepared GPU check runs end to end on the CPU (``--smoke``) and
exits cleanly, with a message, where there is no GPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # as on a machine without a GPU
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=900
    )


def test_without_a_gpu_it_says_so_and_exits_0():
    result = _run()
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no CUDA device is visible" in result.stdout and "--smoke" in result.stdout
    assert "sites/s" not in result.stdout  # nothing measured


@pytest.mark.slow
def test_smoke_runs_every_part_on_cpu():
    result = _run("--smoke")
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout
    assert "FAILED" not in table, table
    for check, unit in (
        ("embed fp32 eager", "sites/s"),
        ("embed bf16 eager", "sites/s"),
        ("train step (AMP)", "images/s"),
        ("train DDP ×2", "images/s (gloo)"),
    ):
        row = next((line for line in table.splitlines() if line.startswith(check)), None)
        assert row is not None, f"no {check!r} row in:\n{table}"
        assert re.search(r"\d+\.\d+ " + re.escape(unit), row), row
